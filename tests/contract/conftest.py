"""Profiles of the registered connectors: how the conformance suite configures each and reads back
what its endpoint holds. Tests are parametrized over the registry (entry points
``localflow.connectors``); a connector without a profile here is skipped with the reason, so a new
connector shows up in the suite by existing and passes it once it has a profile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from pipeline.runtime.catalog import Catalog, load_catalog
from pipeline.runtime.collection import Collection
from pipeline.runtime.registry import known_connectors, load_connector
from pipeline.runtime.task import TaskContext
from pipeline.sdk.materialization import Batch
from pipeline.sdk.records import Record, TopicPartition

SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}, "v": {"type": "integer"}},
          "required": ["id", "v"]}
TASK = "contract/m"
TS = 1_764_590_400_000
"""One fixed Kafka timestamp (2025-12-01T12:00Z): every record of a test falls in one archive hour."""
SECRET = "s3cr3t-Zq9xW7"
"""A password no message may contain."""

Held = dict[str, dict[str, Any]]
"""What an endpoint holds: document id -> the last document under it."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test asking for ``materialization`` / ``capture`` runs once per registered connector."""
    for kind in ("materialization", "capture"):
        if f"{kind}_name" in metafunc.fixturenames:
            metafunc.parametrize(f"{kind}_name", known_connectors(kind))


# -------------------------------------------------------------------------------- materializations


@dataclass
class MaterializationProfile:
    """``endpoint(servers, name, buffered)``: the endpoint config and ``resource(name, buffered)`` a
    binding's resource (``buffered``: hold documents until close where the connector buffers at all,
    else make each batch durable in ``apply``);
    ``read(servers, endpoint, collection)``: what it holds; ``secret(servers, name)``: an endpoint
    config whose password/secret is SECRET."""

    endpoint: Callable[[Servers, str, bool], dict[str, Any]]
    resource: Callable[[str, bool], dict[str, Any]]
    read: Callable[[Servers, dict[str, Any], str, dict[str, Any]], Awaitable[Held]]
    secret: Callable[[Servers, str], dict[str, Any]]
    refused: dict[str, Any] | None = None
    """A document valid for the collection that the endpoint itself cannot hold (None: there is none)."""
    reapplies: bool = True
    """Whether a replay writes records below the stored offset again (an archive keeps what it sealed)."""


class Servers:
    """The session's pip servers, started only when a profile asks for one."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request

    def __getattr__(self, fixture: str) -> str:
        return str(self._request.getfixturevalue(fixture))


def _with_password(url: str, user: str = "localflow") -> str:
    scheme, _, rest = url.partition("://")
    rest = rest.rpartition("@")[2]
    return f"{scheme}://{user}:{SECRET}@{rest}"


async def _read_postgres(servers: Servers, endpoint: dict[str, Any], collection: str,
                         resource: dict[str, Any]) -> Held:
    import asyncpg

    conn = await asyncpg.connect(servers.postgres_url)
    try:
        rows = await conn.fetch(f'SELECT id, v FROM "{endpoint["schema"]}"."{resource["table"]}"')
    except asyncpg.UndefinedTableError:
        return {}
    finally:
        await conn.close()
    return {r["id"]: {"id": r["id"], "v": r["v"]} for r in rows}


async def _read_redis(servers: Servers, endpoint: dict[str, Any], collection: str, resource: dict[str, Any]) -> Held:
    from redis.asyncio import Redis

    r = Redis.from_url(servers.redis_url)
    try:
        out: Held = {}
        async for key in r.scan_iter(match=f"{collection}:*", count=1000):
            d = orjson.loads(await r.get(key))
            out[d["id"]] = d
        return out
    finally:
        await r.aclose()


async def _read_s3(servers: Servers, endpoint: dict[str, Any], collection: str, resource: dict[str, Any]) -> Held:
    import aioboto3

    session = aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    out: Held = {}
    async with session.client("s3", endpoint_url=servers.s3_endpoint_url) as s3:
        names: list[str] = []
        try:
            async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=endpoint["bucket"]):
                names += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".jsonl")]
        except s3.exceptions.NoSuchBucket:
            return {}
        for name in sorted(names):  # one partition, one hour: names sort by their zero-padded offsets
            body = await (await s3.get_object(Bucket=endpoint["bucket"], Key=name))["Body"].read()
            for line in body.splitlines():
                d = orjson.loads(line)
                out[d["id"]] = d
    return out


MATERIALIZATIONS: dict[str, MaterializationProfile] = {
    "postgres": MaterializationProfile(
        endpoint=lambda s, name, buffered: {"url": s.postgres_url, "schema": name,
                                            "advanced": {"overlap": buffered}},  # overlap reports a batch late
        resource=lambda name, buffered: {"table": "docs"},
        read=_read_postgres,
        secret=lambda s, name: {"url": _with_password(s.postgres_url), "schema": name},
        refused={"id": "nul", "v": 1, "note": "a\x00b"},  # jsonb cannot hold \u0000
    ),
    "redis": MaterializationProfile(
        endpoint=lambda s, name, buffered: {"url": s.redis_url, "advanced": {"state_prefix": f"{name}:lf:",
                                                                            "overlap": buffered}},
        resource=lambda name, buffered: {},
        read=_read_redis,
        secret=lambda s, name: {"url": _with_password(s.redis_url, "default"),
                                "advanced": {"state_prefix": f"{name}:lf:"}},
    ),
    "s3": MaterializationProfile(
        endpoint=lambda s, name, buffered: {
            "bucket": name, "endpoint_url": s.s3_endpoint_url, "aws_access_key_id": "test",
            "aws_secret_access_key": "test", "create_bucket": True, "advanced": {"overlap": buffered}},
        resource=lambda name, buffered: {"compression": "none", **({"max_age": "1h"} if buffered else {"max_documents": 1})},
        read=_read_s3,
        secret=lambda s, name: {"bucket": name, "endpoint_url": s.s3_endpoint_url, "aws_access_key_id": "test",
                                "aws_secret_access_key": SECRET},
        reapplies=False,
    ),
}


@dataclass
class Endpoint:
    """One test's materialization: a catalog of one single-partition collection bound to it."""

    connector: str
    profile: MaterializationProfile
    servers: Servers
    catalog: Catalog
    endpoint: dict[str, Any]
    resource: dict[str, Any]
    collection: str

    @property
    def topic(self) -> str:
        return Collection.from_catalog(self.catalog, self.collection).topic

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, 0)

    def context(self) -> TaskContext:
        return TaskContext(self.catalog, TASK, "materialization")

    async def started(self, ctx: TaskContext | None = None) -> Any:
        """A new worker of the task, opened (each one is a separate instance, as after a restart)."""
        m = load_connector(self.connector).build(*(ctx or self.context()).for_connector())
        await m.open()
        return m

    def batch(self, *docs: tuple[int, dict[str, Any] | bytes], reapply: bool = False) -> Batch:
        """Records at the given offsets of partition 0; bytes are raw values (not JSON: poison);
        ``reapply``: as `localflow replay` gives them (applied even below the stored offset)."""
        records = [Record(self.topic, 0, offset, TS, None, d, error="value is not JSON")
                   if isinstance(d, bytes) else Record(self.topic, 0, offset, TS, d["id"].encode(), orjson.dumps(d), d)
                   for offset, d in docs]
        return Batch(records, {self.topic: 0}, frozenset({self.tp}) if reapply else frozenset())

    async def held(self) -> Held:
        return await self.profile.read(self.servers, self.endpoint, self.collection, self.resource)


@pytest.fixture
def materialization(materialization_name: str, request: pytest.FixtureRequest, tmp_path: Path,
                    kafka_bootstrap: str, unique_name: Callable[..., str]) -> Callable[..., Endpoint]:
    """Factory of an ``Endpoint`` of the connector under test (``buffered``: see the profile)."""
    profile = MATERIALIZATIONS.get(materialization_name)
    if profile is None:
        pytest.skip(f"materialization {materialization_name!r} has no profile in tests/contract/conftest.py")
    servers = Servers(request)

    def make(*, buffered: bool = False) -> Endpoint:
        name = unique_name("c", sep="-")
        collection = f"{name}/docs"
        endpoint, resource = profile.endpoint(servers, name, buffered), profile.resource(name, buffered)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": kafka_bootstrap},
            "collections": {collection: {"schema": SCHEMA, "key": ["/id"], "partitions": 1}},
            "materializations": {TASK: {"endpoint": {materialization_name: endpoint},
                                        "bindings": [{"source": collection, "resource": resource}]}},
        }, sort_keys=False))
        return Endpoint(materialization_name, profile, servers, load_catalog(path, env={}), endpoint, resource,
                        collection)

    return make


# -------------------------------------------------------------------------------- captures

RAW_SCHEMA = str(Path(__file__).resolve().parents[2] / "examples/sophia/schemas/raw.schema.yaml")
"""The SPEC's raw document schema, which every capture writes."""
CAPTURE = "contract/capture"


class Source:
    """A capture's source the test controls: ``add(i)`` makes source record ``i`` readable,
    ``spoil()`` makes the next read return a body the connector cannot parse."""

    endpoint: dict[str, Any]
    resource: dict[str, Any]

    def ephemeral(self, document: dict[str, Any]) -> bool:
        """Whether a document describes the read itself (a scrape's ``up``), not a source record."""
        return False

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def add(self, i: int) -> None:
        raise NotImplementedError

    def spoil(self) -> None:
        raise NotImplementedError


class _Served(Source):
    """A source behind an aiohttp server on 127.0.0.1: a body of its records, or once a spoiled one."""

    path = "/api"

    def __init__(self) -> None:
        self.records: list[int] = []
        self.spoiled = False

    async def start(self) -> None:
        from aiohttp import web

        from tests.support.sources import serve_on_loopback

        async def answer(request: web.Request) -> web.Response:
            if self.spoiled:
                self.spoiled = False
                return web.Response(text="<html><body>down for maintenance</body></html>", content_type="text/html")
            return web.Response(body=self.body(), content_type="application/json")

        app = web.Application()
        app.router.add_get(self.path, answer)
        self.runner, url = await serve_on_loopback(app)
        self.url = url + self.path

    async def stop(self) -> None:
        await self.runner.cleanup()

    def body(self) -> bytes:
        raise NotImplementedError

    def add(self, i: int) -> None:
        self.records.append(i)

    def spoil(self) -> None:
        self.spoiled = True


class HttpSource(_Served):
    resource = {"records": "/records", "id": "/id"}

    @property
    def endpoint(self) -> dict[str, Any]:  # type: ignore[override]
        return {"url": self.url}

    def body(self) -> bytes:
        return orjson.dumps({"records": [{"id": f"r{i}", "type": "agent_interaction"} for i in self.records]})


class PrometheusSource(_Served):
    path = "/metrics"
    resource: dict[str, Any] = {}

    @property
    def endpoint(self) -> dict[str, Any]:  # type: ignore[override]
        return {"targets": [self.url], "timeout": "1s"}

    def ephemeral(self, document: dict[str, Any]) -> bool:
        return bool(document["data"]["name"] == "up")

    def body(self) -> bytes:
        lines = ["# TYPE contract_records gauge"]
        lines += [f'contract_records{{n="{i}"}} {i} {TS}' for i in self.records]  # explicit times: stable ids
        return ("\n".join(lines) + "\n").encode()


class FilesSource(Source):
    resource = {"globs": ["*.log"]}

    def __init__(self, directory: Path) -> None:
        self.file = directory / "app.log"
        self.file.write_bytes(b"")
        self.endpoint = {"directory": str(directory), "max_line_bytes": 64}

    def add(self, i: int) -> None:
        with self.file.open("ab") as f:
            f.write(orjson.dumps({"id": f"r{i}", "type": "agent_interaction"}) + b"\n")

    def spoil(self) -> None:
        with self.file.open("ab") as f:
            f.write(b"x" * 200 + b"\n")  # over max_line_bytes


CAPTURES: dict[str, Callable[[Path], Source]] = {
    "http": lambda tmp: HttpSource(),
    "prometheus": lambda tmp: PrometheusSource(),
    "files": FilesSource,
}


@dataclass
class Origin:
    """One test's capture: its source, and a catalog binding it to one collection."""

    connector: str
    source: Source
    path: Path
    kafka: str

    def context(self, interval: str = "1s") -> TaskContext:
        self.path.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": self.kafka},
            "collections": {"contract/raw": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}},
            "captures": {CAPTURE: {"interval": interval, "endpoint": {self.connector: self.source.endpoint},
                                   "bindings": [{"target": "contract/raw", "resource": self.source.resource}]}},
        }, sort_keys=False))
        return TaskContext(load_catalog(self.path, env={}), CAPTURE, "capture")

    def build(self, ctx: TaskContext) -> Any:
        return load_connector(self.connector).build(*ctx.for_connector())


@pytest.fixture
async def capture(capture_name: str, tmp_path: Path, kafka_bootstrap: str) -> Any:
    """An ``Origin`` of the connector under test, its source started."""
    make = CAPTURES.get(capture_name)
    if make is None:
        pytest.skip(f"capture {capture_name!r} has no source profile in tests/contract/conftest.py")
    (tmp_path / "source").mkdir()
    source = make(tmp_path / "source")
    await source.start()
    try:
        yield Origin(capture_name, source, tmp_path / "flow.yaml", kafka_bootstrap)
    finally:
        await source.stop()
