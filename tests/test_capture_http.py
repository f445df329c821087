"""The `http` capture against a real HTTP server (aiohttp, in the test) and the real broker.

Each test runs the capture task for real (`supervise`), then reads its collection back. The
server stands in for the Sophia API: what it answers is the test's `respond` function.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import REGISTRY

from connectors.http.capture import looked_back
from connectors.http.config import HttpConfig, HttpResource
from pipeline.runtime.catalog import Catalog, load_catalog, topic_of
from pipeline.runtime.checkpoint import KafkaCheckpoints, Presence
from pipeline.runtime.collection import read_to_end
from pipeline.runtime.registry import load_connector
from pipeline.sdk.errors import ConfigError
from tests.support.cli import cli_env, worker
from tests.support.sources import serve_on_loopback
from tests.support.tasks import running
from tests.support.waiting import wait_for_async

RAW_SCHEMA = str(Path(__file__).resolve().parent.parent / "examples/sophia/schemas/raw.schema.yaml")
"""The SPEC's raw document schema, which every capture writes."""

Respond = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float


class Api:
    """A real HTTP server on a free loopback port; ``respond(request, n)`` answers the n-th request."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[Seen] = []
        self.url = ""

    async def __aenter__(self) -> Api:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner, self.url = await serve_on_loopback(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Seen(request.path, dict(request.query), dict(request.headers), time.monotonic()))
        return await self.respond(request, len(self.requests))


def records(*ids: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "updated": i, "type": "agent_interaction"} for i in ids]


def since_filter(all_records: list[dict[str, Any]], request: web.Request) -> web.Response:
    """An incremental API: records whose `updated` is past the `since` query parameter."""
    since = int(request.query.get("since", "0"))
    return web.json_response({"records": [r for r in all_records if r["updated"] > since]})


INCREMENTAL = {"records": "/records", "id": "/id", "incremental": {"field": "/updated", "param": "since"}}


def make_catalog(tmp_path: Path, kafka: str, collection: str, capture: str, endpoint: dict[str, Any],
                 resource: dict[str, Any], interval: str = "200ms", env: dict[str, str] | None = None) -> Catalog:
    doc = {
        "kafka": {"bootstrap_servers": kafka},
        "collections": {collection: {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}},
        "captures": {capture: {"interval": interval, "endpoint": {"http": endpoint},
                               "bindings": [{"target": collection, "resource": resource}]}},
    }
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_catalog(path, env=env or {})


async def documents(catalog: Catalog, topic: str) -> list[dict[str, Any]]:
    return [r.doc for r in await read_to_end(catalog.kafka, topic)]


async def wait_for_ids(catalog: Catalog, collection: str, expected: set[str]) -> None:
    async def landed() -> bool:
        return expected <= {d["metadata"]["id"] for d in await documents(catalog, topic_of(collection))}

    await wait_for_async(landed, timeout=30, interval=0.2, message=f"ids {sorted(expected)} in {collection}")


async def id_counts(catalog: Catalog, collection: str) -> Counter[str]:
    return Counter(d["metadata"]["id"] for d in await documents(catalog, topic_of(collection)))


def errors(task: str, kind: str) -> float:
    return REGISTRY.get_sample_value("localflow_errors_total", {"task": task, "kind": kind}) or 0.0


@pytest.fixture
def names(unique_name: Callable[..., str]) -> tuple[str, str]:
    """(collection, capture) names unique to the test."""
    base = unique_name("http")
    return f"{base}/records", f"{base}/capture"


PAGES = [records(1, 2, 3), records(4, 5, 6), records(7)]


async def paged_by_next_link(request: web.Request, n: int) -> web.Response:
    page = int(request.query.get("page", "1"))
    nxt = f"/api?page={page + 1}" if page < len(PAGES) else None
    return web.json_response({"records": PAGES[page - 1], "next": nxt})


async def paged_by_link_header(request: web.Request, n: int) -> web.Response:
    page = int(request.query.get("page", "1"))
    headers = {"Link": f'<{request.url.with_query(page=page + 1)}>; rel="next"'} if page < len(PAGES) else {}
    return web.json_response({"records": PAGES[page - 1]}, headers=headers)


async def paged_by_cursor(request: web.Request, n: int) -> web.Response:
    page = int(request.query.get("cursor", "c1")[1:])
    nxt = f"c{page + 1}" if page < len(PAGES) else None
    return web.json_response({"records": PAGES[page - 1], "next_cursor": nxt})


@pytest.mark.parametrize(("respond", "pagination"), [
    (paged_by_next_link, {"type": "next_link", "pointer": "/next"}),
    (paged_by_link_header, {"type": "link_header"}),
    (paged_by_cursor, {"type": "cursor", "pointer": "/next_cursor", "param": "cursor"}),
], ids=["next_link", "link_header", "cursor"])
async def test_every_page_of_a_poll_lands_once_per_key(tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str],
                                                       respond: Respond, pagination: dict[str, Any]) -> None:
    collection, capture = names
    async with Api(respond) as api:
        # One poll only (a long interval, cut short by stopping): this API has no cursor, so a
        # second poll would capture the same records again (with the same keys).
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"},
                               {"records": "/records", "id": "/id", "pagination": pagination}, interval="1h")
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {f"r{i}" for i in range(1, 8)})
        assert await id_counts(catalog, collection) == Counter({f"r{i}": 1 for i in range(1, 8)})
        assert len(api.requests) == 3


async def test_incremental_cursor_resumes_from_the_checkpoint_after_a_restart(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names
    stored = records(1, 2, 3)

    async def respond(request: web.Request, n: int) -> web.Response:
        return since_filter(stored, request)

    async with Api(respond) as api:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"}, INCREMENTAL)
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {"r1", "r2", "r3"})
            await wait_for_async(lambda: any(r.query.get("since") == "3" for r in api.requests),
                                 message="a poll that asks for records since 3")
        assert "since" not in api.requests[0].query

        stored.extend(records(4, 5))
        api.requests.clear()
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {"r4", "r5"})
        assert api.requests[0].query.get("since") == "3"
        assert await id_counts(catalog, collection) == Counter({f"r{i}": 1 for i in range(1, 6)})


async def test_page_chain_cut_short_resumes_at_its_next_page_after_a_restart(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names
    newest_first = [records(9, 8, 7), records(6, 5, 4), records(3, 2, 1)]

    async def respond(request: web.Request, n: int) -> web.Response:
        if "since" in request.query:
            return web.json_response({"records": [], "next": None})  # nothing newer than r9
        page = int(request.query.get("page", "1"))
        nxt = f"/api?page={page + 1}" if page < 3 else None
        return web.json_response({"records": newest_first[page - 1], "next": nxt})

    async with Api(respond) as api:
        resource = {**INCREMENTAL, "pagination": {"type": "next_link", "pointer": "/next"}}
        # Two pages per poll and one poll per run (a long interval, cut short by stopping).
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture,
                               {"url": f"{api.url}/api", "advanced": {"max_pages": 2}}, resource, interval="1h")
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {f"r{i}" for i in range(4, 10)})
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {f"r{i}" for i in range(1, 10)})
        async with running(catalog, capture):
            await wait_for_async(lambda: len(api.requests) == 4, message="the third run's first request")
        assert [r.query for r in api.requests] == [{}, {"page": "2"}, {"page": "3"}, {"since": "9"}]
        assert await id_counts(catalog, collection) == Counter({f"r{i}": 1 for i in range(1, 10)})


async def test_429_is_retried_after_the_retry_after_delay(tmp_path: Path, kafka_bootstrap: str,
                                                          names: tuple[str, str]) -> None:
    collection, capture = names

    async def respond(request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "1"})
        return since_filter(records(1, 2), request)

    async with Api(respond) as api:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"}, INCREMENTAL)
        async with running(catalog, capture) as ctx:
            await wait_for_ids(catalog, collection, {"r1", "r2"})
        assert api.requests[1].at - api.requests[0].at >= 0.95
        assert await id_counts(catalog, collection) == Counter({"r1": 1, "r2": 1})
        assert ctx.status.restarts == 0


async def test_server_errors_and_timeouts_are_retried_with_backoff(tmp_path: Path, kafka_bootstrap: str,
                                                                   names: tuple[str, str]) -> None:
    collection, capture = names

    async def respond(request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.Response(status=500, text="boom")
        if n == 2:
            return web.Response(status=503, text="unavailable")
        if n == 3:
            await asyncio.sleep(1.5)  # longer than the capture's timeout
        return since_filter(records(1, 2, 3), request)

    async with Api(respond) as api:
        endpoint = {"url": f"{api.url}/api", "timeout": "300ms", "advanced": {"retry": {"initial_backoff": "50ms"}}}
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, endpoint, INCREMENTAL)
        async with running(catalog, capture) as ctx:
            await wait_for_ids(catalog, collection, {"r1", "r2", "r3"})
        assert len(api.requests) >= 4
        assert await id_counts(catalog, collection) == Counter({"r1": 1, "r2": 1, "r3": 1})
        assert ctx.status.restarts == 0
        assert errors(capture, "source") == 0


async def test_client_error_is_logged_with_url_and_status_and_the_capture_goes_on(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    collection, capture = names
    caplog.set_level(logging.WARNING, logger="localflow")

    async def respond(request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.json_response({"error": "bad token"}, status=401)
        return since_filter(records(1, 2), request)

    async with Api(respond) as api:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"}, INCREMENTAL)
        async with running(catalog, capture) as ctx:
            await wait_for_ids(catalog, collection, {"r1", "r2"})
        errors_logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(f"{api.url}/api" in m and "HTTP 401" in m for m in errors_logged), errors_logged
        assert errors(capture, "auth") == 1
        assert ctx.status.restarts == 0
        assert len(api.requests) >= 2  # the next poll went on


async def test_bearer_token_comes_from_the_environment_and_is_never_logged(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    collection, capture = names
    secret = "tok-" + hashlib.sha256(capture.encode()).hexdigest()
    caplog.set_level(logging.DEBUG)

    async def respond(request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.Response(status=500, text="boom")  # so the capture has something to log
        return since_filter(records(1), request)

    async with Api(respond) as api:
        endpoint = {"url": f"{api.url}/api", "token": "${SOPHIA_API_TOKEN}", "advanced": {"retry": {"initial_backoff": "50ms"}}}
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, endpoint, INCREMENTAL,
                               env={"SOPHIA_API_TOKEN": secret})
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {"r1"})
        assert {r.headers.get("Authorization") for r in api.requests} == {f"Bearer {secret}"}
        assert secret not in caplog.text
        assert secret not in repr(catalog.captures[capture].config)


async def test_body_that_is_not_json_becomes_a_dead_letter_and_the_capture_goes_on(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names
    page = "<html><body>down for maintenance</body></html>"

    async def respond(request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.Response(text=page, content_type="text/html")
        return since_filter(records(1), request)

    async with Api(respond) as api:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"}, INCREMENTAL)
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {"r1"})
        dead = await documents(catalog, topic_of(collection) + ".dead")
        assert len(dead) == 1
        assert f"{api.url}/api" in dead[0]["error"] and "not JSON" in dead[0]["error"]
        assert dead[0]["original"] == page


async def test_oversized_body_is_refused_and_the_capture_goes_on(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    collection, capture = names
    caplog.set_level(logging.WARNING, logger="localflow")

    async def respond(request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.json_response({"records": [{"id": "huge", "blob": "x" * 10_000}]})
        return since_filter(records(1), request)

    async with Api(respond) as api:
        endpoint = {"url": f"{api.url}/api", "advanced": {"max_body_bytes": 1024}}
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, endpoint, INCREMENTAL)
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {"r1"})
        assert "huge" not in await id_counts(catalog, collection)
        assert any("max_body_bytes=1024" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert errors(capture, "source") == 1


async def test_endless_page_chain_is_cut_per_poll_and_goes_on_at_the_next(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    collection, capture = names
    caplog.set_level(logging.WARNING, logger="localflow")

    async def respond(request: web.Request, n: int) -> web.Response:
        page = int(request.query.get("n", "1"))
        return web.json_response({"records": [{"id": f"p{page}"}], "next": f"/pages?n={page + 1}"})

    async with Api(respond) as api:
        endpoint = {"url": f"{api.url}/pages", "advanced": {"max_pages": 3}}
        resource = {"records": "/records", "id": "/id", "pagination": {"type": "next_link", "pointer": "/next"}}
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, endpoint, resource)
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {f"p{i}" for i in range(1, 8)})
        pages = [int(r.query.get("n", "1")) for r in api.requests]
        assert pages == list(range(1, len(pages) + 1))  # each poll went on where the last one stopped
        assert any("longer than advanced.max_pages=3" in r.getMessage() for r in caplog.records)
        assert set((await id_counts(catalog, collection)).values()) == {1}


async def test_record_becomes_a_raw_document_keyed_by_its_content_hash(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names
    dated = {"name": "dated", "at": "2026-01-02T03:04:05+02:00", "nested": {"b": 1, "a": [1, 2]}}
    undated = {"name": "undated", "at": "yesterday-ish"}

    async def respond(request: web.Request, n: int) -> web.Response:
        return web.json_response([dated, undated])

    async with Api(respond) as api:
        resource = {"timestamp": "/at", "source": "sophia_ai_platform"}
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/v1/records"},
                               resource, interval="1h")
        ids = {hashlib.sha256(orjson.dumps(r, option=orjson.OPT_SORT_KEYS)).hexdigest(): r for r in (dated, undated)}
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, set(ids))
        docs = {d["metadata"]["id"]: d for d in await documents(catalog, topic_of(collection))}
        for ident, record in ids.items():
            doc = docs[ident]
            assert doc["data"] == record
            assert doc["source"] == "sophia_ai_platform"
            assert doc["metadata"]["url"] == f"{api.url}/v1/records"
        by_name = {d["data"]["name"]: d for d in docs.values()}
        assert by_name["dated"]["timestamp"] == "2026-01-02T01:04:05Z"
        captured_at = datetime.fromisoformat(by_name["undated"]["timestamp"])
        assert by_name["undated"]["timestamp"].endswith("Z") and captured_at.tzinfo is not None


async def test_doctor_reports_a_refused_token_without_showing_it() -> None:
    async def respond(request: web.Request, n: int) -> web.Response:
        return web.json_response({"error": "expired"}, status=401)

    secret = "tok-never-shown"
    async with Api(respond) as api:
        checks = await load_connector("http").doctor(HttpConfig(url=f"{api.url}/v1/records", token=secret))
    assert [(c.name, c.ok) for c in checks] == [("http token", True), (f"http {api.url}/v1/records", False)]
    assert "HTTP 401" in checks[1].detail
    assert all(secret not in f"{c.name} {c.detail}" for c in checks)
    assert api.requests[0].headers["Authorization"] == f"Bearer {secret}"


async def test_record_without_its_id_is_a_dead_letter_and_the_others_land(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names

    async def respond(request: web.Request, n: int) -> web.Response:
        return web.json_response({"records": [{"id": "r1"}, {"name": "no id"}, {"id": "r3"}]})

    async with Api(respond) as api:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"},
                               {"records": "/records", "id": "/id"}, interval="1h")
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {"r1", "r3"})
        assert await id_counts(catalog, collection) == Counter({"r1": 1, "r3": 1})
        [dead] = await documents(catalog, topic_of(collection) + ".dead")
        assert "no id at /id" in dead["error"] and f"{api.url}/api" in dead["error"]
        assert orjson.loads(dead["original"]) == {"name": "no id"}


async def test_next_page_that_stays_unreadable_abandons_the_chain_after_bounded_attempts(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    collection, capture = names
    caplog.set_level(logging.WARNING, logger="localflow")

    async def respond(request: web.Request, n: int) -> web.Response:
        if request.query.get("page") == "2":
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
        return web.json_response({"records": [{"id": "p1"}], "next": "/api?page=2"})

    async with Api(respond) as api:
        resource = {"records": "/records", "id": "/id", "pagination": {"type": "next_link", "pointer": "/next"}}
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"}, resource,
                               interval="100ms")  # advanced.unreadable_attempts: 3 by default
        async with running(catalog, capture) as ctx:
            # Pages asked for: 1, 2 (unreadable), 2, 2, then the chain is abandoned: 1 again.
            await wait_for_async(lambda: [r.query.get("page", "1") for r in api.requests][:5] == ["1", "2", "2", "2", "1"],
                                 message="three attempts at page 2, then a fresh chain from page 1")
        dead = await documents(catalog, topic_of(collection) + ".dead")
        assert len(dead) >= 3 and all("not JSON" in d["error"] for d in dead)
        assert any("unreadable 3 times" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert errors(capture, "source") >= 1
        assert ctx.status.restarts == 0


async def test_lookback_asks_again_below_the_cursor_and_catches_a_late_record_sharing_the_maximum(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names
    stored = records(1, 2, 3)

    async def respond(request: web.Request, n: int) -> web.Response:
        return since_filter(stored, request)  # `since` is exclusive: updated > since

    async with Api(respond) as api:
        resource = {**INCREMENTAL, "incremental": {**INCREMENTAL["incremental"], "lookback": 1}}
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"}, resource)
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {"r1", "r2", "r3"})
            await wait_for_async(lambda: any(r.query.get("since") == "2" for r in api.requests),
                                 message="a poll that asks for records since 3 - 1")
            stored.append({"id": "r3-late", "updated": 3, "type": "agent_interaction"})  # stored after that poll
            await wait_for_ids(catalog, collection, {"r3-late"})
        assert {r.query.get("since") for r in api.requests} <= {None, "2"}  # the stored cursor stays 3


async def test_inclusive_cursor_is_sent_as_the_maximum_and_a_late_record_sharing_it_lands(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names
    stored = records(1, 2, 3)

    async def respond(request: web.Request, n: int) -> web.Response:
        since = int(request.query.get("since", "0"))  # an API whose `since` means "at or after"
        return web.json_response({"records": [r for r in stored if r["updated"] >= since]})

    async with Api(respond) as api:
        resource = {**INCREMENTAL, "incremental": {**INCREMENTAL["incremental"], "inclusive": True}}
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"}, resource)
        async with running(catalog, capture):
            await wait_for_async(lambda: any(r.query.get("since") == "3" for r in api.requests),
                                 message="a poll that asks for records at or after 3")
            stored.append({"id": "r3-late", "updated": 3, "type": "agent_interaction"})
            await wait_for_ids(catalog, collection, {"r1", "r2", "r3", "r3-late"})
        assert set(await id_counts(catalog, collection)) == {"r1", "r2", "r3", "r3-late"}  # re-reads keep their keys


def test_lookback_is_subtracted_in_the_cursors_own_terms() -> None:
    assert looked_back("2026-01-01T00:05:00Z", 300) == "2026-01-01T00:00:00Z"
    assert looked_back("2026-01-01T00:05:00.250+02:00", 60) == "2026-01-01T00:04:00.250000+02:00"
    assert looked_back(1000, 10.0) == 990 and looked_back(1.5, 0.5) == 1.0
    assert looked_back("2026-01-01T00:05:00Z", None) == "2026-01-01T00:05:00Z"
    with pytest.raises(ConfigError, match="lookback needs a numeric or ISO 8601 date-time cursor"):
        looked_back("abc", 5)
    resource = HttpResource.model_validate({"incremental": {"field": "/updated_at", "param": "since", "lookback": "5m"}})
    assert resource.incremental is not None and resource.incremental.lookback == 300


async def test_checkpoint_topic_takes_the_replication_factor_of_the_captures_collections(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names

    async def respond(request: web.Request, n: int) -> web.Response:
        return web.json_response({"records": [{"id": "r1"}]})

    async with Api(respond) as api:
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"},
                               {"records": "/records", "id": "/id"}, interval="1h")
        catalog.collections[collection].replication_factor = 3  # the test broker accepts any factor
        async with running(catalog, capture):
            await wait_for_ids(catalog, collection, {"r1"})
    admin = AIOKafkaAdminClient(**catalog.kafka.client_options())
    await admin.start()
    try:
        [described] = await admin.describe_topics([KafkaCheckpoints(catalog.kafka).topic(capture)])
    finally:
        await admin.close()
    assert [len(p["replicas"]) for p in described["partitions"]] == [3]


async def test_second_live_instance_of_a_capture_is_refused_and_takes_over_once_the_first_leaves(
        tmp_path: Path, kafka_bootstrap: str, names: tuple[str, str]) -> None:
    collection, capture = names

    async def respond(request: web.Request, n: int) -> web.Response:
        return web.json_response({"records": [{"id": f"r{n}"}]})

    async with Api(respond) as api:
        # One poll per instance (a long interval): a second poll would mean two instances polling.
        catalog = make_catalog(tmp_path, kafka_bootstrap, collection, capture, {"url": f"{api.url}/api"},
                               {"records": "/records", "id": "/id"}, interval="1h")
        presence = Presence(KafkaCheckpoints(catalog.kafka), capture)  # an observer: it never claims
        with worker(tmp_path / "flow.yaml", "--task", capture, log=tmp_path / "second.log",
                    env=cli_env(KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap)) as second:
            async with running(catalog, capture):
                await wait_for_ids(catalog, collection, {"r1"})
                await wait_for_async(presence.holder, timeout=30, message="the first instance in its group")
                await wait_for_async(lambda: "is already running elsewhere" in second.output(), timeout=60,
                                     message="the second instance to refuse")
                assert len(api.requests) == 1, "the refused instance polled"
            # The first left its group on stopping: the second starts (its next attempt) and polls.
            await wait_for_ids(catalog, collection, {"r1", "r2"})
            assert len(api.requests) == 2
