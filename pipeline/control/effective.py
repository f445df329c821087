"""The effective catalog: the catalog file plus the entries the API added (the config topic).

It is validated by ``load_catalog`` itself, on a merged copy written to a temporary file, so
an API fragment is judged exactly as ``localflow validate`` judges a file, with the same
path-qualified messages (``captures.my_capture.endpoint.http.url: ...``).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from pipeline.catalog import Catalog, Model, load_catalog, pydantic_problems
from pipeline.errors import ConfigError

TASK_SECTIONS = ("collections", "captures", "materializations")

RAW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "timestamp": {"type": "string", "format": "date-time"},
        "source": {"type": "string"},
        "data": {"type": "object"},
        "metadata": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
    },
    "required": ["timestamp", "source", "data", "metadata"],
}
"""The raw document every capture writes (SPEC "Raw document schema"), keyed by /metadata/id."""

Overlay = dict[str, dict[str, Any]]


def read_file(path: Path) -> dict[str, Any] | None:
    """The catalog file as YAML data, uninterpolated (None when it is not a readable mapping)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def merged(file_raw: dict[str, Any], overlay: Overlay) -> dict[str, Any]:
    """The file's data with the overlay's entries added (an overlay entry wins over a file one)."""
    out = copy.deepcopy(file_raw)
    for section in TASK_SECTIONS:
        entries = overlay.get(section) or {}
        if entries:
            out[section] = {**(out.get(section) or {}), **copy.deepcopy(entries)}
    return out


def build(path: Path, overlay: Overlay, *, file_raw: dict[str, Any] | None = None) -> Catalog:
    """Load the catalog file (or ``file_raw``, its data read earlier) plus ``overlay``; raises
    ConfigError with every problem, as `validate` does."""
    if file_raw is None and not any(overlay.get(s) for s in TASK_SECTIONS):
        return load_catalog(path)
    file_raw = read_file(path) if file_raw is None else file_raw
    if file_raw is None:
        return load_catalog(path)  # raises the file's own problem, exactly as `validate` words it
    raw = merged(file_raw, overlay)
    for spec in (raw.get("collections") or {}).values():  # schema files stay relative to the catalog
        if isinstance(spec, dict) and isinstance(spec.get("schema"), str):
            spec["schema"] = str(path.parent.resolve() / spec["schema"])
    fd, tmp = tempfile.mkstemp(prefix="localflow-effective-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(raw, f, sort_keys=False, allow_unicode=True)
        catalog = load_catalog(tmp)
    except ConfigError as e:  # a message naming the merged copy names the catalog instead
        raise ConfigError([(p.replace(tmp, str(path)), m.replace(tmp, str(path))) for p, m in e.problems]) from None
    finally:
        os.unlink(tmp)
    catalog._path = path.resolve()  # python transforms import from the catalog's directory
    return catalog


def export(path: Path, overlay: Overlay) -> str:
    """The effective catalog as YAML: the file's data plus the API's entries, ``${VAR}`` kept."""
    file_raw = read_file(path)
    if file_raw is None:
        load_catalog(path)  # raises the file's problem
        file_raw = {}
    return yaml.safe_dump(merged(file_raw, overlay), sort_keys=False, allow_unicode=True)


class ShortCapture(Model):
    """The seed's minimal capture: ``create_capture(name, {"endpoint": url})``.

    It becomes an ``http`` capture of ``endpoint`` into the collection ``target`` (default: the
    capture's name), created with the raw schema when it does not exist yet.
    """

    endpoint: str = Field(description="URL of the JSON API to poll.")
    interval: str | float = Field(default="5m", description="How often to poll (the seed's 5 minutes).")
    token: str | None = Field(default=None, description="Bearer token; write ${VAR} to read it from the env.")
    target: str | None = Field(default=None, description="The collection written; default: the capture's name.")
    records: str = Field(default="", description="JSON pointer to the array of records ('' = the body is one).")
    id: str | None = Field(default=None, description="JSON pointer to each record's id.")
    timestamp: str | None = Field(default=None, description="JSON pointer to each record's date-time.")
    source: str | None = Field(default=None, description="Each document's `source`; default: the capture's name.")


def capture_entries(name: str, config: dict[str, Any], existing: set[str]) -> Overlay:
    """The catalog entries a capture request adds: its own, and its collection for the short form."""
    if not isinstance(config.get("endpoint"), str):
        return {"captures": {name: config}}
    try:
        short = ShortCapture.model_validate(config)
    except ValidationError as e:
        raise ConfigError(pydantic_problems(e, f"captures.{name}")) from None
    target = short.target or name
    http: dict[str, Any] = {"url": short.endpoint}
    if short.token:
        http["token"] = short.token
    resource = {k: v for k, v in (("records", short.records), ("id", short.id), ("timestamp", short.timestamp),
                                  ("source", short.source)) if v}
    out: Overlay = {"captures": {name: {"interval": short.interval, "endpoint": {"http": http},
                                        "bindings": [{"target": target, "resource": resource}]}}}
    if target not in existing:
        out["collections"] = {target: {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}}
    return out
