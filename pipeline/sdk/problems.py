"""Problems of a catalog or a connector config, each with its place: what `localflow validate` prints.

``pydantic_problems`` turns a pydantic ValidationError into problems a person can act on (the
place, the offending value, the valid names and a suggestion for a misspelled one).
"""

from __future__ import annotations

import difflib
import enum
import re
import reprlib
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

from pipeline.sdk.config import Model

REFERENCE = "docs/reference.md"
"""Where every catalog and connector field is described (`localflow schema --reference`)."""


def join(place: str, part: str) -> str:
    """``place.part`` (just ``part`` at the top)."""
    return f"{place}.{part}" if place else part


class Problem(tuple[str, str]):
    """One problem of a catalog: a ``(place, message)`` pair, as ConfigError holds them, that also
    knows where it is in the file, the offending value and, for a misspelled name, a suggestion and
    the names that are valid there."""

    file: str
    line: int
    column: int

    def __new__(cls, place: str, message: str, *, value: Any = None, has_value: bool = False,
                did_you_mean: str | None = None, valid: Sequence[str] = (), at_key: bool = False,
                reference: str | None = None) -> Problem:
        text = message
        if did_you_mean is not None:
            text += f" (did you mean {did_you_mean!r}?)"
        if valid:
            text += f"; valid: {', '.join(valid)}"
        if reference:
            text += f"; see {REFERENCE}#{reference}"
        self = super().__new__(cls, (place, text))
        self.base, self.value, self.has_value = message, value, has_value
        self.did_you_mean, self.valid, self.at_key, self.reference = did_you_mean, list(valid), at_key, reference
        self.file, self.line, self.column = "", 0, 0
        return self

    @classmethod
    def of(cls, pair: tuple[str, str]) -> Problem:
        return pair if isinstance(pair, Problem) else cls(pair[0], pair[1])

    @property
    def place(self) -> str:
        return self[0]

    @property
    def message(self) -> str:
        return self[1]

    @property
    def where(self) -> str:
        """``file:line:column`` (or just the file when the place has no position)."""
        return f"{self.file}:{self.line}:{self.column}" if self.line else self.file

    def __str__(self) -> str:
        text = f"{self.place}: {self.message}" if self.place else self.message
        return f"{self.where}: {text}" if self.where else text

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file or None, "line": self.line or None, "column": self.column or None,
                               "path": self.place, "message": self.base}
        if self.has_value:
            out["value"] = self.value
        if self.did_you_mean is not None:
            out["did_you_mean"] = self.did_you_mean
        if self.valid:
            out["valid"] = self.valid
        if self.reference:
            out["reference"] = f"{REFERENCE}#{self.reference}"
        return out


def pydantic_problems(error: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> list[Problem]:
    """pydantic's errors as problems under ``prefix``: each with the offending value, and for an
    unknown field or a wrong choice the closest valid name and all of them. ``model`` (the model
    that was validated; else found by the error's title) gives the valid field names."""
    model = model or _model_named(error.title)
    out: list[Problem] = []
    for err in error.errors(include_url=False):
        loc = _without_union_tags(model, list(err["loc"]))
        place = prefix
        for part in loc:
            place = f"{place}[{part}]" if isinstance(part, int) else join(place, str(part))
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        kind = err["type"]
        if kind == "extra_forbidden":
            owner = _model_at(model, loc[:-1]) if model else None
            valid = _field_names(owner) if owner else []
            out.append(Problem(place, f"unknown field {str(loc[-1])!r}", did_you_mean=closest(str(loc[-1]), valid),
                               valid=valid, at_key=True, reference=_anchor(owner)))
        elif kind == "missing":
            owner = _model_at(model, loc[:-1]) if model else None
            out.append(Problem(place, "required field is missing", reference=_anchor(owner), at_key=True))
        elif kind in ("literal_error", "enum"):
            expected = [str(x) for x in _literal_choices(model, loc)] if model else []
            out.append(Problem(place, f"{_show(value)} is not one of the choices", value=value, has_value=True,
                               did_you_mean=closest(str(value), expected), valid=expected))
        elif out and out[-1].place == place and out[-1].has_value and out[-1].value == jsonable(value):
            # one value refused by each alternative of a union: one problem, the alternatives joined
            out[-1] = Problem(place, f"{out[-1].base} or {msg.removeprefix('Input should be ')}",
                              value=out[-1].value, has_value=True)
        else:
            out.append(Problem(place, msg, value=jsonable(value), has_value=True))
    return [_with_value(p) for p in out]


def _with_value(p: Problem) -> Problem:
    """``...; got 0`` after a message that does not show the offending value already."""
    shown = _show(p.value)
    if not p.has_value or p.at_key or p.did_you_mean or p.valid or shown in p.base or isinstance(p.value, dict):
        return p
    out = Problem(p.place, f"{p.base}; got {shown}", value=p.value, has_value=True)
    out.file, out.line, out.column = p.file, p.line, p.column
    return out


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\])$")


def _without_union_tags(model: type[BaseModel] | None, loc: list[Any]) -> list[Any]:
    """``loc`` without the names pydantic gives the union alternatives it tried (``dict[str,any]``,
    ``str``): they are not places in the file."""
    out: list[Any] = []
    annotation: Any = model
    for part in loc:
        alternatives = [m for m in _members(annotation) if m is not type(None)]
        if len(alternatives) > 1 and isinstance(part, str) and _UNION_TAG.match(part):
            continue
        step = _step(annotation, part) if annotation is not None else None
        out.append(part)
        annotation = step
    return out


def _show(value: Any) -> str:
    return reprlib.repr(value)


def jsonable(value: Any) -> Any:
    """The value for JSON output: itself when JSON can hold it, else its repr."""
    try:
        orjson.dumps(value)
    except TypeError:
        return repr(value)
    return value


def closest(name: str, valid: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    if not found:
        found = [v for v in valid if v.lower() == name.lower() or v.startswith(name) or name.startswith(v)][:1]
    return found[0] if found else None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def model_anchor(model: type[BaseModel]) -> str:
    """The anchor of ``model``'s section in docs/reference.md: ``collectionspec``, ``http-httpconfig``."""
    parts = model.__module__.split(".")
    prefix = f"{parts[1]}-" if parts[0] == "connectors" and len(parts) > 2 else ""
    return f"{prefix}{model.__name__}".lower()


def _anchor(model: type[BaseModel] | None) -> str | None:
    return None if model is None else model_anchor(model)


def _model_named(title: str) -> type[BaseModel] | None:
    """The one Model subclass named ``title`` (None when there is none or several)."""
    found: list[type[BaseModel]] = []
    todo = list(Model.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__ == title and cls not in found:
            found.append(cls)
    return found[0] if len(found) == 1 else None


def _members(annotation: Any) -> list[Any]:
    """The alternatives of an annotation: ``A | None`` -> [A, None]; ``Annotated[A, ...]`` -> [A]."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _step(annotation: Any, part: Any) -> Any:
    """The annotation of ``part`` (a field, a dict key or a list index) inside ``annotation``."""
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if isinstance(member, type) and issubclass(member, BaseModel):
            for name, f in member.model_fields.items():
                if part in (name, f.alias):
                    return f.annotation
            if part == member.__name__:  # pydantic names the union member it tried
                return member
        elif origin is dict and not isinstance(part, int):
            return typing.get_args(member)[1]
        elif origin is list and isinstance(part, int):
            return typing.get_args(member)[0]
    return None


def _model_at(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model that holds the fields at ``loc`` below ``model`` (None: not a model there)."""
    annotation: Any = model
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return None
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if models else None


def _literal_choices(model: type[BaseModel], loc: Sequence[Any]) -> list[Any]:
    annotation: Any = model
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    out: list[Any] = []
    for member in _members(annotation):
        if typing.get_origin(member) is Literal:
            out += typing.get_args(member)
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            out += [m.value for m in member]
    return out
