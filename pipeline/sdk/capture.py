"""The Capture contract: what a source connector implements, and the ``Captured`` items it yields.

Estuary's rule, enforced by the runtime: emit nothing without a checkpoint. A capture yields
``Captured`` items, each holding documents *and* the state that covers them; the runtime
writes the documents, waits for the broker's acknowledgement, then saves the state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.sdk.context import ConnectorBase


@dataclass
class Captured:
    """Documents and the checkpoint state that covers them, released together.

    ``documents`` are ``(binding index, document)`` pairs. ``state`` is the capture's whole
    state after these documents (JSON-serializable), or None when it did not change.
    ``dead`` holds raw input that could not become a document: ``(binding index, error, bytes)``.
    """

    documents: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    state: dict[str, Any] | None = None
    dead: list[tuple[int, str, bytes]] = field(default_factory=list)
    source_bytes: int = 0


class Capture(ConnectorBase, ABC):
    """A source reader. Build no state in ``__init__``: resume from the state passed to ``run``.

    MUST: set a deterministic ``metadata.id`` on every document; yield a state that covers
    exactly the documents yielded so far; return from ``run`` soon after ``ctx.stopping`` is
    set (use ``ctx.sleep`` for intervals). MUST NOT: write to Kafka itself.
    """

    async def open(self) -> None:
        """Connect or check the source; raise a clear error if it cannot work at all."""

    @abstractmethod
    def run(self, state: dict[str, Any] | None) -> AsyncIterator[Captured]:
        """Yield captured items until ``ctx.stopping`` is set."""

    async def close(self) -> None:
        """Release connections; called after ``run`` ends or fails."""
