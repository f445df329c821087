"""The `prometheus` capture against prometheus_client's own exporter and the real broker.

Each test runs the capture task for real (`supervise`) against real targets (the exporter on
a free loopback port with a private registry; an aiohttp server for a body that is not
Prometheus text; a closed port for a target that is down), then reads the collection back.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from connectors.prometheus.config import PrometheusConfig
from connectors.prometheus.parse import series_id
from pipeline.runtime.catalog import Catalog, load_catalog, topic_of
from pipeline.runtime.collection import read_to_end
from pipeline.runtime.registry import load_connector
from tests.support.tasks import running
from tests.support.waiting import wait_for_async

RAW_SCHEMA = str(Path(__file__).resolve().parent.parent / "examples/sophia/schemas/raw.schema.yaml")
"""The SPEC's raw document schema, which every capture writes."""


@contextmanager
def exporter(registry: CollectorRegistry) -> Iterator[str]:
    """prometheus_client's exporter on a free loopback port; yields its /metrics URL."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@asynccontextmanager
async def not_metrics_server(body: str) -> AsyncIterator[str]:
    """A real server whose /metrics answers 200 with an HTML page."""
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"
    finally:
        await runner.cleanup()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"


def make_catalog(tmp_path: Path, kafka: str, collection: str, capture: str, endpoint: dict[str, Any]) -> Catalog:
    doc = {
        "kafka": {"bootstrap_servers": kafka},
        "collections": {collection: {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}},
        "captures": {capture: {"interval": "200ms", "endpoint": {"prometheus": {"timeout": "200ms", **endpoint}},
                               "bindings": [{"target": collection}]}},
    }
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_catalog(path, env={})


async def documents(catalog: Catalog, topic: str) -> list[dict[str, Any]]:
    return [r.doc for r in await read_to_end(catalog.kafka, topic)]


async def wait_for_docs(catalog: Catalog, collection: str, predicate: Callable[[list[dict[str, Any]]], bool],
                        message: str) -> list[dict[str, Any]]:
    """The collection's documents once ``predicate`` holds for them."""
    async def check() -> list[dict[str, Any]] | None:
        docs = await documents(catalog, topic_of(collection))
        return docs if predicate(docs) else None

    return await wait_for_async(check, timeout=30, interval=0.2, message=message)


def named(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["data"]["name"] == name]


def ups(docs: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    return [d for d in named(docs, "up") if d["metadata"]["target"] == target]


@pytest.fixture
def names(unique_name: Callable[..., str]) -> tuple[str, str]:
    """(collection, capture) names unique to the test."""
    base = unique_name("prom")
    return f"{base}/metrics", f"{base}/scrape"


@pytest.mark.parametrize("openmetrics", [True, False], ids=["openmetrics", "text"])
async def test_each_sample_lands_with_name_type_labels_value_and_its_series_id(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str], openmetrics: bool) -> None:
    collection, capture = names
    registry = CollectorRegistry()
    Counter("jobs", "Jobs run.", registry=registry).inc(3)
    Gauge("queue_depth", "Queued items.", ["queue"], registry=registry).labels("inbox").set(7)
    with exporter(registry) as target:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture,
                               {"targets": [target], "job": "sophia", "advanced": {"openmetrics": openmetrics}})
        async with running(catalog, capture):
            docs = await wait_for_docs(catalog, collection, lambda ds: named(ds, "queue_depth") and ups(ds, target),
                                       "a scrape of the exporter")
    instance = target.split("/")[2]
    [jobs, *_] = named(docs, "jobs_total")
    assert jobs["data"] == {"name": "jobs_total", "type": "counter", "value": 3.0,
                            "labels": {"job": "sophia", "instance": instance}}
    [depth, *_] = named(docs, "queue_depth")
    assert depth["data"]["type"] == "gauge" and depth["data"]["value"] == 7.0
    assert depth["data"]["labels"] == {"queue": "inbox", "job": "sophia", "instance": instance}
    assert depth["source"] == "sophia"
    assert depth["metadata"]["format"] == ("openmetrics" if openmetrics else "text")
    [up, *_] = ups(docs, target)
    assert up["data"]["value"] == 1.0 and "error" not in up["data"]
    for doc in docs:
        ms = round(datetime.fromisoformat(doc["timestamp"]).timestamp() * 1000)
        assert doc["metadata"]["id"] == series_id(target, doc["data"]["name"], doc["data"]["labels"], ms)


async def test_histogram_buckets_keep_their_le_labels(tmp_path: Path, kafka_bootstrap: str,
                                                      names: tuple[str, str]) -> None:
    collection, capture = names
    registry = CollectorRegistry()
    latency = Histogram("request_seconds", "Latency.", buckets=(0.1, 0.5), registry=registry)
    for seconds in (0.05, 0.3, 2.0):
        latency.observe(seconds)
    with exporter(registry) as target:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"targets": [target]})
        async with running(catalog, capture):
            docs = await wait_for_docs(catalog, collection, lambda ds: named(ds, "request_seconds_count"),
                                       "a scrape of the histogram")
    first_scrape = min(d["timestamp"] for d in named(docs, "request_seconds_bucket"))
    buckets = {d["data"]["labels"]["le"]: d["data"]["value"] for d in named(docs, "request_seconds_bucket")
               if d["timestamp"] == first_scrape}
    assert buckets == {"0.1": 1.0, "0.5": 2.0, "+Inf": 3.0}
    assert {d["data"]["type"] for d in named(docs, "request_seconds_bucket")} == {"histogram"}
    assert named(docs, "request_seconds_count")[0]["data"]["value"] == 3.0


async def test_nan_and_infinities_survive_the_json_round_trip(tmp_path: Path, kafka_bootstrap: str,
                                                              names: tuple[str, str]) -> None:
    collection, capture = names
    registry = CollectorRegistry()
    odd = Gauge("odd_value", "Values JSON has no number for.", ["case"], registry=registry)
    for case, value in (("nan", float("nan")), ("pos", float("inf")), ("neg", float("-inf")), ("plain", 1.5)):
        odd.labels(case).set(value)
    with exporter(registry) as target:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"targets": [target]})
        async with running(catalog, capture):
            docs = await wait_for_docs(catalog, collection, lambda ds: len(named(ds, "odd_value")) >= 4,
                                       "a scrape of odd values")
    seen = {d["data"]["labels"]["case"]: (d["data"]["value"], d["data"].get("value_text"))
            for d in named(docs, "odd_value")}
    assert seen == {"nan": (None, "NaN"), "pos": (None, "+Inf"), "neg": (None, "-Inf"), "plain": (1.5, None)}


async def test_down_target_gives_up_zero_and_the_capture_goes_on(tmp_path: Path, kafka_bootstrap: str,
                                                                 names: tuple[str, str]) -> None:
    collection, capture = names
    registry = CollectorRegistry()
    Gauge("alive", "Alive.", registry=registry).set(1)
    down = closed_port_url()
    with exporter(registry) as live:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"targets": [down, live]})
        async with running(catalog, capture) as ctx:
            docs = await wait_for_docs(catalog, collection,
                                       lambda ds: len(ups(ds, down)) >= 2 and len(named(ds, "alive")) >= 2,
                                       "two scrapes of both targets")
    assert {d["data"]["value"] for d in ups(docs, down)} == {0.0}
    assert all(d["data"]["error"] for d in ups(docs, down))
    assert {d["data"]["value"] for d in ups(docs, live)} == {1.0}
    assert ctx.status.restarts == 0


async def test_body_that_is_not_prometheus_text_is_a_dead_letter_naming_the_target(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names
    page = "<html><body>Welcome to nginx!</body></html>"
    async with not_metrics_server(page) as target:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"targets": [target]})
        async with running(catalog, capture) as ctx:
            docs = await wait_for_docs(catalog, collection, lambda ds: len(ups(ds, target)) >= 2,
                                       "two scrapes of the target")
    dead = await documents(catalog, topic_of(collection) + ".dead")
    assert dead and all(target in d["error"] and d["original"] == page for d in dead)
    assert {d["data"]["value"] for d in ups(docs, target)} == {0.0}
    assert "not Prometheus" in ups(docs, target)[0]["data"]["error"]
    assert ctx.status.restarts == 0


@pytest.mark.parametrize(("honor_labels", "expected"), [
    (True, {"job": "app", "instance": None}),
    (False, {"job": "sophia", "exported_job": "app", "instance": None}),
], ids=["honored", "exported"])
async def test_honor_labels_decides_a_conflict_with_target_labels(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str], honor_labels: bool,
        expected: dict[str, Any]) -> None:
    collection, capture = names
    registry = CollectorRegistry()
    Gauge("pushed", "From a pushgateway-like exporter.", ["job"], registry=registry).labels("app").set(1)
    with exporter(registry) as target:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture,
                               {"targets": [target], "job": "sophia", "honor_labels": honor_labels})
        async with running(catalog, capture):
            docs = await wait_for_docs(catalog, collection, lambda ds: named(ds, "pushed"), "a scrape")
    expected["instance"] = target.split("/")[2]
    assert named(docs, "pushed")[0]["data"]["labels"] == expected


def test_sample_id_is_the_same_for_the_same_series_and_time_only() -> None:
    target = "http://127.0.0.1:9/metrics"
    one = series_id(target, "x", {"a": "1", "b": "2"}, 1_700_000_000_000)
    assert one == series_id(target, "x", {"b": "2", "a": "1"}, 1_700_000_000_000)
    assert one != series_id(target, "x", {"a": "1", "b": "2"}, 1_700_000_000_001)
    assert one != series_id(target, "x", {"a": "1", "b": "3"}, 1_700_000_000_000)
    assert one != series_id("http://127.0.0.1:10/metrics", "x", {"a": "1", "b": "2"}, 1_700_000_000_000)


async def test_doctor_reports_each_target() -> None:
    registry = CollectorRegistry()
    Gauge("alive", "Alive.", registry=registry).set(1)
    down = closed_port_url()
    with exporter(registry) as live:
        async with not_metrics_server("<html></html>") as html:
            checks = await load_connector("prometheus").doctor(PrometheusConfig(targets=[live, down, html]))
    assert [(c.name, c.ok) for c in checks] == [(f"prometheus {live}", True), (f"prometheus {down}", False),
                                                (f"prometheus {html}", False)]
    assert "unreachable" in checks[1].detail and "not Prometheus" in checks[2].detail
