"""The bad-input corpus (tests/corpus/manifest.yaml): every case gives its expected outcome, a dead
letter or a clear error naming the input; none stops the pipeline; nothing else is lost.

All pipeline cases go through one running Sophia pipeline (a catalog derived from
examples/sophia/flow.yaml, each task its own `localflow run` process, private servers): log
lines in their own files between good sentinel lines, API answers and /metrics answers on their
own paths (one binding or target each), documents through localflow's writer, foreign bytes on
the topics. Good sentinel records are fed before and after everything; they must all arrive in
every endpoint, no task may fail or exit, and then each case asserts its own outcome.
Catalog cases (names that would break SQL, S3 keys or Redis keys) go through the catalog loader.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import yaml
from aiohttp import web
from aiokafka import AIOKafkaProducer

from pipeline.embedded.services import Services
from pipeline.runtime.catalog import KafkaConfig, load_catalog
from pipeline.runtime.collection import Collection, CollectionWriter, original_of
from pipeline.sdk.errors import ConfigError
from tests.support.census import Census, Endpoints, TopicContent
from tests.support.pipeline import (
    AGENT_LOGS,
    API_TASK,
    EXAMPLE,
    LOGS_TASK,
    METRICS,
    METRICS_TASK,
    POSTGRES,
    PROCESSED,
    RAW,
    TASKS,
    Pipeline,
    pipeline_env,
    sophia_catalog,
    topic,
)
from tests.support.sources import API_PATH, AgentLogs, SourceServer, abort_connection
from tests.support.tasks import running

CORPUS = Path(__file__).resolve().parent / "corpus"
MANIFEST: dict[str, Any] = yaml.safe_load((CORPUS / "manifest.yaml").read_text(encoding="utf-8"))
CASES: dict[str, dict[str, Any]] = {c["id"]: c for c in MANIFEST["cases"]}
LIVE = [c for c in CASES.values() if c["kind"] not in ("catalog",) and not c.get("isolated")]
WRITER = "corpus-writer"
CORPUS_PATH = API_PATH + "/corpus/"
METRICS_CASE_PATH = "/corpus/metrics/"
SENTINEL_TS = "2025-01-06T10:00:00Z"
MAX_BODY = 1024 * 1024
"""advanced.max_body_bytes of the corpus catalog's http and prometheus captures."""


def test_the_corpus_has_at_least_50_cases_each_with_an_outcome() -> None:
    assert len(CASES) == len(MANIFEST["cases"]), "case ids are unique"
    assert len(CASES) >= 50
    outcomes = {"document", "skipped", "dead_letter", "error_logged", "samples", "up0", "materialized",
                "config_error", "table_used"}
    assert {c["id"]: c["expect"]["outcome"] for c in CASES.values() if c["expect"]["outcome"] not in outcomes} == {}


# ============================================================================ inputs


def case_bytes(case: dict[str, Any]) -> bytes:
    """The raw input of a log line, API body or /metrics body."""
    if "file" in case:
        return (CORPUS / "data" / case["file"]).read_bytes()
    gen = case.get("generate")
    if gen is not None:
        if "nest" in gen:
            return b'{"a":' * gen["nest"] + b"1" + b"}" * gen["nest"]
        if "bytes" in gen:
            head = gen.get("prefix", "").encode()
            return head + gen["fill"].encode() * (gen["bytes"] - len(head))
        if "records" in gen:
            pad = "p" * gen["pad"]
            return orjson.dumps({"records": [{"id": f"huge-{i}", "pad": pad} for i in range(gen["records"])]})
        if "series" in gen:
            return "".join(f'big_series{{n="{i}"}} {i}\n' for i in range(gen["series"])).encode()
    if "json" in case:
        return orjson.dumps(case["json"])
    if "bytes" in case:
        return case["bytes"].encode("latin-1")
    if "body" in case:
        return case["body"].encode()
    return case["line"].encode()


def generated_id(case: dict[str, Any]) -> str | None:
    gen = case.get("generate") or {}
    return secrets.token_hex(gen["id_bytes"] // 2) if "id_bytes" in gen else None


def api_handler(case: dict[str, Any], key: str | None) -> Callable[[web.Request], Any]:
    behave = case.get("behave")
    if behave == "endless_chain":
        async def endless(request: web.Request) -> web.Response:
            n = int(request.query.get("page", "0"))
            nxt = str(request.url.with_query({"page": str(n + 1)}))
            return web.json_response({"records": [{"id": f"endless-{n}", "type": "system_event"}], "next": nxt})
        return endless
    if behave == "self_link":
        async def self_link(request: web.Request) -> web.Response:
            return web.json_response({**case["json"], "next": str(request.url)})
        return self_link
    if behave == "gzip_bomb":
        bomb = gzip.compress(b"0" * (64 * 1024 * 1024), compresslevel=1)

        async def gzip_bomb(request: web.Request) -> web.Response:
            return web.Response(body=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        return gzip_bomb
    if behave == "truncate_transfer":
        body = case_bytes(case)

        async def truncated(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = 4000
            await response.prepare(request)
            await response.write(body[:60])
            abort_connection(request)
            return response
        return truncated
    if key is not None:
        body = orjson.dumps({"records": [{"id": key, "type": "user_query"}]})
    else:
        body = case_bytes(case)
    status = case.get("status", 200)
    headers = {"Content-Type": case.get("content_type", "application/json"), **case.get("headers", {})}

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, headers=headers)
    return answer


def metrics_handler(case: dict[str, Any]) -> Callable[[web.Request], Any]:
    body = case_bytes(case)
    headers = {"Content-Type": case.get("content_type", "text/plain")}
    status = case.get("status", 200)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, headers=headers)
    return answer


def sentinel_line(case_id: str, where: str) -> bytes:
    return orjson.dumps({"sentinel": where, "case": case_id, "timestamp": SENTINEL_TS})


def write_log_case(directory: Path, case: dict[str, Any]) -> None:
    """``<id>.log``: a sentinel, the case's line(s), a sentinel (the BOM case starts the file)."""
    lines = [ln.encode() for ln in case["lines"]] if "lines" in case else [case_bytes(case)]
    if case.get("first"):
        content = lines + [sentinel_line(case["id"], "after")]
    else:
        content = [sentinel_line(case["id"], "before"), *lines, sentinel_line(case["id"], "after")]
    (directory / f"{case['id']}.log").write_bytes(b"\n".join(content) + b"\n")


def corpus_catalog(path: Path, metrics_url: str) -> Path:
    """The Sophia catalog plus one http binding per API case, one target per /metrics case, limits
    small enough to test (1 MiB bodies, 5 pages a poll, short retries) and the SQL-name binding."""
    def edit(doc: dict[str, Any]) -> None:
        http = doc["captures"][API_TASK]
        http["endpoint"]["http"]["advanced"] = {
            "retry": {"initial_backoff": "100ms", "max_backoff": "500ms", "max_retries": 2},
            "max_pages": 5, "max_body_bytes": MAX_BODY}
        for case in LIVE:
            if case["kind"] == "api":
                http["bindings"].append({"target": RAW, "resource": {
                    "path": f"/corpus/{case['id']}", "records": "/records", "id": "/id", "source": "corpus",
                    "pagination": {"type": "next_link", "pointer": "/next"}}})
        prom = doc["captures"][METRICS_TASK]["endpoint"]["prometheus"]
        prom["targets"] += [f"{metrics_url}{METRICS_CASE_PATH}{c['id']}" for c in LIVE if c["kind"] == "metrics"]
        prom["advanced"] = {"max_body_bytes": MAX_BODY}
        for case in LIVE:
            if case["kind"] == "sql_name":
                doc["materializations"][POSTGRES]["bindings"].append({"source": RAW, "resource": {"table": case["table"]}})

    return sophia_catalog(path, edit=edit)


# ============================================================================ the run


@dataclass
class Snapshot:
    topics: dict[str, TopicContent]
    ends: Endpoints
    logs: dict[str, str]
    tables: dict[str, int] = field(default_factory=dict)
    """Rows of the SQL-name cases' tables (-1: no such table), and of estuary.sophia_metrics."""


@dataclass
class CorpusRun:
    pipeline: Pipeline
    keys: dict[str, str]
    """Case id -> the key generated for it (cases with generated ids)."""
    sentinels: set[str]
    snapshot: Snapshot
    settled: float


@pytest.fixture(scope="module")
async def corpus(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CorpusRun]:
    """Feed every live case to one pipeline and wait until the sentinels and the outcomes are there."""
    tmp = tmp_path_factory.mktemp("corpus")
    services = Services(kafka=True, postgres=True, redis=True, s3=True)
    sources: SourceServer | None = None
    pipeline: Pipeline | None = None
    try:
        services.start()
        sources = SourceServer(token="corpus-token-0123456789")
        logs = AgentLogs(tmp / "agents")
        (logs.directory / "corpus").mkdir()
        keys = {c["id"]: k for c in LIVE if (k := generated_id(c))}
        for case in LIVE:
            if case["kind"] == "api":
                sources.routes[CORPUS_PATH + case["id"]] = api_handler(case, keys.get(case["id"]))
            elif case["kind"] == "metrics":
                sources.routes[METRICS_CASE_PATH + case["id"]] = metrics_handler(case)
            elif case["kind"] == "log_line":
                write_log_case(logs.directory / "corpus", case)
        env = pipeline_env(services, sources, logs.directory)
        catalog = corpus_catalog(tmp / "flow.yaml", sources.url)
        pipeline = Pipeline(catalog, env, tmp / "logs")
        sentinels = {r["id"] for r in sources.add_records([{"id": f"sentinel-{i}", "type": "user_query"}
                                                          for i in range(20)])}
        pipeline.start()
        await write_documents(services.kafka.bootstrap_servers, catalog)
        census = Census(services.kafka.bootstrap_servers, services.postgres.url, services.redis.url,
                        services.s3.endpoint_url)
        started = time.monotonic()
        # Wait for the first sentinels (everything up), then send the last ones: they must get through
        # after every bad input was served.
        await until_settled(census, pipeline, sentinels, keys, services.postgres.url, within=150, cases=False)
        sentinels |= {r["id"] for r in sources.add_records([{"id": f"sentinel-late-{i}", "type": "system_metric"}
                                                            for i in range(20)])}
        snapshot = await until_settled(census, pipeline, sentinels, keys, services.postgres.url, within=150)
        yield CorpusRun(pipeline, keys, sentinels, snapshot, time.monotonic() - started)
    finally:
        if pipeline is not None:
            pipeline.stop()
        if sources is not None:
            sources.close()
        services.stop()


async def write_documents(bootstrap: str, catalog_path: Path) -> None:
    """Document cases through localflow's writer; message cases as a foreign producer's bytes."""
    catalog = load_catalog(catalog_path, env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap})
    kafka = KafkaConfig(bootstrap_servers=bootstrap)
    async with CollectionWriter(kafka, WRITER) as writer:
        for case in LIVE:
            if case["kind"] == "document":
                await writer.write(Collection.from_catalog(catalog, case["collection"]), [case["doc"]])
        await writer.ensure([Collection.from_catalog(catalog, c) for c in (RAW, PROCESSED, AGENT_LOGS, METRICS)])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for case in LIVE:
            if case["kind"] == "message":
                await producer.send_and_wait(topic(case["collection"]), case_bytes(case))
    finally:
        await producer.stop()


async def take_snapshot(census: Census, pipeline: Pipeline, postgres_url: str) -> Snapshot | None:
    try:
        ends = await census.endpoints()
    except (OSError, asyncpg.PostgresError):
        return None
    snap = Snapshot(await census.topics(), ends, {n: t.output() for n, t in pipeline.tasks.items()})
    conn = await asyncpg.connect(postgres_url)
    try:
        for case in LIVE:
            if case["kind"] == "sql_name":
                name = case["table"]
                exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'estuary."{name.replace(chr(34), chr(34) * 2)}"')
                snap.tables[name] = int(await conn.fetchval(
                    f'SELECT count(*) FROM estuary."{name.replace(chr(34), chr(34) * 2)}"')) if exists else -1
        snap.tables["estuary.sophia_metrics"] = int(await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'estuary' AND tablename = 'sophia_metrics'"))
    finally:
        await conn.close()
    return snap


async def until_settled(census: Census, pipeline: Pipeline, sentinels: set[str], keys: dict[str, str],
                        postgres_url: str, *, within: float, cases: bool = True) -> Snapshot:
    """Poll until every sentinel is everywhere (and every live case's outcome shows), or the deadline."""
    deadline = time.monotonic() + within
    while True:
        snap = await take_snapshot(census, pipeline, postgres_url)
        if snap is not None:
            waiting = sentinel_problems(snap, sentinels)
            if cases and not waiting:
                waiting = [p for c in LIVE if not c.get("known_issue") for p in outcome_problems(c, snap, keys)]
            if not waiting or time.monotonic() > deadline:
                return snap
        elif time.monotonic() > deadline:
            raise AssertionError("the endpoints could not be read")
        await asyncio.sleep(1)  # polling, bounded by the deadline


def sentinel_problems(snap: Snapshot, sentinels: set[str]) -> list[str]:
    """Good records that did not make it everywhere: API sentinels and the log files' sentinel lines."""
    out = []
    t, e = snap.topics, snap.ends
    for where, have in (("raw topic", t[RAW].keys), ("processed topic", t[PROCESSED].keys),
                        ("postgres", set(e.postgres[PROCESSED])), ("redis raw", e.redis[RAW]),
                        ("redis processed", e.redis[PROCESSED]), ("s3 raw", e.s3_keys[RAW]),
                        ("s3 processed", e.s3_keys[PROCESSED])):
        missing = sentinels - have
        if missing:
            out.append(f"{len(missing)} API sentinels missing from {where}, e.g. {sorted(missing)[:3]}")
    log_sentinels = {k: d["data"] for _, _, k, d in t[AGENT_LOGS].messages if d and "sentinel" in (d.get("data") or {})}
    expected = {(c["id"], w) for c in LIVE if c["kind"] == "log_line" for w in ("before", "after")
                if not (w == "before" and c.get("first"))}
    got = {(d["case"], d["sentinel"]) for d in log_sentinels.values()}
    if expected - got:
        out.append(f"log sentinel lines not captured: {sorted(expected - got)[:5]}")
    for where, have in (("postgres", set(e.postgres[AGENT_LOGS])), ("redis", e.redis[AGENT_LOGS]),
                        ("s3", e.s3_keys[AGENT_LOGS])):
        missing = log_sentinels.keys() - have
        if missing:
            out.append(f"{len(missing)} log sentinel lines missing from {where}")
    return out


# ============================================================================ outcomes


def _original(envelope: dict[str, Any]) -> bytes:
    return original_of(envelope)


def dead_letters_of(case: dict[str, Any], snap: Snapshot, dead: str, task: str | None) -> list[dict[str, Any]]:
    """Dead letters in ``dead``'s topic (from ``task``) that are about this case."""
    cid = case["id"]
    kind = case["kind"]
    out = []
    for d in snap.topics[dead].dead:
        if task is not None and d.get("task") != task:
            continue
        error = d.get("error", "")
        if kind == "api":
            hit = f"/corpus/{cid}" in error
        elif kind == "log_line":
            hit = f"/{cid}.log:" in error or (f"corpus/{cid}.log" in _original(d).decode(errors="replace"))
        elif kind == "metrics":
            hit = f"{METRICS_CASE_PATH}{cid}" in error
        else:
            hit = cid.encode() in _original(d)
        if hit:
            out.append(d)
    return out


def documents_of(case: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> tuple[str, list[tuple[Any, dict[str, Any]]]]:
    """(collection, [(key, document)]) of what the case became (sentinel lines excluded)."""
    cid, kind = case["id"], case["kind"]
    if kind == "log_line":
        docs = [(k, d) for _, _, k, d in snap.topics[AGENT_LOGS].messages
                if d and str((d.get("metadata") or {}).get("path", "")).endswith(f"/{cid}.log")
                and "sentinel" not in (d.get("data") or {})]
        return AGENT_LOGS, _distinct(docs)
    if kind == "api":
        docs = [(k, d) for _, _, k, d in snap.topics[RAW].messages
                if d and f"/corpus/{cid}" in str((d.get("metadata") or {}).get("url", ""))]
        return RAW, _distinct(docs)
    if kind == "metrics":
        docs = [(k, d) for _, _, k, d in snap.topics[METRICS].messages
                if d and str((d.get("metadata") or {}).get("target", "")).endswith(f"{METRICS_CASE_PATH}{cid}")]
        return METRICS, _distinct(docs)
    collection = case["collection"]
    docs = [(k, d) for _, _, k, d in snap.topics[collection].messages if d and cid in orjson.dumps(d).decode()]
    return collection, _distinct(docs)


def _distinct(docs: list[tuple[Any, dict[str, Any]]]) -> list[tuple[Any, dict[str, Any]]]:
    """One document per key (a re-sent copy carries the same key)."""
    return list({k: (k, d) for k, d in docs}.values())


def outcome_problems(case: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> list[str]:
    """Why the case's expected outcome is not (yet) what the pipeline shows; [] when it is."""
    expect = case["expect"]
    outcome = expect["outcome"]
    check = {"document": _document, "skipped": _skipped, "dead_letter": _dead_letter, "error_logged": _error_logged,
             "samples": _samples, "up0": _up0, "materialized": _materialized, "table_used": _table_used}[outcome]
    return check(case, expect, snap, keys)


def _materialization_problems(collection: str, key: Any, expect: dict[str, Any], snap: Snapshot) -> list[str]:
    """The document of ``key`` is in Postgres (or refused there as expected), Redis and S3."""
    out = []
    e = snap.ends
    pg_collection = PROCESSED if collection == RAW else collection
    if pg_collection in e.postgres:
        refused = [d for d in snap.topics[pg_collection].dead_from(POSTGRES) if _dead_key(d, pg_collection) == key]
        in_pg = key in set(e.postgres[pg_collection])
        if expect.get("postgres") == "refused":
            if in_pg:
                out.append(f"{key!r} is in Postgres {pg_collection}, expected Postgres to refuse it")
            if not refused:
                out.append(f"no Postgres dead letter for {key!r} in {pg_collection}")
            elif not any(str(expect["postgres_error"]) in d["error"] for d in refused):
                out.append(f"Postgres dead letter of {key!r} does not name {expect['postgres_error']}: {refused[0]['error']}")
        elif not in_pg:
            out.append(f"{key!r} not in Postgres {pg_collection}" + (f" (dead letter: {refused[0]['error']})" if refused else ""))
    redis_collections = [collection] + ([PROCESSED] if collection == RAW else [])
    for c in redis_collections:
        if key not in e.redis[c]:
            out.append(f"{key!r} not in Redis ({c})")
        if key not in e.s3_keys[c]:
            out.append(f"{key!r} not in the S3 archive of {c}")
    return out


def _dead_key(envelope: dict[str, Any], collection: str) -> Any:
    try:
        doc = orjson.loads(_original(envelope))
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    return doc.get("id") if collection == PROCESSED else (doc.get("metadata") or {}).get("id")


def _document(case: dict[str, Any], expect: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> list[str]:
    collection, docs = documents_of(case, snap, keys)
    if len(docs) != expect.get("count", 1):
        return [f"{len(docs)} documents in {collection}, expected {expect.get('count', 1)}"]
    out = []
    key, doc = docs[0]
    data = doc.get("data") or {}
    message = data.get("message")
    if "message" in expect and message != expect["message"]:
        out.append(f"message {message!r:.200}, expected {expect['message']!r:.200}")
    if "message_startswith" in expect and not str(message).startswith(expect["message_startswith"]):
        out.append(f"message {message!r:.100} does not start with {expect['message_startswith']!r}")
    if "message_length" in expect and len(str(message)) != expect["message_length"]:
        out.append(f"message of {len(str(message))} characters, expected {expect['message_length']}")
    for part in expect.get("message_contains", []):
        if part not in str(message):
            out.append(f"message {message!r:.200} lacks {part!r}")
    for name, value in (expect.get("data") or {}).items():
        if data.get(name) != value:
            out.append(f"data.{name} is {data.get(name)!r}, expected {value!r}")
    if "timestamp" in expect and doc.get("timestamp") != expect["timestamp"]:
        out.append(f"timestamp {doc.get('timestamp')!r}, expected {expect['timestamp']!r}")
    dead = [d for c in (collection,) for d in dead_letters_of(case, snap, c, None) if d.get("task") != POSTGRES]
    if dead:
        out.append(f"unexpected dead letters: {dead[0]['error']}")
    return out + _materialization_problems(collection, key, expect, snap)


def _skipped(case: dict[str, Any], expect: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> list[str]:
    collection, docs = documents_of(case, snap, keys)
    dead = dead_letters_of(case, snap, collection, None)
    return ([f"{len(docs)} documents, expected none"] if docs else []) + \
        ([f"unexpected dead letter: {dead[0]['error']}"] if dead else [])


def _dead_letter(case: dict[str, Any], expect: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> list[str]:
    dead_in = expect.get("dead", case.get("collection"))
    task = expect.get("task", WRITER)
    letters = dead_letters_of(case, snap, dead_in, task)
    distinct = {(d["error"], d.get("original_sha256")) for d in letters}
    if len(distinct) < expect.get("count", 1):
        others = [d["error"] for d in dead_letters_of(case, snap, dead_in, None)]
        return [f"{len(distinct)} dead letters from {task} in {topic(dead_in)}.dead, expected "
                f"{expect.get('count', 1)}" + (f" (others: {others[:2]})" if others else "")]
    out = []
    for part in expect.get("error_contains", []):
        if not all(part in d["error"] for d in letters):
            out.append(f"dead letter error {letters[0]['error']!r:.300} lacks {part!r}")
    original = _original(letters[0])
    if case["kind"] == "document" and orjson.loads(original) != orjson.loads(orjson.dumps(case["doc"])):
        out.append(f"the dead letter's original is not the document: {original[:200]!r}")
    if case["kind"] in ("log_line", "message", "api") and "behave" not in case and expect.get("count", 1) == 1:
        given = case_bytes(case)
        writer_stage = "not serializable as JSON" in letters[0]["error"]  # the writer holds a document, not bytes
        if not (given.startswith(original) and original) and case["kind"] != "api" and not writer_stage:
            out.append(f"the dead letter's original {original[:80]!r} is not the input {given[:80]!r}")
        if case["kind"] == "api" and original != given and orjson.loads(original) not in _records_of(given):
            out.append(f"the dead letter's original {original[:80]!r} is neither the page nor one of its records")
    for task_name in expect.get("also_dead", []):
        if not dead_letters_of(case, snap, case["collection"], task_name):
            out.append(f"no dead letter from {task_name} in {topic(case['collection'])}.dead")
    if case["kind"] in ("api", "log_line"):
        _, docs = documents_of(case, snap, keys)
        if docs:
            out.append(f"{len(docs)} documents were written too, e.g. {docs[0][1]!r:.200}")
    return out


def _records_of(body: bytes) -> list[Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    records = doc.get("records") if isinstance(doc, dict) else None
    return records if isinstance(records, list) else []


def _error_logged(case: dict[str, Any], expect: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> list[str]:
    log = snap.logs[expect["task"]]
    lines = [ln for ln in log.splitlines() if all(part in ln for part in expect["log_contains"])]
    return [] if lines else [f"no log line of {expect['task']} contains all of {expect['log_contains']}"]


def _series(doc: dict[str, Any]) -> str:
    data = doc["data"]
    labels = {k: v for k, v in data["labels"].items() if k not in ("job", "instance")}
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{data['name']}{{{inner}}}" if inner else data["name"]


def _samples(case: dict[str, Any], expect: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> list[str]:
    _, docs = documents_of(case, snap, keys)
    ups = [d for _, d in docs if d["data"]["name"] == "up"]
    if not ups:
        return ["no scrape yet"]
    # A scrape that timed out on a loaded machine is honestly `up 0, unreachable`; what the case checks
    # is that the body it served never made the target look down.
    down = [d["data"] for d in ups if d["data"]["value"] != 1 and not d["data"].get("error", "").startswith("unreachable")]
    out = [] if not down and any(d["data"]["value"] == 1 for d in ups) else [f"up is not 1: {(down or ups)[0]['data']}"]
    samples = [d for _, d in docs if d["data"]["name"] != "up"]
    by_series = {_series(d): d["data"] for d in samples}
    for series, want in (expect.get("values") or {}).items():
        got = by_series.get(series)
        if got is None:
            out.append(f"no sample {series}; got {sorted(by_series)[:5]}")
        elif want in ("NaN", "+Inf", "-Inf"):
            if got.get("value") is not None or got.get("value_text") != want:
                out.append(f"{series}: {got}, expected value null and value_text {want}")
        elif not math.isclose(got.get("value"), float(want)):
            out.append(f"{series}: value {got.get('value')}, expected {want}")
    if expect.get("values") == {} and samples:
        out.append(f"{len(samples)} samples from an empty body")
    for name, labels in (expect.get("labels") or {}).items():
        hits = [d for d in samples if d["data"]["name"] == name]
        if not hits or any(hits[0]["data"]["labels"].get(k) != v for k, v in labels.items()):
            out.append(f"labels of {name}: {hits[0]['data']['labels'] if hits else 'no sample'}, expected {labels}")
    for key, _ in docs[:5]:
        out += _materialization_problems(METRICS, key, expect, snap)
    return out


def _up0(case: dict[str, Any], expect: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> list[str]:
    _, docs = documents_of(case, snap, keys)
    ups = [d for _, d in docs if d["data"]["name"] == "up"]
    if not ups:
        return ["no scrape yet"]
    out = []
    if any(d["data"]["value"] != 0 for d in ups):
        out.append(f"up is not 0: {ups[0]['data']}")
    for part in expect.get("error_contains", []):
        if part not in ups[0]["data"].get("error", ""):
            out.append(f"up error {ups[0]['data'].get('error')!r} lacks {part!r}")
    if [d for _, d in docs if d["data"]["name"] != "up"]:
        out.append("samples were captured from a failed scrape")
    letters = dead_letters_of(case, snap, METRICS, METRICS_TASK)
    if expect.get("dead_letter") and not letters:
        out.append("no dead letter holds the body")
    if expect.get("dead_letter") and letters and _original(letters[0]) != case_bytes(case):
        out.append("the dead letter's original is not the body")
    if expect.get("dead_letter") is False and letters:
        out.append(f"unexpected dead letter: {letters[0]['error']}")
    return out


def _materialized(case: dict[str, Any], expect: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> list[str]:
    key = expect.get("key", keys.get(case["id"]))
    if key not in snap.topics[RAW].keys:
        return [f"{key!r:.80} was not captured"]
    out = _materialization_problems(RAW, key, expect, snap)
    if "redis_key" in expect and expect["redis_key"].removeprefix("sophia:raw:") not in snap.ends.redis[RAW]:
        out.append(f"no Redis key {expect['redis_key']!r}")
    return out


def _table_used(case: dict[str, Any], expect: dict[str, Any], snap: Snapshot, keys: dict[str, str]) -> list[str]:
    rows = snap.tables.get(case["table"], -1)
    out = [] if rows > 0 else [f"table estuary.{case['table']!r} holds {rows} rows"]
    if snap.tables.get("estuary.sophia_metrics") != 1:
        out.append("estuary.sophia_metrics is gone")
    return out


# ============================================================================ tests


def test_no_task_failed_or_stopped_and_every_good_record_arrived(corpus: CorpusRun) -> None:
    snap = corpus.snapshot
    assert sentinel_problems(snap, corpus.sentinels) == []
    assert corpus.pipeline.unexpected_exits() == []
    for name, log in snap.logs.items():
        assert "task failed" not in log, f"{name} failed on bad input:\n" + "\n".join(
            ln for ln in log.splitlines() if "task failed" in ln)[:2000]
    for name in TASKS:
        assert corpus.pipeline.tasks[name].running, name


@pytest.mark.parametrize("case_id", [c["id"] for c in LIVE])
def test_case(corpus: CorpusRun, case_id: str, request: pytest.FixtureRequest) -> None:
    case = CASES[case_id]
    if case.get("known_issue"):
        request.applymarker(pytest.mark.xfail(reason=case["known_issue"], strict=True))
    assert outcome_problems(case, corpus.snapshot, corpus.keys) == [], case.get("why", "")


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES.values() if c["kind"] == "catalog"])
def test_catalog_case(case_id: str, tmp_path: Path) -> None:
    case = CASES[case_id]
    doc = yaml.safe_load(EXAMPLE.read_text())
    for spec in doc["collections"].values():
        spec["schema"] = str((EXAMPLE.parent / spec["schema"]).resolve())
    if "rename_collection" in case:
        doc = _renamed(doc, case["rename_collection"]["from"], case["rename_collection"]["to"])
    for place, value in (case.get("set") or {}).items():
        node = doc
        parts = place.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[parts[-1]] = value
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_catalog(path, env={})
    expect = case["expect"]
    assert [(p, m) for p, m in refused.value.problems if p.startswith(expect["place"]) and expect["message"] in m], \
        refused.value.problems


def _renamed(node: Any, old: str, new: str) -> Any:
    if isinstance(node, dict):
        return {(new if k == old else k): _renamed(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed(v, old, new) for v in node]
    return new if node == old else node


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES.values() if c.get("isolated")])
async def test_isolated_case(case_id: str, tmp_path: Path, services_env: dict[str, str],
                             unique_name: Callable[..., str], request: pytest.FixtureRequest) -> None:
    """A log line that must not be fed to the shared run: the files capture alone, then a sentinel."""
    from pipeline.runtime.collection import read_to_end

    case = CASES[case_id]
    if case.get("known_issue"):
        request.applymarker(pytest.mark.xfail(reason=case["known_issue"], strict=True))
    name = unique_name()
    directory = tmp_path / "agents"
    directory.mkdir()
    write_log_case(directory, case)
    doc = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    collection = f"{name}/agent_logs"
    catalog_doc = {
        "kafka": {"bootstrap_servers": services_env["KAFKA_BOOTSTRAP_SERVERS"]},
        "collections": {collection: {"schema": str((EXAMPLE.parent / "schemas/raw.schema.yaml").resolve()),
                                     "key": ["/metadata/id"]}},
        "captures": {f"{name}/tail": {**doc["captures"][LOGS_TASK], "interval": "1s",
                                      "endpoint": {"files": {"directory": str(directory)}},
                                      "bindings": [{"target": collection, "resource": {"globs": ["*.log"]}}]}},
    }
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(catalog_doc))
    catalog = load_catalog(path)
    kafka = catalog.kafka
    async with running(catalog, f"{name}/tail"):
        deadline = time.monotonic() + 15
        while True:
            docs = [orjson.loads(r.value) for r in await read_to_end(kafka, topic(collection))]
            if any((d.get("data") or {}).get("sentinel") == "after" for d in docs) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)  # polling the topic, bounded by the deadline
        dead = [orjson.loads(r.value) for r in await read_to_end(kafka, topic(collection) + ".dead")]
    assert any((d.get("data") or {}).get("sentinel") == "after" for d in docs), "the line after it was captured"
    expect = case["expect"]
    assert [d for d in dead if all(p in d["error"] for p in expect["error_contains"])], [d["error"] for d in dead]
