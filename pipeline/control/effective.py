"""The effective catalog: the catalog file plus the entries the API added (the config topic).

It is validated by ``load_catalog`` itself, on a merged copy written to a temporary file, so
an API fragment is judged exactly as ``localflow validate`` judges a file, with the same
path-qualified messages (``captures.my_capture.endpoint.http.url: ...``); positions in the
merged copy are dropped (they are in no file the caller has), those in the catalog file kept.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from pipeline.runtime.catalog import Catalog, Positions, Problem, load_catalog, pydantic_problems, read_yaml
from pipeline.sdk.config import Model
from pipeline.sdk.errors import ConfigError

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


@dataclass(frozen=True)
class FileData:
    """The catalog file as read by the catalog's own parser: its data (uninterpolated) and where
    each place is in it."""

    raw: dict[str, Any]
    positions: Positions


def read_file(path: Path) -> FileData | None:
    """The catalog file's data, or None when it is not a readable YAML mapping (``load_catalog``
    then says why, as `validate` does)."""
    positions = Positions()
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), str(path), "", positions)
    except (OSError, UnicodeDecodeError, ConfigError):
        return None
    return FileData(raw, positions) if isinstance(raw, dict) else None


def merged(file_raw: dict[str, Any], overlay: Overlay) -> dict[str, Any]:
    """The file's data with the overlay's entries added (an overlay entry wins over a file one)."""
    out = copy.deepcopy(file_raw)
    for section in TASK_SECTIONS:
        entries = overlay.get(section) or {}
        if entries:
            out[section] = {**(out.get(section) or {}), **copy.deepcopy(entries)}
    return out


def build(path: Path, overlay: Overlay, *, file: FileData | None = None) -> Catalog:
    """Load the catalog file (or ``file``, read earlier) plus ``overlay``; raises ConfigError with
    every problem, as `validate` does: a problem of the file's own entries at its position in the
    file, one of the overlay's without a position (it is in no file)."""
    if file is None and not any(overlay.get(s) for s in TASK_SECTIONS):
        return load_catalog(path)
    file = read_file(path) if file is None else file
    if file is None:
        return load_catalog(path)  # raises the file's own problem
    raw = merged(file.raw, overlay)
    for spec in (raw.get("collections") or {}).values():  # schema files stay relative to the catalog
        if isinstance(spec, dict) and isinstance(spec.get("schema"), str):
            spec["schema"] = str(path.parent.resolve() / spec["schema"])
    fd, tmp = tempfile.mkstemp(prefix="localflow-effective-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(raw, f, sort_keys=False, allow_unicode=True)
        catalog = load_catalog(tmp)
    except ConfigError as e:
        for problem in e.problems:
            if isinstance(problem, Problem) and problem.file == tmp:  # a line of the merged copy: meaningless
                mark = None if _in_overlay(problem.place, overlay) else file.positions.find(problem.place,
                                                                                              problem.at_key)
                problem.file, problem.line, problem.column = mark or ("", 0, 0)
        raise
    finally:
        os.unlink(tmp)
    catalog._path = path.resolve()  # python transforms import from the catalog's directory
    return catalog


def _in_overlay(place: str, overlay: Overlay) -> bool:
    """Whether ``place`` (``captures.my_capture.interval``) is inside an entry the overlay added."""
    for section, entries in overlay.items():
        for name in entries or {}:
            entry = f"{section}.{name}"
            if place == entry or place.startswith((f"{entry}.", f"{entry}[")):
                return True
    return False


def export(path: Path, overlay: Overlay) -> str:
    """The effective catalog as YAML: the file's data plus the API's entries, ``${VAR}`` kept."""
    file = read_file(path)
    if file is None:
        load_catalog(path)  # raises the file's problem
    return yaml.safe_dump(merged(file.raw if file else {}, overlay), sort_keys=False, allow_unicode=True)


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
