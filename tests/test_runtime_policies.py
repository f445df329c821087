"""The runtime owns the policies: errors drive the supervisor, the runtime checks the connectors'
contracts, and ``pipeline.sdk`` stays apart from the runtime.

The misbehaving connectors are a third-party package (tests/policy_probe.py) found through its
entry point, as any installed connector is; they run on the real broker.
"""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.runtime import registry
from pipeline.runtime.catalog import Catalog, load_catalog, topic_of
from pipeline.runtime.collection import read_to_end
from pipeline.runtime.task import TaskContext
from pipeline.sdk.context import CONTEXT_NAMES
from pipeline.telemetry import metrics
from pipeline.telemetry.server import Telemetry
from tests import policy_probe
from tests.support.tasks import running
from tests.support.waiting import wait_for_async
from tests.support.writing import produce

ROOT = Path(__file__).resolve().parent.parent
DRIVERS = ("aiokafka", "asyncpg", "redis", "aioboto3", "botocore")
SCHEMA = {"type": "object", "required": ["metadata"],
          "properties": {"metadata": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}}}


# ---------------------------------------------------------------------------- the import walk


def test_the_sdk_imports_no_driver_and_nothing_else_of_pipeline() -> None:
    code = ("import sys, pkgutil, importlib, pipeline.sdk\n"
            "for m in pkgutil.iter_modules(pipeline.sdk.__path__): importlib.import_module('pipeline.sdk.' + m.name)\n"
            "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert [m for m in loaded if m.split(".")[0] in DRIVERS] == []
    assert [m for m in loaded if m.startswith("pipeline.") and not m.startswith("pipeline.sdk")] == []


def _localflow_imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module of localflow (``pipeline``, ``connectors``, ``transforms``) a file imports, at any
    depth (TYPE_CHECKING blocks and imports inside functions included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 2:  # out of its own package: `from ..other`
            names = ["connectors." + "." * node.level + (node.module or "")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "pipeline" else [f"pipeline.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        yield from ((node.lineno, n) for n in names if n.split(".")[0] in ("pipeline", "connectors", "transforms"))


@pytest.mark.parametrize("package", ["connectors", "transforms", "pipeline/sdk"])
def test_connectors_and_engines_import_only_the_sdk(package: str) -> None:
    def own(path: Path, name: str) -> bool:  # of its own package: connectors.<its folder>, transforms
        parts = name.split(".")
        if package == "connectors":
            return "" not in parts and parts[:2] == list(path.relative_to(ROOT).parts[:2])
        return package == "transforms" and parts[0] == "transforms"

    wrong = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in sorted((ROOT / package).rglob("*.py"))
             for line, name in _localflow_imports(path) if not name.startswith("pipeline.sdk") and not own(path, name)]
    assert wrong == [], "these import more of localflow than pipeline.sdk:\n" + "\n".join(wrong)


def test_the_runtime_finds_connectors_through_entry_points_only() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in sorted((ROOT / "pipeline").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("connectors", "transforms"))
             or (isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("connectors", "transforms")
                                                      for a in node.names))]
    assert wrong == []
    assert registry.known_connectors("capture") == ["files", "http", "prometheus"]
    assert registry.known_connectors("materialization") == ["postgres", "redis", "s3"]


def test_a_connector_gets_a_context_of_six_names_and_uses_no_other(probe: None, tmp_path: Path) -> None:
    catalog = _catalog(tmp_path, "127.0.0.1:9", "narrow", sink="ok")
    ctx, task = TaskContext(catalog, "narrow/out", "materialization").for_connector()
    assert sorted(n for n in dir(ctx) if not n.startswith("_")) == sorted(CONTEXT_NAMES)
    assert task.spec is catalog.materializations["narrow/out"]
    assert list(task.collections) == ["narrow/docs"]
    assert task.collections["narrow/docs"].topic == topic_of("narrow/docs")
    # and no connector reaches past them (``ctx.X`` or ``self.ctx.X`` in its code)
    wrong = [f"{path.relative_to(ROOT)}:{node.lineno}: ctx.{node.attr}"
             for path in sorted((ROOT / "connectors").rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr not in CONTEXT_NAMES
             and ((isinstance(node.value, ast.Name) and node.value.id == "ctx")
                  or (isinstance(node.value, ast.Attribute) and node.value.attr == "ctx"))]
    assert wrong == []


# ---------------------------------------------------------------------------- errors drive the supervisor


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The probe package installed (its dist-info on sys.path) for the length of one test."""
    site = tmp_path / "site"
    policy_probe.install(site)
    monkeypatch.syspath_prepend(str(site))
    registry.clear()
    yield
    monkeypatch.undo()
    registry.clear()


def _catalog(tmp_path: Path, kafka_bootstrap: str, name: str, *, capture: str | None = None,
             sink: str | None = None, derived: dict[str, Any] | None = None, **extra: Any) -> Catalog:
    spec: dict[str, Any] = {"kafka": {"bootstrap_servers": kafka_bootstrap},
                            "collections": {f"{name}/docs": {"schema": SCHEMA, "key": ["/metadata/id"], "partitions": 1}}}
    if capture is not None:
        spec["captures"] = {f"{name}/in": {"interval": "100ms", "endpoint": {"probe": {"behaviour": capture}},
                                           "bindings": [{"target": f"{name}/docs", "resource": {}}]}}
    if derived is not None:
        spec["collections"][f"{name}/derived"] = derived
    if sink is not None:
        spec["materializations"] = {f"{name}/out": {"endpoint": {"probe-sink": {"behaviour": sink, **extra}},
                                                    "bindings": [{"source": f"{name}/docs", "resource": {}}]}}
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_catalog(path, env={})


async def test_a_config_error_stops_the_task_as_failed_and_it_is_not_restarted(
        probe: None, tmp_path: Path, kafka_bootstrap: str, unique_name: Any) -> None:
    name = unique_name("cfg")
    catalog = _catalog(tmp_path, kafka_bootstrap, name, capture="config_error")
    task = f"{name}/in"
    telemetry = Telemetry({task: "capture"})
    await telemetry.start("127.0.0.1", 0)
    try:
        async with running(catalog, task, restart_after=0.01) as ctx:
            await wait_for_async(lambda: ctx.status.failed, timeout=30, message="the task to stop as FAILED")
            async with httpx.AsyncClient() as client:
                ready = await client.get(f"{telemetry.url}/readyz")
                status = (await client.get(f"{telemetry.url}/status")).json()["tasks"][task]
            shown = await _localflow_status(tmp_path, catalog, telemetry.url)
            assert not ctx.status.running and ctx.status.restarts == 0 and policy_probe.RUNS[task] == 1
    finally:
        await telemetry.stop()
    assert ready.status_code == 503
    assert ready.json()["tasks"][task].startswith("FAILED: ConfigError: ")
    assert "misconfigured on purpose" in ready.json()["tasks"][task]
    assert status["state"] == "FAILED" and "misconfigured on purpose" in status["failed"]
    assert "FAILED" in shown and "misconfigured on purpose" in shown, shown
    assert metrics.TASK_FAILED.labels(task)._value.get() == 1
    assert metrics.ERRORS.labels(task, "config")._value.get() == 1


async def _localflow_status(tmp_path: Path, catalog: Catalog, worker: str) -> str:
    """What `localflow status --worker` prints (the probe found by the child through its entry point)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]), "COLUMNS": "200"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "status", str(catalog.path), "--worker", worker, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    finally:
        if process.returncode is None:  # timed out: not left running
            process.kill()
            await process.wait()
    return out.decode()


async def test_a_retriable_error_restarts_the_task(
        probe: None, tmp_path: Path, kafka_bootstrap: str, unique_name: Any) -> None:
    name = unique_name("flaky")
    catalog = _catalog(tmp_path, kafka_bootstrap, name, capture="flaky")
    async with running(catalog, f"{name}/in", restart_after=0.05) as ctx:
        await wait_for_async(lambda: ctx.status.running and ctx.status.connected, timeout=30,
                             message="the task to run again after its first failure")
        assert ctx.status.restarts == 1 and ctx.status.failed is None
        assert "down on its first run" in (ctx.status.last_error or "")
    docs = await read_to_end(catalog.kafka, topic_of(f"{name}/docs"), timeout=30)
    assert len(docs) == 3
    assert metrics.TASK_FAILED.labels(f"{name}/in")._value.get() == 0


async def test_restart_failed_retries_a_failed_task(
        probe: None, tmp_path: Path, kafka_bootstrap: str, unique_name: Any) -> None:
    name = unique_name("again")
    catalog = _catalog(tmp_path, kafka_bootstrap, name, capture="config_error")
    async with running(catalog, f"{name}/in", restart_failed=True, restart_after=0.05) as ctx:
        await wait_for_async(lambda: ctx.status.restarts >= 2, timeout=30, message="failed runs to be retried")
        assert ctx.status.failed is None  # retried, so not stopped for good


# ---------------------------------------------------------------------------- the runtime checks contracts


async def test_a_capture_item_with_documents_but_no_state_is_an_implementation_error(
        probe: None, tmp_path: Path, kafka_bootstrap: str, unique_name: Any) -> None:
    name = unique_name("nostate")
    catalog = _catalog(tmp_path, kafka_bootstrap, name, capture="stateless")
    async with running(catalog, f"{name}/in") as ctx:
        failed = await wait_for_async(lambda: ctx.status.failed, timeout=30, message="the task to stop as FAILED")
    assert failed.startswith("ImplementationError: Implementation error: ") and "without a state" in failed
    assert ctx.status.restarts == 0
    assert await read_to_end(catalog.kafka, topic_of(f"{name}/docs"), timeout=30) == [], \
        "nothing is written without a checkpoint"


async def test_an_engine_that_raises_is_an_implementation_error_and_loses_nothing(
        probe: None, tmp_path: Path, kafka_bootstrap: str, unique_name: Any) -> None:
    name = unique_name("engine")
    catalog = _catalog(tmp_path, kafka_bootstrap, name, derived={
        "schema": SCHEMA, "key": ["/metadata/id"], "partitions": 1,
        "derive": {"using": {"probe": {}}, "transforms": [{"name": "divide", "source": f"{name}/docs", "lambda": "x"}]}})
    await produce(catalog, f"{name}/docs", [{"metadata": {"id": str(i)}} for i in range(5)])
    async with running(catalog, f"{name}/derived", restart_after=0.01) as ctx:
        failed = await wait_for_async(lambda: ctx.status.failed, timeout=60, message="the derivation to stop as FAILED")
    assert failed.startswith("ImplementationError: Implementation error: engine probe of ")
    assert "ZeroDivisionError" in failed and "transform 'divide'" in failed and "MUST NOT raise" in failed
    assert ctx.status.restarts == 0
    assert await read_to_end(catalog.kafka, topic_of(f"{name}/derived"), timeout=30) == []
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"localflow.{name}/derived",
                                enable_auto_commit=False)
    await consumer.start()
    try:  # the batch the engine failed on is not committed: a fixed engine derives the same documents
        assert await consumer.committed(TopicPartition(topic_of(f"{name}/docs"), 0)) in (None, 0)
    finally:
        await consumer.stop()


def test_an_unknown_engine_is_a_catalog_problem_naming_the_known_ones(tmp_path: Path) -> None:
    spec = {"kafka": {"bootstrap_servers": "127.0.0.1:9"},
            "collections": {"a/docs": {"schema": SCHEMA, "key": ["/metadata/id"]},
                            "a/out": {"schema": SCHEMA, "key": ["/metadata/id"], "derive": {
                                "using": {"sqlit": {}}, "transforms": [{"name": "t", "source": "a/docs",
                                                                        "lambda": "SELECT 1"}]}}}}
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(path)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "collections.a/out.derive.using.sqlit" in text and "unknown engine 'sqlit'" in text, text
    assert "sqlite" in text and "python" in text, text


@pytest.mark.parametrize(("behaviour", "why"), [("beyond", "beyond the batch"), ("backwards", "went back")])
async def test_durable_offsets_outside_what_was_read_are_an_implementation_error(
        probe: None, tmp_path: Path, kafka_bootstrap: str, unique_name: Any, behaviour: str, why: str) -> None:
    name = unique_name(behaviour)
    catalog = _catalog(tmp_path, kafka_bootstrap, name, sink=behaviour)
    await produce(catalog, f"{name}/docs", [{"metadata": {"id": str(i)}} for i in range(5)])
    async with running(catalog, f"{name}/out") as ctx:
        if behaviour == "backwards":  # a second batch, whose offsets the probe turns back
            await wait_for_async(lambda: policy_probe.CALLS.get(f"{name}/out"), timeout=60, message="a first batch")
            await produce(catalog, f"{name}/docs", [{"metadata": {"id": str(i)}} for i in range(5)])
        failed = await wait_for_async(lambda: ctx.status.failed, timeout=60, message="the task to stop as FAILED")
    assert failed.startswith("ImplementationError: Implementation error: ") and why in failed, failed
    assert ctx.status.restarts == 0


async def test_backpressure_retries_the_same_batch_without_a_restart(
        probe: None, tmp_path: Path, kafka_bootstrap: str, unique_name: Any) -> None:
    name = unique_name("busy")
    catalog = _catalog(tmp_path, kafka_bootstrap, name, sink="backpressure")
    await produce(catalog, f"{name}/docs", [{"metadata": {"id": str(i)}} for i in range(5)])
    task = f"{name}/out"
    async with running(catalog, task) as ctx:
        await wait_for_async(lambda: ctx.status.documents == 5, timeout=60, message="the batch to be applied")
        assert policy_probe.CALLS[task] >= 2 and ctx.status.restarts == 0 and ctx.status.failed is None
    assert metrics.DOCS_OUT.labels(task, f"{name}/docs")._value.get() == 5, "the runtime counts what was applied"
