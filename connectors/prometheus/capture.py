"""The `prometheus` capture: scrape every target each interval; one document per sample, plus `up`.

A polling source: nothing to resume from but the time, so the state is only the last scrape
time per target (``{"version": 1, "last_scrape": {target: RFC 3339}}``). A target that is
down or answers garbage never stops the capture: its scrape yields ``up`` 0 (and, for a body
that is not Prometheus text, a dead letter), and the others go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from connectors.prometheus.config import PrometheusConfig
from connectors.prometheus.parse import (
    NotExposition,
    Sample,
    parse,
    series_id,
    value_fields,
    with_target_labels,
)
from pipeline.sdk import httpclient
from pipeline.sdk.capture import Captured
from pipeline.sdk.connector import Check
from pipeline.sdk.errors import describe
from pipeline.telemetry import metrics

STATE_VERSION = 1
_ACCEPT_OPENMETRICS = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                       "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
_ACCEPT_TEXT = "text/plain;version=0.0.4;q=1.0,*/*;q=0.1"


class ScrapeFailed(Exception):
    """A scrape gave no samples (up 0); ``body`` is kept when it must become a dead letter."""

    def __init__(self, error: str, size: int = 0, body: bytes | None = None) -> None:
        super().__init__(error)
        self.size = size
        self.body = body


@dataclass
class Scrape:
    """What one scrape of one target gave."""

    documents: list[dict[str, Any]] = field(default_factory=list)
    dead: list[tuple[int, str, bytes]] = field(default_factory=list)
    size: int = 0


class PrometheusCapture(httpclient.PollingCapture):
    """Scrapes all targets concurrently each interval; one ``Captured`` per target."""

    config: PrometheusConfig

    def new_client(self) -> httpx.AsyncClient:
        return _client(self.config)

    async def run(self, state: dict[str, Any] | None) -> AsyncIterator[Captured]:
        last = dict((state or {}).get("last_scrape", {}))
        job = self.config.job or self.ctx.name
        while True:
            started = time.monotonic()
            scrape_ms = int(time.time() * 1000)
            scrapes = await asyncio.gather(*(self._scrape(t, job, scrape_ms) for t in self.config.targets))
            for target, scrape in zip(self.config.targets, scrapes, strict=True):
                last[target] = _rfc3339(scrape_ms / 1000)
                yield Captured(documents=[(0, d) for d in scrape.documents],
                               dead=scrape.dead,
                               state={"version": STATE_VERSION, "last_scrape": dict(last)}, source_bytes=scrape.size)
            if not await self.ctx.sleep(max(0.0, self.spec.interval - (time.monotonic() - started))):
                return

    async def _scrape(self, target: str, job: str, scrape_ms: int) -> Scrape:
        target_labels = {"job": job, "instance": httpx.URL(target).netloc.decode()}
        honor = self.config.honor_labels
        out = Scrape()
        try:
            fmt, samples, out.size = await read(self.client, target, self.config)
        except ScrapeFailed as e:
            self.ctx.log.warning("scrape of %s failed: %s", target, e)
            metrics.ERRORS.labels(self.ctx.name, "source").inc()
            out.size = e.size
            if e.body is not None:
                out.dead.append((0, str(e), e.body))
            up = _document(target, job, None, Sample("up", "gauge", {}, 0.0, None), target_labels, honor, scrape_ms)
            up["data"]["error"] = str(e)
        else:
            out.documents = [_document(target, job, fmt, s, target_labels, honor, scrape_ms) for s in samples]
            up = _document(target, job, None, Sample("up", "gauge", {}, 1.0, None), target_labels, honor, scrape_ms)
        out.documents.append(up)
        return out


def _client(config: PrometheusConfig) -> httpx.AsyncClient:
    headers = {"Accept": _ACCEPT_OPENMETRICS if config.advanced.openmetrics else _ACCEPT_TEXT,
               "X-Prometheus-Scrape-Timeout-Seconds": f"{config.timeout:g}"}
    return httpclient.client(headers, config.bearer(), config.timeout, config.advanced.verify_tls)


async def read(client: httpx.AsyncClient, target: str, config: PrometheusConfig) -> tuple[str, list[Sample], int]:
    """The format, samples and body size of one scrape; ScrapeFailed says why there are none."""
    try:
        response, body = await _fetch(client, target, config)
    except (httpx.TransportError, TimeoutError, httpclient.BodyTooLarge) as e:
        raise ScrapeFailed(f"unreachable: {describe(e)}") from e
    if response.status_code != 200:
        raise ScrapeFailed(f"HTTP {response.status_code} {response.reason_phrase}", len(body))
    try:
        fmt, samples = parse(body, response.headers.get("content-type", ""))
    except NotExposition as e:
        raise ScrapeFailed(f"target {target}: {e}", len(body), body) from e
    return fmt, samples, len(body)


async def _fetch(client: httpx.AsyncClient, target: str, config: PrometheusConfig) -> tuple[httpx.Response, bytes]:
    """GET a target within the timeout, refusing a body over advanced.max_body_bytes."""
    async with asyncio.timeout(config.timeout), client.stream("GET", target) as response:
        return response, await httpclient.read_limited(response, config.advanced.max_body_bytes,
                                                       "advanced.max_body_bytes")


def _document(target: str, job: str, fmt: str | None, sample: Sample, target_labels: dict[str, str],
              honor_labels: bool, scrape_ms: int) -> dict[str, Any]:
    """The document of one sample (``fmt`` None for the synthetic ``up``)."""
    ms = scrape_ms if sample.timestamp is None else round(sample.timestamp * 1000)
    labels = with_target_labels(sample.labels, target_labels, honor_labels)
    metadata = {"id": series_id(target, sample.name, labels, ms), "target": target}
    if fmt is not None:
        metadata["format"] = fmt
    return {
        "timestamp": _rfc3339(ms / 1000),
        "source": job,
        "data": {"name": sample.name, "type": sample.type, "labels": labels, **value_fields(sample.value)},
        "metadata": metadata,
    }


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def doctor(config: PrometheusConfig) -> list[Check]:
    """Does each target answer with Prometheus text? (The token is never shown.)"""
    checks = []
    async with _client(config) as client:
        for target in config.targets:
            try:
                fmt, samples, _ = await read(client, target, config)
            except ScrapeFailed as e:
                checks.append(Check(f"prometheus {target}", False, str(e)))
            else:
                checks.append(Check(f"prometheus {target}", True, f"{len(samples)} samples ({fmt})"))
    return checks
