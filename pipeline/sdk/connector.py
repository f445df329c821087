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
    from pipeline.sdk.context import ConnectorTask, Context

Problems = list[tuple[str, str]]

# What a connector's ``check`` and ``build`` are handed, typed loosely so that a connector never imports
# the runtime (pipeline/runtime/catalog.py defines them): the catalog, a task's spec (``config``,
# ``bindings``, ``interval``...) and one of its bindings (``parsed``: the validated resource).
Catalog = Any
TaskSpec = Any
Binding = Any


@dataclass(frozen=True)
class Described:
    """One binding's output as a person counts it (the demo's live view): ``label`` names it (a table,
    a key pattern, an object prefix), ``unit`` says what ``count`` counts (None: nothing to count
    yet); ``close`` releases the connection ``count`` opened; ``query`` is printed after the run."""

    label: str
    unit: str
    count: Callable[[], Awaitable[int | None]]
    close: Callable[[], Awaitable[None]] | None = None
    query: str | None = None
    """A command line that shows what the binding wrote (psql, redis-cli, aws s3 ls...), with the real
    host and port and never a secret (a comment may name the variable that holds it)."""


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
    build: Callable[[Context, ConnectorTask], Any]
    """Builds the Capture or Materialization of ``task`` (e.g. the class itself)."""
    check: Callable[[Any, Any, str], Problems] | None = None
    """Catalog-time checks beyond the models (e.g. identifiers Postgres cannot hold), given the catalog,
    the task's spec and its place in the catalog."""
    doctor: Callable[[Any], Awaitable[list[Check]]] | None = None
    """Reachability checks of the endpoint for `localflow doctor`, given the validated config."""
    describe: Callable[[Any, Any, str], Described] | None = None
    """A materialization's binding as the demo shows it, given the config, the binding's resource and
    its collection (None: the demo counts the documents the task applied)."""

    def __post_init__(self) -> None:
        for field_name in ("build", "check", "doctor", "describe"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                object.__setattr__(self, field_name, lazy(value))
