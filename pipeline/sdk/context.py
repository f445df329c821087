"""What a connector gets from the runtime: a narrow ``Context`` and the ``ConnectorTask`` it is built from.

The runtime hands each connector a context of six names (no catalog, no Kafka client, no status
to write: a connector uses these six and nothing else, which tests/test_runtime_policies.py checks
in every connector's code), and a ``ConnectorTask``: its catalog entry and the collections its
bindings name. A connector annotates with these so that it never imports the runtime.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Context(Protocol):
    """The runtime's services to a running connector (``ConnectorContext`` implements it)."""

    @property
    def name(self) -> str:
        """The task's catalog name (a capture's or a materialization's)."""

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """The task's logger: every line names the task."""

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the task must stop: return soon, flushing what is open."""

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when the task should stop instead of going on."""

    def report(self, error: BaseException | None = None, *, connected: bool | None = None) -> None:
        """Tell the runtime about an error the connector handled and goes on after (counted by its
        ``kind``, shown as the task's last error), or whether its endpoint is reachable now."""

    async def dead_letter(self, collection: str, error: str, original: bytes, **context: Any) -> None:
        """Send raw input that failed to ``<collection's topic>.dead`` (never drop it silently)."""


CONTEXT_NAMES = ("name", "log", "stopping", "sleep", "report", "dead_letter")
"""Everything a ``Context`` has (tests/test_runtime_policies.py checks the runtime gives no more, and
that no connector uses another name of it)."""


class CollectionInfo(Protocol):
    """A collection as a connector may know it: where it is stored and how its documents are keyed."""

    @property
    def name(self) -> str: ...

    @property
    def topic(self) -> str: ...

    @property
    def key(self) -> Sequence[str]:
        """JSON pointers of the key, in order."""

    @property
    def schema(self) -> dict[str, Any]:
        """The collection's JSON Schema (resolved)."""


@dataclass(frozen=True)
class ConnectorTask:
    """What a connector is built from: its catalog entry and the collections its bindings name."""

    spec: Any
    """The task's catalog entry: ``name``, ``connector``, ``config`` (the connector's validated model)
    and ``bindings`` (each with ``parsed``, its validated resource)."""
    collections: Mapping[str, CollectionInfo]
    """Every collection a binding names (a capture's targets, a materialization's sources), by name."""


class ConnectorBase:
    """The base of the Capture and Materialization contracts: what the runtime built it with."""

    def __init__(self, ctx: Context, task: ConnectorTask) -> None:
        self.ctx = ctx
        self.task = task
        self.spec: Any = task.spec
        """The task's catalog entry (``task.spec``)."""
        self.config: Any = task.spec.config
        """The connector's validated config model."""
