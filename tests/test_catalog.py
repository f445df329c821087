"""`localflow validate`: the Sophia catalog passes; each broken catalog exits 2 naming its place."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.runtime.catalog import load_catalog
from pipeline.sdk.config import parse_duration
from pipeline.sdk.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SOPHIA = ROOT / "examples" / "sophia" / "flow.yaml"

RAW_SCHEMA = """
    type: object
    properties:
      id: {type: string}
      n: {type: integer}
      data: {type: object}
      tags: {type: array}
      meta:
        type: object
        properties: {id: {type: string}}
        required: [id]
    required: [id, data, meta]
"""


def catalog_text(collections: str = "", captures: str = "", materializations: str = "", extra: str = "") -> str:
    base = f"""
collections:
  acme/events:
    schema:
{textwrap.indent(textwrap.dedent(RAW_SCHEMA).strip(), "      ")}
    key: [/id]
{collections}
captures:
{captures or "  {}"}
materializations:
{materializations or "  {}"}
{extra}
"""
    return base


def validate(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "pipeline", "validate", str(path)], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", **(env or {})}, cwd=tmp_path)


def test_sophia_catalog_is_valid() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(SOPHIA)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "sophia/sophia_raw_data" in result.stdout
    assert "sophia.sophia_processed_data" in result.stdout


def test_valid_minimal_catalog_lists_collections(tmp_path: Path) -> None:
    result = validate(tmp_path, catalog_text())
    assert result.returncode == 0, result.stderr
    assert "acme/events" in result.stdout


HTTP_CAPTURE = """
  acme/poll:
    endpoint:
      http: {{url: "http://127.0.0.1:1/x"}}
    interval: {interval}
    bindings:
      - target: {target}
"""

BROKEN: dict[str, tuple[str, str]] = {
    "bad duration": (
        catalog_text(captures=HTTP_CAPTURE.format(interval="30x", target="acme/events")),
        "captures.acme/poll.interval: '30x' is not a duration",
    ),
    "unknown connector": (
        catalog_text(captures="""
  acme/poll:
    endpoint: {ftp: {}}
    bindings: [{target: acme/events}]
"""),
        "captures.acme/poll.endpoint.ftp: unknown connector 'ftp'; valid: files, http, prometheus",
    ),
    "binding to undeclared collection": (
        catalog_text(captures=HTTP_CAPTURE.format(interval="5m", target="acme/nope")),
        "captures.acme/poll.bindings[0].target: 'acme/nope' is not a declared collection",
    ),
    "unknown top-level field": (
        catalog_text(extra="colections: {}"),
        "colections: unknown field",
    ),
    "unknown collection field": (
        catalog_text(collections="""
  acme/other:
    schema: {type: object, properties: {id: {type: string}}, required: [id]}
    key: [/id]
    partition: 3
"""),
        "collections.acme/other.partition: unknown field",
    ),
    "key not required": (
        catalog_text(collections="""
  acme/other:
    schema: {type: object, properties: {id: {type: string}}}
    key: [/id]
"""),
        "collections.acme/other.key[0]: '/id': property 'id' must be required",
    ),
    "key not scalar": (
        catalog_text(collections="""
  acme/other:
    schema: {type: object, properties: {id: {type: object}}, required: [id]}
    key: [/id]
"""),
        "collections.acme/other.key[0]: '/id' must point at a scalar",
    ),
    "key not a property": (
        catalog_text(collections="""
  acme/other:
    schema: {type: object, properties: {id: {type: string}}, required: [id]}
    key: [/nope]
"""),
        "collections.acme/other.key[0]: '/nope': 'nope' is not a property",
    ),
    "key not a pointer": (
        catalog_text(collections="""
  acme/other:
    schema: {type: object, properties: {id: {type: string}}, required: [id]}
    key: [id]
"""),
        "collections.acme/other.key: Value error, 'id' is not a JSON pointer".replace("Value error, ", ""),
    ),
    "missing schema file": (
        catalog_text(collections="""
  acme/other:
    schema: schemas/missing.yaml
    key: [/id]
"""),
        "collections.acme/other.schema: cannot read schema file",
    ),
    "unset variable": (
        catalog_text(captures="""
  acme/poll:
    endpoint:
      http: {url: "${ACME_URL}"}
    bindings: [{target: acme/events}]
"""),
        "captures.acme/poll.endpoint.http.url: environment variable ACME_URL is not set",
    ),
    "two connectors in one endpoint": (
        catalog_text(captures="""
  acme/poll:
    endpoint: {http: {}, files: {}}
    bindings: [{target: acme/events}]
"""),
        "captures.acme/poll.endpoint: name exactly one connector",
    ),
    "materialization source undeclared": (
        catalog_text(materializations="""
  acme/pg:
    endpoint: {postgres: {}}
    bindings: [{source: acme/missing, resource: {table: t}}]
"""),
        "materializations.acme/pg.bindings[0].source: 'acme/missing' is not a declared collection",
    ),
    "invalid YAML": ("collections: [\n  - a: b\n  c", "not valid YAML"),
    "partitions out of range": (
        catalog_text(collections="""
  acme/other:
    schema: {type: object, properties: {id: {type: string}}, required: [id]}
    key: [/id]
    partitions: 0
"""),
        "collections.acme/other.partitions: Input should be greater than or equal to 1",
    ),
    "bad collection name": (
        catalog_text(collections="""
  "acme/bad name!":
    schema: {type: object, properties: {id: {type: string}}, required: [id]}
    key: [/id]
"""),
        "collections.acme/bad name!: 'acme/bad name!' is not a valid collection name",
    ),
    "derivation from undeclared source": (
        catalog_text(collections="""
  acme/derived:
    schema: {type: object, properties: {id: {type: string}}, required: [id]}
    key: [/id]
    derive:
      using: {sqlite: {}}
      transforms:
        - {name: t, source: acme/ghost, lambda: "SELECT id FROM ghost"}
"""),
        "collections.acme/derived.derive.transforms[0].source: 'acme/ghost' is not a declared collection",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_catalog_exits_2_naming_the_place(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    result = validate(tmp_path, text)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expected in result.stderr, result.stderr


def test_unknown_connector_lists_known_ones(tmp_path: Path) -> None:
    result = validate(tmp_path, BROKEN["unknown connector"][0])
    for name in ("http", "files", "prometheus"):
        assert name in result.stderr


def test_variables_and_defaults_are_interpolated(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(catalog_text(extra="kafka: {bootstrap_servers: '${BROKERS:-127.0.0.1:1234}', client_id: 'x$${y}'}"))
    assert load_catalog(path, env={}).kafka.bootstrap_servers == "127.0.0.1:1234"
    loaded = load_catalog(path, env={"BROKERS": "10.0.0.1:9092"})
    assert loaded.kafka.bootstrap_servers == "10.0.0.1:9092"
    assert loaded.kafka.client_id == "x${y}"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(catalog_text(collections="""
  acme/a:
    schema: {type: object, properties: {id: {type: string}}}
    key: [/id]
  acme/b:
    schema: {type: object, properties: {id: {type: object}}, required: [id]}
    key: [/id]
"""))
    with pytest.raises(ConfigError) as err:
        load_catalog(path, env={})
    places = [p for p, _ in err.value.problems]
    assert places == ["collections.acme/a.key[0]", "collections.acme/b.key[0]"]


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), (7, 7)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30x", "", "m", "5 m", "-1", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)
