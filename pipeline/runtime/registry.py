"""The registry: connectors and derivation engines, found through entry points.

A connector is any installed package that declares ``<name> = "package.module:CONNECTOR"`` in the
``localflow.connectors`` entry-point group (an engine: ``<name> = "package.module"`` in
``localflow.engines``), so the runtime never imports ``connectors`` or ``transforms`` by name and a
third-party connector is a package with an entry point.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.sdk.connector import Connector

if TYPE_CHECKING:
    from pipeline.runtime.catalog import Catalog

CONNECTORS = "localflow.connectors"
ENGINES = "localflow.engines"


@cache
def _entries(group: str) -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=group)}


@cache
def load_connector(name: str) -> Connector:
    """The connector registered as ``name``; KeyError when there is none."""
    entry = _entries(CONNECTORS).get(name)
    if entry is None:
        raise KeyError(name)
    connector = entry.load()  # type: ignore[attr-defined]
    if not isinstance(connector, Connector):
        raise KeyError(name)
    return connector


def known_connectors(kind: str | None = None) -> list[str]:
    """Names of the registered connectors, of one kind (``capture``/``materialization``) or all."""
    out = []
    for name in sorted(_entries(CONNECTORS)):
        try:
            c = load_connector(name)
        except KeyError:
            continue
        if kind is None or c.kind == kind:
            out.append(name)
    return out


def known_engines() -> list[str]:
    """Names of the registered derivation engines."""
    return sorted(_entries(ENGINES))


@cache
def engine_module(name: str) -> ModuleType:
    """The module implementing derivation engine ``name`` (``sqlite``, ``python``); KeyError if none.

    It exposes ``build(catalog, collection) -> Engine`` and, optionally,
    ``check(catalog, collection, place) -> problems`` for `localflow validate`.
    """
    entry = _entries(ENGINES).get(name)
    if entry is None:
        raise KeyError(name)
    return entry.load()  # type: ignore[attr-defined]


def check_derivation(catalog: Catalog, collection: str, place: str) -> list[tuple[str, str]]:
    """Catalog-time problems of a derivation (e.g. SQL that does not compile)."""
    derive = catalog.collections[collection].derive
    assert derive is not None
    check = getattr(engine_module(derive.engine), "check", None)
    return check(catalog, collection, place) if check else []


def clear() -> None:
    """Forget what was found, so that packages installed since (a new entry point) are found."""
    _entries.cache_clear()
    load_connector.cache_clear()
    engine_module.cache_clear()
