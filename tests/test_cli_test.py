"""`localflow test`: a catalog's `tests:` run against the real broker, in topics of their own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from pipeline.embedded.services import free_port
from pipeline.runtime.catalog import KafkaConfig
from tests.support.cli import DOC_SCHEMA, cli_env, localflow, write_catalog
from tests.support.workers import ROOT


def catalog_with_tests(tmp_path: Path, name: str, tests: dict[str, Any]) -> Path:
    return write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {f"{name}/events": {"schema": DOC_SCHEMA, "key": ["/id"], "partitions": 2}},
        "tests": tests,
    })


def steps(name: str, ingest: list[dict[str, Any]], verify: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"ingest": {"collection": f"{name}/events", "documents": ingest}},
            {"verify": {"collection": f"{name}/events", "documents": verify}}]


async def topics(kafka_bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(**KafkaConfig(bootstrap_servers=kafka_bootstrap).client_options())
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_a_passing_test_exits_0(tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    docs = [{"id": "a", "n": 1}, {"id": "b", "n": 2}]
    result = localflow("test", str(catalog_with_tests(tmp_path, name, {"round-trip": steps(name, docs, docs)})))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS round-trip (2 steps" in result.stdout
    assert "1 passed, 0 failed" in result.stdout


def test_each_failing_document_is_shown_as_a_diff(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    ingest = [{"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "extra", "n": 0}]
    verify = [{"id": "a", "n": 1}, {"id": "b", "n": 3}, {"id": "gone", "n": 4}]
    result = localflow("test", str(catalog_with_tests(tmp_path, name, {"diffs": steps(name, ingest, verify)})))
    assert result.returncode == 1
    out = result.stdout
    assert f"FAIL diffs: step 2 (verify {name}/events)" in out
    assert 'document ["b"]: differs\n    /n: expected 3, actual 2' in out
    assert 'document ["gone"]: missing; expected {"id":"gone","n":4}' in out
    assert 'document ["extra"]: unexpected {"id":"extra","n":0}' in out
    assert 'document ["a"]' not in out
    assert "0 passed, 1 failed" in out


def test_an_invalid_ingest_document_fails_the_test_saying_why(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    tests = {"bad-input": steps(name, [{"id": "a", "n": "one"}], [{"id": "a", "n": 1}])}
    result = localflow("test", str(catalog_with_tests(tmp_path, name, tests)))
    assert result.returncode == 1
    assert "FAIL bad-input: step 1" in result.stdout
    assert "ingest document 1 is not a valid" in result.stdout and "/n" in result.stdout


async def test_tests_write_only_to_their_own_topics_and_remove_them(
        tmp_path: Path, services_env: dict[str, str], kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    name = unique_name()
    before = await topics(kafka_bootstrap)
    docs = [{"id": "a", "n": 1}]
    result = localflow("test", str(catalog_with_tests(tmp_path, name, {"t1": steps(name, docs, docs),
                                                                         "t2": steps(name, docs, docs)})))
    assert result.returncode == 0, result.stdout + result.stderr
    after = await topics(kafka_bootstrap)
    assert not any(name in t for t in after), "no production topic of the catalog was created"
    assert not {t for t in after - before if t.startswith("localflow_test_")}, "test topics are deleted"


def test_the_sophia_enrichment_test_runs_the_sqlite_derivation_and_passes(services_env: dict[str, str]) -> None:
    result = localflow("test", str(ROOT / "examples/sophia/flow.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS sophia/enrichment (2 steps" in result.stdout


def test_a_derivation_that_does_not_produce_the_expected_documents_fails_with_a_diff(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {
            f"{name}/events": {"schema": DOC_SCHEMA, "key": ["/id"]},
            f"{name}/doubled": {"schema": DOC_SCHEMA, "key": ["/id"], "derive": {
                "using": {"sqlite": {}},
                "transforms": [{"name": "double", "source": f"{name}/events",
                                "lambda": "SELECT id, n * 2 AS n FROM events"}]}},
        },
        "tests": {"doubling": [
            {"ingest": {"collection": f"{name}/events", "documents": [{"id": "a", "n": 1}, {"id": "b", "n": 5}]}},
            {"verify": {"collection": f"{name}/doubled", "documents": [{"id": "a", "n": 2}, {"id": "b", "n": 11}]}},
        ]},
    })
    result = localflow("test", str(catalog), "--timeout", "60")
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'document ["b"]: differs\n    /n: expected 11, actual 10' in result.stdout
    assert 'document ["a"]' not in result.stdout


def test_with_no_broker_configured_the_tests_run_on_an_embedded_one(tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env().items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    result = localflow("test", str(ROOT / "examples/sophia/flow.yaml"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "no broker configured (KAFKA_BOOTSTRAP_SERVERS is not set): testing on an embedded broker"]
    assert result.stdout.splitlines()[-1] == "1 passed, 0 failed"


def test_an_unreachable_broker_is_one_error_line_and_the_hint(tmp_path: Path, unique_name: Callable[..., str]) -> None:
    name, kafka = unique_name(), f"127.0.0.1:{free_port()}"
    docs = [{"id": "a", "n": 1}]
    catalog = catalog_with_tests(tmp_path, name, {"t": steps(name, docs, docs)})
    result = localflow("test", str(catalog), env=cli_env(KAFKA_BOOTSTRAP_SERVERS=kafka))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: no Kafka broker answers at {kafka}",
                                          "no broker? try localflow demo --keep-services"], "no unclosed producer"
