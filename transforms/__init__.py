"""Derivation engines: ``sqlite`` (SQL lambdas) and ``python`` (``module:function`` lambdas).

Each engine module exposes ``check(catalog, collection, place) -> problems`` for
`localflow validate` and ``build(catalog, collection) -> Engine`` for the derivation worker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.catalog import Catalog


def engine_module(name: str):  # noqa: ANN201 - a module
    """The module implementing engine ``name`` (``sqlite`` or ``python``)."""
    return importlib.import_module(f"{__name__}.{name}")


def check_derivation(catalog: Catalog, collection: str, place: str) -> list[tuple[str, str]]:
    """Catalog-time problems of a derivation (e.g. SQL that does not compile)."""
    derive = catalog.collections[collection].derive
    assert derive is not None
    module = engine_module(derive.engine)
    check = getattr(module, "check", None)
    return check(catalog, collection, place) if check else []
