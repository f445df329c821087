"""The context a connector gets from the runtime: what it may use, and nothing of the runtime itself.

The runtime's ``TaskContext`` satisfies this protocol; a connector annotates with ``Context`` so
that it never imports the runtime.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol


class Context(Protocol):
    name: str
    """The task's catalog name (a capture's or a materialization's)."""
    stopping: asyncio.Event
    """Set when the task must stop: return soon, flushing what is open."""
    log: logging.LoggerAdapter[logging.Logger]
    options: Any
    """Runtime options from the command line (e.g. replay's start positions)."""
    status: Any

    @property
    def spec(self) -> Any:
        """The task's catalog entry; ``spec.config`` is the connector's validated config model."""

    @property
    def catalog(self) -> Any: ...

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when the task should stop instead of going on."""

    async def dead_letter(self, collection: str, error: str, original: bytes, **context: Any) -> None:
        """Send raw input that failed to ``<collection's topic>.dead`` (never drop it silently)."""
