"""The catalog's JSON Schema (for editors) and its reference (docs/reference.md), both generated from
the pydantic models that validate catalogs, so they cannot drift from what `localflow validate`
accepts. `localflow schema` prints the first, `localflow schema --reference` the second.
"""

from __future__ import annotations

import inspect
import re
import textwrap
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic.json_schema import models_json_schema

from pipeline.runtime.catalog import (
    CaptureBinding,
    CaptureSpec,
    Catalog,
    CollectionSpec,
    DeriveSpec,
    IngestStep,
    KafkaConfig,
    MaterializationBinding,
    MaterializationSpec,
    TestStep,
    TransformSpec,
    VerifyStep,
    model_anchor,
)
from pipeline.sdk.config import parse_duration
from pipeline.sdk.connector import Connector

_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _connectors() -> list[Connector]:
    from pipeline.runtime.registry import known_connectors, load_connector

    return [load_connector(n) for n in known_connectors()]


# ------------------------------------------------------------------------------------ JSON Schema

def catalog_json_schema() -> dict[str, Any]:
    """A 2020-12 JSON Schema of a catalog file, connector configs and resources included (each task's
    ``endpoint`` names one connector; its bindings' ``resource`` follows that connector's model)."""
    connectors = _connectors()
    models: list[type[BaseModel]] = [Catalog, *(c.config for c in connectors), *(c.resource for c in connectors)]
    refs, top = models_json_schema([(m, "validation") for m in models], ref_template="#/$defs/{model}")
    defs: dict[str, Any] = top["$defs"]

    def ref(model: type[BaseModel]) -> dict[str, str]:
        return {"$ref": refs[(model, "validation")]["$ref"]}

    def name(model: type[BaseModel]) -> str:
        return ref(model)["$ref"].rsplit("/", 1)[1]

    for spec, kind in ((CaptureSpec, "capture"), (MaterializationSpec, "materialization")):
        mine = [c for c in connectors if c.kind == kind]
        d = defs[spec.__name__]  # a model only Catalog uses keeps its plain name
        d["properties"]["endpoint"] = {
            "description": d["properties"]["endpoint"].get("description", ""),
            "type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
            "properties": {c.name: ref(c.config) for c in mine},
        }
        d["allOf"] = [{"if": {"properties": {"endpoint": {"required": [c.name]}}, "required": ["endpoint"]},
                       "then": {"properties": {"bindings": {"items": {"properties": {"resource": ref(c.resource)}}}}}}
                      for c in mine]
    root = defs.pop(name(Catalog))
    for d in [root, *defs.values()]:
        _allow_variables(d)
    defs["Variable"] = {"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$",
                        "description": "${VAR} or ${VAR:-default}: the value comes from the environment."}
    return {"$schema": _DIALECT, "$id": "https://localflow.dev/catalog.schema.json",
            **root, "title": "localflow catalog (flow.yaml)", "$defs": defs}


_VARIABLE = {"$ref": "#/$defs/Variable"}


def _allow_variables(schema: Any) -> None:
    """Let every number, integer and boolean also be written ``${VAR}``: editors check the file as
    written, before interpolation (strings already accept it)."""
    if isinstance(schema, list):
        for s in schema:
            _allow_variables(s)
        return
    if not isinstance(schema, dict):
        return
    for key, sub in list(schema.items()):
        if key in ("properties", "$defs", "patternProperties"):
            for s in sub.values():
                _allow_variables(s)
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "then", "else", "not"):
            _allow_variables(sub)
    if schema.get("type") in ("integer", "number", "boolean"):
        typed = {k: schema.pop(k) for k in list(schema) if k not in ("description", "default", "title", "examples")}
        schema["anyOf"] = [typed, _VARIABLE]


# ------------------------------------------------------------------------------------ reference

_CATALOG_MODELS: list[tuple[str, list[type[BaseModel]]]] = [
    ("The catalog file", [Catalog, KafkaConfig]),
    ("Collections and derivations", [CollectionSpec, DeriveSpec, TransformSpec]),
    ("Captures", [CaptureSpec, CaptureBinding]),
    ("Materializations", [MaterializationSpec, MaterializationBinding]),
    ("Tests", [TestStep, IngestStep, VerifyStep]),
]


def reference_markdown() -> str:
    """docs/reference.md: every field of the catalog and of each connector, with its type,
    default, description and example, under anchors that `localflow validate` points at."""
    connectors = _connectors()
    out = [
        "# Catalog and connector reference",
        "",
        "<!-- Generated from the models by `localflow schema --reference > docs/reference.md`; do not edit. -->",
        "",
        "Every field `localflow validate` accepts, from the same pydantic models. Durations are written",
        "`500ms`, `30s`, `5m`, `1h30m` or a number of seconds; `${VAR}` and `${VAR:-default}` are read from the",
        "environment (secrets belong there). For editors, `localflow schema > flow.schema.json` prints the",
        "catalog's JSON Schema (draft 2020-12), e.g. for the YAML language server:",
        "`# yaml-language-server: $schema=flow.schema.json` on the first line of `flow.yaml`.",
        "",
        "Contents: " + ", ".join(f"[{title}](#{_slug(title)})" for title, _ in _CATALOG_MODELS)
        + ", [Capture connectors](#capture-connectors), [Materialization connectors](#materialization-connectors)",
        "",
    ]
    for title, models in _CATALOG_MODELS:
        out += [f'<a id="{_slug(title)}"></a>', "", f"## {title}", ""]
        for model in models:
            out += _model_section(model, "###")
    for kind in ("capture", "materialization"):
        mine = [c for c in connectors if c.kind == kind]
        out += [f'<a id="{kind}-connectors"></a>', "", f"## {kind.capitalize()} connectors", "",
                "Connectors: " + ", ".join(f"[`{c.name}`](#{model_anchor(c.config)})" for c in mine), ""]
        for c in mine:
            out += _connector_section(c)
    return "\n".join(out).rstrip() + "\n"


def _connector_section(c: Connector) -> list[str]:
    out = [f'<a id="{model_anchor(c.config)}"></a>', "", f"### `{c.name}`", ""]
    module = inspect.getmodule(c.config)
    out += _rst_to_markdown(inspect.getdoc(module) or "") + [""]
    out += [f"Endpoint (`endpoint: {{{c.name}: ...}}`): {_first_line(c.config)}", ""]
    out += _table(c.config)
    seen: set[type[BaseModel]] = {c.config, c.resource}
    nested = _nested(c.config, seen)
    out += [f'<a id="{model_anchor(c.resource)}"></a>', "",
            f"Each binding's `resource`: {_first_line(c.resource)}", ""]
    out += _table(c.resource)
    nested += _nested(c.resource, seen)
    for model in nested:
        out += _model_section(model, "####")
    return out


def _model_section(model: type[BaseModel], heading: str) -> list[str]:
    doc = inspect.getdoc(model) or ""
    return [f'<a id="{model_anchor(model)}"></a>', "", f"{heading} {model.__name__}", "", doc, "", *_table(model)]


def _nested(model: type[BaseModel], seen: set[type[BaseModel]]) -> list[type[BaseModel]]:
    """Models used by ``model``'s fields, depth first, each once."""
    out = []
    for f in model.model_fields.values():
        for sub in _models_in(f.annotation):
            if sub not in seen:
                seen.add(sub)
                out += [sub, *_nested(sub, seen)]
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _table(model: type[BaseModel]) -> list[str]:
    rows = ["| Field | Type | Default | Description | Example |", "|---|---|---|---|---|"]
    for field_name, f in model.model_fields.items():
        rows.append("| " + " | ".join(_cell(x) for x in (
            f"`{f.alias or field_name}`", _type(f.annotation, f), _default(f), _description(f), _example(f))) + " |")
    return [*rows, ""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _description(f: FieldInfo) -> str:
    if f.description:
        return f.description
    models = _models_in(f.annotation)
    return _first_line(models[0]) if models else ""


def _first_line(model: type[BaseModel]) -> str:
    return (inspect.getdoc(model) or "").split("\n\n")[0].replace("\n", " ")


def _example(f: FieldInfo) -> str:
    return ", ".join(f"`{_yaml(x)}`" for x in f.examples or [])


def _default(f: FieldInfo) -> str:
    if f.is_required():
        return "required"
    value = f.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    if value is None:
        return "none"
    if _is_duration(f):
        return f"`{value:g}s`"
    if isinstance(value, SecretStr):
        return "(secret)"
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """A value as it is written in flow.yaml (flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w./:${}\-@ ,*?=]+", value) and value.strip() == value else repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _is_duration(f: FieldInfo) -> bool:
    return any(getattr(m, "func", None) is parse_duration for m in f.metadata) or _annotation_is_duration(f.annotation)


def _annotation_is_duration(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated:
        return any(getattr(m, "func", None) is parse_duration for m in typing.get_args(annotation)[1:])
    return any(_annotation_is_duration(a) for a in typing.get_args(annotation))


_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", SecretStr: "secret string",
          type(None): "null", Any: "any"}


def _type(annotation: Any, f: FieldInfo | None = None) -> str:
    """A field's type in words: ``duration``, ``list of string``, ``"GET" or "POST"``, a model link."""
    if (f is not None and _is_duration(f)) or _annotation_is_duration(annotation):
        if typing.get_origin(annotation) is not list:
            return "duration"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _type(args[0])
    if origin is Literal:
        return " or ".join(f'`{_yaml(a)}`' for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in parts)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"map of {_type(args[1])}" if args else "map"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{model_anchor(annotation)})"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _rst_to_markdown(doc: str) -> list[str]:
    """A module docstring with ``Example::`` literal blocks as fenced YAML, ``x`` as `x`."""
    out: list[str] = []
    lines = doc.replace("``", "`").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            out += [line.rstrip()[:-2].rstrip() + ":", "", "```yaml"]
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            out += [*textwrap.dedent("\n".join(block)).strip("\n").splitlines(), "```", ""]
            continue
        out.append(line)
        i += 1
    return out
