"""The ``python`` engine: each transform's ``lambda`` names a function as ``module:function``.

The function takes one source document (a dict) and returns an output document, a list of
them, or None (no output). It must give an input the same output keys every time (a batch is
re-run after a crash) and must not modify its input when another transform reads the same
source. An exception, or a return value of another type, makes that input a dead letter
naming the transform; the other documents of the batch go on.

Modules are imported as usual, with the catalog's directory added to ``sys.path`` so a
``transforms.py`` next to ``flow.yaml`` is found. An unimportable module or a missing function
is a catalog error (`localflow validate`), reported at the transform's ``lambda``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from pipeline.runtime.catalog import Catalog, pydantic_problems
from pipeline.sdk.config import Model
from pipeline.sdk.engine import Document, Engine, Transformed
from pipeline.sdk.errors import ConfigError

Problems = list[tuple[str, str]]
Function = Callable[[Document], Any]


class PythonOptions(Model):
    """``derive.using.python`` takes no options (write ``python: {}``)."""


def check(catalog: Catalog, collection: str, place: str) -> Problems:
    """Each lambda must name an importable, callable ``module:function``."""
    try:
        _functions(catalog, collection, place)
    except ConfigError as e:
        return e.problems
    return []


def build(catalog: Catalog, collection: str) -> PythonEngine:
    return PythonEngine(_functions(catalog, collection, f"collections.{collection}.derive"))


def _functions(catalog: Catalog, collection: str, place: str) -> list[Function]:
    derive = catalog.collections[collection].derive
    assert derive is not None
    try:
        PythonOptions.model_validate(derive.options)
    except ValidationError as e:
        raise ConfigError(pydantic_problems(e, f"{place}.using.python")) from None
    if catalog.path is not None and str(catalog.path.parent) not in sys.path:
        sys.path.append(str(catalog.path.parent))
    problems: Problems = []
    functions: list[Function] = []
    for i, t in enumerate(derive.transforms):
        try:
            functions.append(_import(t.lambda_))
        except ImportError as e:
            problems.append((f"{place}.transforms[{i}].lambda", str(e)))
    if problems:
        raise ConfigError(problems)
    return functions


def _import(spec: str) -> Function:
    module_name, sep, attr = spec.strip().partition(":")
    if not sep or not module_name or not attr:
        raise ImportError(f"{spec!r} is not `module:function` (e.g. transforms.sophia:enrich)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure while importing user code is the user's to fix
        raise ImportError(f"cannot import module {module_name!r}: {type(e).__name__}: {e} "
                          f"(it must be importable from the catalog's directory or the installed packages)") from e
    function = getattr(module, attr, None)
    if not callable(function):
        raise ImportError(f"module {module_name!r} has no function {attr!r}")
    return function


class PythonEngine(Engine):
    """Calls transform ``i``'s function on each document of a batch."""

    def __init__(self, functions: list[Function]) -> None:
        self._functions = functions

    def apply(self, transform: int, documents: Sequence[Document]) -> Transformed:
        function = self._functions[transform]
        out = Transformed()
        for i, doc in enumerate(documents):
            try:
                result = function(doc)
            except Exception as e:  # noqa: BLE001 - a failing user function fails its input, not the task
                out.failed.append((i, f"{type(e).__name__}: {e}"))
                continue
            if result is None:
                continue
            if type(result) is dict:
                out.documents.append(result)
                out.sources.append(i)
            elif isinstance(result, list) and all(type(d) is dict for d in result):
                out.documents.extend(result)
                out.sources.extend([i] * len(result))
            else:
                out.failed.append((i, f"returned {type(result).__name__}; return a document (dict), "
                                      f"a list of documents, or None"))
        return out
