"""The connector registry: a connector is a sub-package whose ``__init__`` exposes ``CONNECTOR``.

Adding a connector means adding a folder; neither this module nor the catalog changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from pipeline.connector import Connector


@cache
def _names() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg))


@cache
def load_connector(name: str) -> Connector:
    """The connector registered as ``name``; KeyError when there is none."""
    if name not in _names():
        raise KeyError(name)
    module = importlib.import_module(f"{__name__}.{name}")
    connector = getattr(module, "CONNECTOR", None)
    if not isinstance(connector, Connector):
        raise KeyError(name)
    return connector


def known_connectors(kind: str | None = None) -> list[str]:
    """Names of the registered connectors, of one kind (``capture``/``materialization``) or all."""
    out = []
    for name in _names():
        try:
            c = load_connector(name)
        except KeyError:
            continue
        if kind is None or c.kind == kind:
            out.append(name)
    return out
