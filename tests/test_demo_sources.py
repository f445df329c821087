"""The simulated Sophia sources of `localflow demo`: API auth and paging, log rotation, /metrics."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.embedded.demo_sources import RECORD_TYPES, AgentLogWriter, DemoMetrics, DemoSources
from tests.support.waiting import wait_for_async

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def sources(tmp_path: Path) -> AsyncIterator[DemoSources]:
    src = DemoSources(log_dir=tmp_path / "agents", token=TOKEN, rate=20.0, backlog=250, seed=7)
    await src.start()
    try:
        yield src
    finally:
        await src.stop()


async def _follow(client: httpx.AsyncClient, url: str) -> list[dict]:
    records: list[dict] = []
    while url:
        response = await client.get(url, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        records.extend(body["records"])
        url = body["next"]
    return records


async def test_api_refuses_requests_without_the_right_bearer_token(sources: DemoSources) -> None:
    async with httpx.AsyncClient() as client:
        missing = await client.get(sources.api_url)
        wrong = await client.get(sources.api_url, headers={"Authorization": "Bearer nope"})
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "SOPHIA_API_TOKEN" in missing.json()["message"]


async def test_api_next_links_reach_every_record_once_with_every_type(sources: DemoSources) -> None:
    async with httpx.AsyncClient() as client:
        records = await _follow(client, f"{sources.api_url}?limit=40")
    ids = [r["id"] for r in records]
    assert len(ids) >= 250
    assert len(set(ids)) == len(ids)
    assert {r["type"] for r in records} == set(RECORD_TYPES)
    assert [r["timestamp"] for r in records] == sorted(r["timestamp"] for r in records)
    confidences = [r["confidence"] for r in records if r["type"] == "agent_interaction"]
    assert confidences and all(0 <= c <= 1 for c in confidences)


async def test_api_link_header_and_cursor_param_give_the_same_page_as_the_next_link(sources: DemoSources) -> None:
    async with httpx.AsyncClient() as client:
        first = await client.get(sources.api_url, params={"limit": 10}, headers=AUTH)
        body = first.json()
        assert first.headers["Link"] == f'<{body["next"]}>; rel="next"'
        by_link = (await client.get(body["next"], headers=AUTH)).json()
        by_cursor = (await client.get(sources.api_url, params={"limit": 10, "cursor": body["next_cursor"]},
                                      headers=AUTH)).json()
    assert [r["id"] for r in by_link["records"]] == [r["id"] for r in by_cursor["records"]]
    assert not {r["id"] for r in by_link["records"]} & {r["id"] for r in body["records"]}


async def test_api_since_returns_only_records_created_after_it(sources: DemoSources) -> None:
    async with httpx.AsyncClient() as client:
        seen = await _follow(client, sources.api_url)
        since = max(r["timestamp"] for r in seen)

        async def newer() -> list[dict]:
            return await _follow(client, str(httpx.URL(sources.api_url, params={"since": since})))

        fresh = await wait_for_async(newer, timeout=10, message="records created after the first poll")
    assert all(r["timestamp"] > since for r in fresh)
    assert not {r["id"] for r in fresh} & {r["id"] for r in seen}


async def test_api_answers_400_for_a_cursor_it_did_not_issue(sources: DemoSources) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(sources.api_url, params={"cursor": "garbage"}, headers=AUTH)
    assert response.status_code == 400
    assert "cursor" in response.json()["message"]


def test_log_writer_rotates_files_by_rename_and_keeps_every_line(tmp_path: Path) -> None:
    writer = AgentLogWriter(tmp_path, rotate_bytes=2048, keep=1000, seed=3)
    writer.open()
    try:
        for _ in range(600):
            writer.write_line()
    finally:
        writer.close()
    files = sorted(tmp_path.iterdir())
    assert any(f.name.endswith(".log.1") for f in files) and any(f.name.endswith(".jsonl.1") for f in files)
    lines = [(f, line) for f in files for line in f.read_bytes().splitlines()]
    assert len(lines) == 600 == writer.lines
    plain = re.compile(rb"^\S+Z (DEBUG|INFO|WARNING|ERROR) \[[a-z-]+\] ")
    for f, line in lines:
        if ".jsonl" in f.name:
            assert orjson.loads(line)["level"] in ("debug", "info", "warning", "error")
        else:
            assert plain.match(line), line


def _values(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_serves_prometheus_text_whose_values_move() -> None:
    demo = DemoMetrics(seed=5)
    port = demo.serve("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        first = httpx.get(url).text
        demo.step()
        second = httpx.get(url).text
    finally:
        demo.shutdown()
    types = {f.type for f in text_string_to_metric_families(first)}
    assert {"counter", "gauge", "histogram"} <= types
    before, after = _values(first), _values(second)
    assert any(after[k] != v for k, v in before.items() if k in after)
