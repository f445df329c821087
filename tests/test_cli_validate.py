"""The first hour with the CLI: --version, -h, readable usage lines, `validate` reporting every problem
at once at its file:line:column, `--output json`, `localflow schema` and the generated reference,
and schemas validated by a JSON Schema 2020-12 engine."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema_rs
import orjson
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.runtime.catalog import read_yaml
from pipeline.runtime.collection import Collection
from pipeline.sdk.errors import ValidationFailed

ROOT = Path(__file__).resolve().parent.parent
SOPHIA = ROOT / "examples" / "sophia" / "flow.yaml"
REFERENCE = ROOT / "docs" / "reference.md"


def localflow(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"}, timeout=60, check=False)


def help_of(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "-h"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------ app options

def test_version_prints_the_package_version_and_exits_0() -> None:
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        result = localflow(flag)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"localflow {version('localflow')}\n"


def test_dash_h_is_help_for_the_app_and_every_command() -> None:
    assert help_of().startswith("Usage: localflow [OPTIONS] COMMAND [ARGS]...")
    for name in commands():
        assert help_of(name).startswith(f"Usage: localflow {name} [OPTIONS]"), name


def test_usage_lines_and_options_show_no_python_types() -> None:
    for name in commands():
        text = help_of(name)
        usage = text.splitlines()[0]
        assert "{" not in usage and "<" not in usage, usage
        python_type = r"<(?:str|int|float|bool|file|path|directory|datetime|list\[[^>]*\]|\w+ range|\w+(?:\|\w+)+)>"
        assert not re.search(python_type, text), (name, re.search(python_type, text))
    assert help_of("validate").splitlines()[0] == "Usage: localflow validate [OPTIONS] CATALOG"
    assert help_of("preview").splitlines()[0] == "Usage: localflow preview [OPTIONS] CATALOG COLLECTION"
    assert help_of("demo").splitlines()[0] == "Usage: localflow demo [OPTIONS] [CATALOG]"
    run = help_of("run")
    assert re.search(r"^  -t, --task TEXT +Run only this task", run, re.M), run
    assert re.search(r"^  --metrics-port INTEGER ", run, re.M), run
    assert re.search(r"^  --log-format \[text\|json\] ", run, re.M), run
    assert re.search(r"^  CATALOG +The catalog file", run, re.M), run


def test_preview_without_a_collection_names_the_form_to_use(tmp_path: Path) -> None:
    result = localflow("preview", str(SOPHIA))
    assert result.returncode == 2
    assert result.stderr == "error: name the collection to read: localflow preview CATALOG COLLECTION\n"


# ------------------------------------------------------------------------------------ validate

BROKEN = """\
collections:
  acme/events:
    schema:
      type: object
      properties:
        id: {type: strng}
      required: [id]
    keys: [/id]
    partitions: 0
  acme/other:
    schema: schemas/bad.yaml
    key: [/id]
captures:
  acme/poll:
    endpoint:
      http: {url: "http://127.0.0.1:1/x", timout: 3s}
    interval: 30s
    interval: 1m
    bindings:
      - target: acme/event
  acme/tail:
    endpoint: {file: {}}
    bindings: [{target: acme/events}]
kafka:
  security_protocol: PLAIN
"""

BAD_SCHEMA = """\
$schema: https://json-schema.org/draft/2020-12/schema
type: object
properties:
  id: {type: string}
  n: {type: integer, minimum: "0"}
required: id
"""


def broken_catalog(tmp_path: Path) -> Path:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "bad.yaml").write_text(BAD_SCHEMA)
    path = tmp_path / "flow.yaml"
    path.write_text(BROKEN)
    return path


def test_validate_reports_every_problem_in_one_pass_at_file_line_column(tmp_path: Path) -> None:
    broken_catalog(tmp_path)
    result = localflow("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: catalog flow.yaml is not valid (11 problems):",
        "  flow.yaml:2:3: collections.acme/events.key: required field is missing; "
        "see docs/reference.md#collectionspec",
        "  flow.yaml:6:20: collections.acme/events.schema.properties.id.type: 'strng' is not a JSON Schema type "
        "(did you mean 'string'?); valid: array, boolean, integer, null, number, object, string",
        "  flow.yaml:8:5: collections.acme/events.keys: unknown field 'keys' (did you mean 'key'?); "
        "valid: schema, key, partitions, replication_factor, retention, derive; see docs/reference.md#collectionspec",
        "  flow.yaml:9:17: collections.acme/events.partitions: Input should be greater than or equal to 1; got 0",
        "  flow.yaml:16:43: captures.acme/poll.endpoint.http.timout: unknown field 'timout' "
        "(did you mean 'timeout'?); valid: url, method, headers, token, timeout, advanced; "
        "see docs/reference.md#http-httpconfig",
        "  flow.yaml:18:5: captures.acme/poll.interval: duplicate key 'interval' (first at line 17); "
        "YAML allows each key once: remove one",
        "  flow.yaml:20:17: captures.acme/poll.bindings[0].target: 'acme/event' is not a declared collection "
        "(did you mean 'acme/events'?); valid: acme/events, acme/other",
        "  flow.yaml:22:16: captures.acme/tail.endpoint.file: unknown connector 'file' (did you mean 'files'?); "
        "valid: files, http, prometheus; see docs/reference.md#capture-connectors",
        "  flow.yaml:25:22: kafka.security_protocol: 'PLAIN' is not one of the choices "
        "(did you mean 'PLAINTEXT'?); valid: PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
        "  schemas/bad.yaml:5:31: collections.acme/other.schema.properties.n.minimum: "
        "not a valid JSON Schema: \"0\" is not of type \"number\"",
        "  schemas/bad.yaml:6:11: collections.acme/other.schema.required: "
        "not a valid JSON Schema: \"id\" is not of type \"array\"",
    ]


def test_validate_output_json_lists_each_problem_with_position_value_and_suggestion(tmp_path: Path) -> None:
    broken_catalog(tmp_path)
    result = localflow("validate", "flow.yaml", "--output", "json", cwd=tmp_path)
    assert result.returncode == 2
    body = orjson.loads(result.stdout)
    assert body["catalog"] == "flow.yaml"
    assert body["valid"] is False
    assert len(body["problems"]) == 11
    by_path = {p["path"]: p for p in body["problems"]}
    assert by_path["collections.acme/events.keys"] == {
        "file": "flow.yaml", "line": 8, "column": 5, "path": "collections.acme/events.keys",
        "message": "unknown field 'keys'", "did_you_mean": "key",
        "valid": ["schema", "key", "partitions", "replication_factor", "retention", "derive"],
        "reference": "docs/reference.md#collectionspec"}
    assert by_path["collections.acme/events.partitions"] == {
        "file": "flow.yaml", "line": 9, "column": 17, "path": "collections.acme/events.partitions",
        "message": "Input should be greater than or equal to 1; got 0", "value": 0}
    assert by_path["collections.acme/other.schema.properties.n.minimum"]["value"] == "0"
    assert by_path["collections.acme/other.schema.properties.n.minimum"]["file"] == "schemas/bad.yaml"


def test_validate_output_json_of_a_valid_catalog() -> None:
    result = localflow("validate", str(SOPHIA), "-o", "json")
    assert result.returncode == 0, result.stderr
    body = orjson.loads(result.stdout)
    assert body["valid"] is True and body["problems"] == []
    assert body["collections"]["sophia/sophia_processed_data"]["derived_from"] == ["sophia/sophia_raw_data"]
    assert body["captures"]["sophia/metrics"]["interval_seconds"] == 30
    assert body["materializations"]["sophia/postgres"]["connector"] == "postgres"


def test_an_unset_variable_is_one_problem_not_two(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text(textwrap.dedent("""\
        collections:
          acme/events:
            schema: {type: object, properties: {id: {type: string}}, required: [id]}
            key: [/id]
        captures:
          acme/poll:
            endpoint:
              http: {url: "${ACME_URL}"}
            bindings: [{target: acme/events}]
        """))
    result = localflow("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[1:] == [
        "  flow.yaml:8:19: captures.acme/poll.endpoint.http.url: environment variable ACME_URL is not set "
        "(write ${ACME_URL:-default} for a default)"]


def test_yaml_syntax_error_is_at_its_position(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text("collections:\n  acme/x: [1,\n  b: c\n")
    result = localflow("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert re.fullmatch(r"error: catalog flow\.yaml is not valid \(1 problem\):\n"
                        r"  flow\.yaml:\d+:\d+: not valid YAML: .+\n", result.stderr), result.stderr


def test_dates_stay_the_strings_they_were_written_as() -> None:
    assert read_yaml("a: 2025-01-06T10:00:00Z\nb: 2025-01-06\nc: yes\nd: 0o17\n", "f") == {
        "a": "2025-01-06T10:00:00Z", "b": "2025-01-06", "c": "yes", "d": 15}


# ------------------------------------------------------------------------------------ schemas (2020-12)

UNEVALUATED = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "allOf": [{"properties": {"id": {"type": "string"}}, "required": ["id"]}],
    "properties": {"n": {"type": "integer"}},
    "unevaluatedProperties": False,
}


def test_unevaluated_properties_false_rejects_the_document_it_forbids() -> None:
    collection = Collection("acme/strict", UNEVALUATED, ["/id"])
    collection.validate({"id": "a", "n": 1})  # `id` is evaluated by allOf, `n` by properties
    with pytest.raises(ValidationFailed) as err:
        collection.validate({"id": "a", "n": 1, "extra": True})
    assert str(err.value) == "acme/strict: / Unevaluated properties are not allowed ('extra' was unexpected)"
    with pytest.raises(ValidationFailed):
        collection.encode({"id": "a", "extra": True})


@pytest.mark.parametrize("value", ["2026-11-28 10:00:00Z", "2026-11-28T10:00:00+0000", "2026-11-28T10:00:00",
                                   "2026-11-28", "2026-02-30T10:00:00Z", "2026-11-28T10:00:00.Z"])
def test_date_time_is_rfc_3339_strictly(value: str) -> None:
    schema = {"type": "object", "properties": {"id": {"type": "string"}, "t": {"type": "string", "format": "date-time"}},
              "required": ["id"]}
    collection = Collection("acme/t", schema, ["/id"])
    collection.validate({"id": "a", "t": "2026-11-28T10:00:00.123Z"})
    collection.validate({"id": "a", "t": "2026-11-28t10:00:00+05:30"})
    with pytest.raises(ValidationFailed, match=r"^acme/t: /t must be date-time$"):
        collection.validate({"id": "a", "t": value})


# ------------------------------------------------------------------------------------ schema, reference

def test_schema_prints_a_2020_12_schema_that_accepts_the_example_and_rejects_a_typo() -> None:
    result = localflow("schema")
    assert result.returncode == 0, result.stderr
    schema = orjson.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema_rs.meta.validate(schema)
    validator = jsonschema_rs.validator_for(schema)
    written = read_yaml(SOPHIA.read_text(), str(SOPHIA))  # as an editor sees it: ${VAR} not yet replaced
    assert [e.message for e in validator.iter_errors(written)] == []
    written["collections"]["sophia/sophia_raw_data"]["keys"] = ["/id"]
    written["captures"]["sophia/metrics"]["endpoint"]["prometheus"]["timout"] = "5s"
    written["materializations"]["sophia/postgres"]["bindings"][0]["resource"]["tabel"] = "t"
    assert sorted(e.message for e in validator.iter_errors(written)) == [
        "Additional properties are not allowed ('keys' was unexpected)",
        "Additional properties are not allowed ('tabel' was unexpected)",
        "Additional properties are not allowed ('timout' was unexpected)",
    ]


def test_committed_reference_is_what_the_command_generates() -> None:
    result = localflow("schema", "--reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout == REFERENCE.read_text(), \
        "docs/reference.md is stale: run `localflow schema --reference > docs/reference.md`"


def test_reference_documents_every_field_with_a_description_and_a_default_or_example() -> None:
    text = REFERENCE.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    for row in rows:
        field, _type, default, description, example = [c.strip() for c in row.strip("|").split(" | ")]
        assert description, row
        assert default != "required" or example, row


def test_every_anchor_validate_points_at_exists_in_the_reference(tmp_path: Path) -> None:
    broken_catalog(tmp_path)
    result = localflow("validate", "flow.yaml", cwd=tmp_path)
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', REFERENCE.read_text()))
    pointed = set(re.findall(r"docs/reference\.md#([\w-]+)", result.stderr))
    assert pointed and pointed <= anchors
    links = set(re.findall(r"\]\(#([\w-]+)\)", REFERENCE.read_text()))
    assert links <= anchors, links - anchors


def test_an_entry_set_aside_does_not_hide_the_problems_of_the_others(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text(textwrap.dedent("""\
        collections:
          a/b:
            schema: {type: object}
            key: [/id]
          a/c:
            schema: 5
            key: [/id]
        """))
    result = localflow("validate", "flow.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[1:] == [
        "  flow.yaml:4:11: collections.a/b.key[0]: '/id': 'id' is not a property of the schema",
        "  flow.yaml:6:13: collections.a/c.schema: Input should be a valid dictionary or a valid string; got 5",
    ]
