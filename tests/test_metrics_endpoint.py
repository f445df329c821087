"""A worker's /metrics: names per Prometheus' naming guide, and content negotiated as
prometheus_client's own handlers do (OpenMetrics for Prometheus, gzip, ``name[]``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from pipeline.telemetry import metrics
from pipeline.telemetry.server import Telemetry

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
"""What Prometheus 2.x sends when it scrapes."""

NAMES = {
    "localflow_input_documents": "counter", "localflow_output_documents": "counter",
    "localflow_input_bytes": "counter", "localflow_output_bytes": "counter",
    "localflow_dead_letter_documents": "counter", "localflow_errors": "counter",
    "localflow_archive_bytes": "counter", "localflow_task_restarts": "counter",
    "localflow_consumer_lag_documents": "gauge", "localflow_capture_lag_seconds": "gauge",
    "localflow_last_checkpoint_timestamp_seconds": "gauge", "localflow_task_info": "gauge",
    "localflow_task_up": "gauge", "localflow_batch_documents": "histogram",
    "localflow_batch_duration_seconds": "histogram", "localflow_end_to_end_latency_seconds": "histogram",
}


@pytest.fixture
async def url() -> AsyncIterator[str]:
    telemetry = Telemetry({"t/checkpointed": "materialization"})
    await telemetry.start("127.0.0.1", 0)
    metrics.checkpointed("t/checkpointed")
    metrics.BATCH_SIZE.labels("t/checkpointed").observe(10)
    try:
        yield f"{telemetry.url}/metrics"
    finally:
        await telemetry.stop()


async def test_every_metric_is_named_with_its_unit_last(url: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)
                if f.name.startswith("localflow_") and not f.name.endswith("_created")}  # the text format's creation times
    assert families == NAMES
    samples = {s.name for f in text_string_to_metric_families(response.text) for s in f.samples}
    assert {"localflow_batch_documents_bucket", "localflow_last_checkpoint_timestamp_seconds"} <= samples


async def test_prometheus_gets_openmetrics(url: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(url, headers={"Accept": PROMETHEUS_ACCEPT})
    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(response.text)}
    checkpoint = families["localflow_last_checkpoint_timestamp_seconds"].samples
    assert [s.labels for s in checkpoint if s.labels.get("task") == "t/checkpointed"] == [{"task": "t/checkpointed"}]


async def test_gzip_when_accepted_and_only_the_names_asked_for(url: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(url, params={"name[]": "localflow_task_up"},
                                    headers={"Accept-Encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert [f.name for f in text_string_to_metric_families(response.text)] == ["localflow_task_up"]
