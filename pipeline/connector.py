"""What a connector tells the runtime about itself.

Each connector package (``connectors/<name>/__init__.py``) exposes ``CONNECTOR``, a
``Connector``. That module MUST stay light (config models only) because listing the known
connectors imports every one of them; the implementation is imported inside ``build``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from pipeline.catalog import Catalog
    from pipeline.task import TaskContext

Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class Check:
    """One line of `localflow doctor`: what was checked, whether it passed, and why not."""

    name: str
    ok: bool
    detail: str = ""
    required: bool = True


@dataclass(frozen=True)
class Connector:
    """A capture or materialization connector, registered by its folder name."""

    name: str
    kind: Literal["capture", "materialization"]
    config: type[BaseModel]
    resource: type[BaseModel]
    build: Callable[[TaskContext], Any]
    """Builds the Capture or Materialization for ``ctx.spec`` (imports the implementation lazily)."""
    check: Callable[[Catalog, Any, str], Problems] | None = None
    """Catalog-time checks beyond the models (e.g. identifiers Postgres cannot hold)."""
    doctor: Callable[[Any], Awaitable[list[Check]]] | None = None
    """Reachability checks of the endpoint for `localflow doctor`, given the validated config."""
