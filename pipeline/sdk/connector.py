"""What a connector tells the runtime about itself.

Each connector package (``connectors/<name>/__init__.py``) exposes ``CONNECTOR``, a
``Connector``, registered by an entry point (``localflow.connectors`` in pyproject.toml). That module MUST stay light (config models only) because listing the known
connectors imports every one of them; the implementation is imported inside ``build``.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from pipeline.sdk.context import Context

Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class Check:
    """One line of `localflow doctor`: what was checked, whether it passed, and why not."""

    name: str
    ok: bool
    detail: str = ""
    required: bool = True


def lazy(target: str) -> Callable[..., Any]:
    """A callable that imports ``"package.module:attribute"`` on first call, then calls it.

    Connectors name their implementation this way so that listing connectors (which imports
    every ``connectors/<name>/__init__.py``) never imports drivers such as asyncpg or aioboto3.
    """
    module_name, _, attribute = target.partition(":")
    resolved: list[Callable[..., Any]] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not resolved:
            resolved.append(getattr(importlib.import_module(module_name), attribute))
        return resolved[0](*args, **kwargs)

    call.__qualname__ = call.__name__ = target
    return call


@dataclass(frozen=True)
class Connector:
    """A capture or materialization connector, registered by its folder name.

    ``build``, ``check`` and ``doctor`` are callables or ``"module:attribute"`` strings
    (imported on first use, see ``lazy``).
    """

    name: str
    kind: Literal["capture", "materialization"]
    config: type[BaseModel]
    resource: type[BaseModel]
    build: Callable[[Context], Any]
    """Builds the Capture or Materialization for ``ctx.spec`` (e.g. the class itself)."""
    check: Callable[[Any, Any, str], Problems] | None = None
    """Catalog-time checks beyond the models (e.g. identifiers Postgres cannot hold), given the catalog,
    the task's spec and its place in the catalog."""
    doctor: Callable[[Any], Awaitable[list[Check]]] | None = None
    """Reachability checks of the endpoint for `localflow doctor`, given the validated config."""

    def __post_init__(self) -> None:
        for field_name in ("build", "check", "doctor"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                object.__setattr__(self, field_name, lazy(value))
