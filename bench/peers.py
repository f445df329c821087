"""localflow next to the Python pipelines a user would otherwise pick, in the same run.

Every contender is its own process (localflow: ``python -m pipeline run``, as deployed; Quix
Streams and Pathway: a small program in their own venv under ``bench/.venvs/``, which ``make
bench`` creates, so their dependencies never touch ours). Each reads the same Tansu topic (the
stages' raw collection: ``sizes.docs`` Sophia documents, 3 partitions) with a consumer group of
its own and the same session timeout (10 s: with librdkafka's default 45 s, Tansu holds the
group join about 23 s and the wall time measures nothing else), and writes the same endpoint.

Measured from outside, polling the endpoint every 50 ms: wall time from the process start to
the last row, when the first rows appeared (startup and group join), the steady-state rate
(documents after the first poll that saw rows, over the time to the last row), and the CPU
seconds of the contender's process tree (from start, and from its first row: the steady part),
beside those of the whole benchmark tree (broker and database included: a contender that makes
PostgreSQL work harder pays for it there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aioboto3
import asyncpg
from redis.asyncio import Redis

from bench.common import PER_DOCS, Row, tree_cpu
from bench.harness import PG_SCHEMA, ROOT, Bench, BenchError, Source, pg_ident, pg_table
from bench.stages import _expect_keys
from pipeline.runtime.catalog import Catalog

VENVS = ROOT / "bench" / ".venvs"
APPS = ROOT / "bench" / "peer_apps"
SESSION_TIMEOUT_MS = 10_000
POLL_S = 0.05
S3_BUCKET = "localflow-peers"
S3_FLUSH_S = 1.0
"""How long a document may wait for its S3 object: localflow's ``max_age``, Quix's ``commit_interval``
(its file sink writes at every checkpoint). Both time-bound, so the last objects of a run come at
most this long after the last document was read."""
PEERS = {
    "Quix Streams": ("quixstreams", "quix_app.py", ("postgres", "redis", "s3")),
    "Pathway": ("pathway", "pathway_app.py", ("postgres",)),
}
"""name -> (venv under bench/.venvs, program in bench/peer_apps, the sinks it has here)."""


@dataclass
class Race:
    """One contender's run, from its process start to the endpoint holding every document."""

    wall: float
    first_row: float
    steady_rate: float
    cpu: float
    """CPU seconds of the contender's process tree, start to last row."""
    steady_cpu: float
    """... from the first rows to the last."""
    tree_cpu: float
    """CPU seconds of the whole benchmark tree in the same window (services included)."""


class Endpoint:
    """What is polled: how many documents the endpoint holds (cheap enough to ask every 50 ms)."""

    def __init__(self, count: Callable[[], Awaitable[int]], cleanup: Callable[[], Awaitable[None]]) -> None:
        self.count = count
        self.cleanup = cleanup


async def race(b: Bench, label: str, command: list[str], endpoint: Endpoint, n: int, *,
               cwd: Path = ROOT, within: float = 300.0) -> Race:
    """Start ``command``, poll ``endpoint`` until it holds ``n`` documents, then stop the process."""
    log_path = b.workdir / f"{label.replace(' ', '_')}_{b.name('peer')}.log"
    before = tree_cpu()
    started = time.monotonic()
    proc = _spawn(command, cwd, b.env, log_path)
    try:
        first: tuple[float, int, float] | None = None
        while True:
            got = await endpoint.count()
            now = time.monotonic()
            if got and first is None:
                first = (now, got, tree_cpu(proc.pid))
            if got >= n:
                cpu, whole = tree_cpu(proc.pid), tree_cpu() - before
                break
            if proc.poll() is not None:
                raise BenchError(f"{label} exited with {proc.returncode} after {now - started:.1f} s "
                                 f"({got}/{n} documents):\n{_tail(log_path)}")
            if now - started > within:
                raise BenchError(f"{label}: {got}/{n} documents after {within:.0f} s:\n{_tail(log_path)}")
            await asyncio.sleep(POLL_S)  # polling the endpoint, with a deadline
    finally:
        await _stop(proc)
    assert first is not None
    at, seen, cpu_at_first = first
    # Rows after the first poll that saw some, over the time to the last; when every row came at
    # once, at least n per poll period (the resolution of the measure).
    steady = (n - seen) / (now - at) if seen < n and now > at else n / POLL_S
    return Race(now - started, at - started, steady, cpu, cpu - cpu_at_first, whole)


def _spawn(command: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The contender in a process group of its own (so its children are stopped with it)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


async def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM to the contender's own process group (it started one), SIGKILL after ``grace``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pg_settings(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {"host": parts.hostname or "127.0.0.1", "port": parts.port or 5432,
            "dbname": (parts.path or "/postgres").lstrip("/") or "postgres",
            "user": unquote(parts.username or "postgres"), "password": unquote(parts.password or "")}


def _redis_settings(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {"host": parts.hostname or "127.0.0.1", "port": parts.port or 6379,
            "db": int((parts.path or "/0").lstrip("/") or 0)}


# ---------------------------------------------------------------------------- endpoints


def pg_endpoint(conn: asyncpg.Connection, qualified: str) -> Endpoint:
    async def count() -> int:
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM {qualified}"))
        except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
            return 0

    async def cleanup() -> None:
        await conn.execute(f"DROP TABLE IF EXISTS {qualified}")

    return Endpoint(count, cleanup)


def redis_endpoint(client: Redis, prefix: str, src: Source, also: str | None = None) -> Endpoint:
    """Done when the last document of every partition has its key (writers keep partition order):
    cheaper to poll than counting 100,000 keys; the keys are counted once at the end."""
    last: dict[int, str] = {}
    for (p, _), doc in zip(src.placement, src.docs, strict=True):
        last[p] = f"{prefix}:{doc['metadata']['id']}"
    firsts = [f"{prefix}:{doc['metadata']['id']}" for doc in src.docs[:: max(1, src.n // 50)]]

    async def count() -> int:
        if await client.exists(*last.values()) == len(last):
            return src.n
        return 1 if await client.exists(*firsts) else 0

    async def cleanup() -> None:
        await _expect_keys(client, prefix, src.n, also=also)

    return Endpoint(count, cleanup)


def s3_endpoint(s3c: Any, bucket: str, prefix: str, n: int) -> Endpoint:
    """Documents are the lines of the JSON-lines objects under ``prefix`` (each contender names and
    frames its objects its own way); an object, once listed, is whole and read once."""
    lines: dict[str, int] = {}

    async def count() -> int:
        async for page in s3c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                key = o["Key"]
                if key not in lines and key.endswith(".jsonl"):
                    body = await (await s3c.get_object(Bucket=bucket, Key=key))["Body"].read()
                    lines[key] = body.count(b"\n") + (not body.endswith(b"\n") and bool(body))  # a last line unended
        return sum(lines.values())

    async def cleanup() -> None:
        held = await count()
        keys = [{"Key": k} for k in lines]
        for i in range(0, len(keys), 1000):
            await s3c.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000]})
        if held != n:
            raise BenchError(f"S3 objects under s3://{bucket}/{prefix} hold {held} lines, expected {n}")

    return Endpoint(count, cleanup)


# ---------------------------------------------------------------------------- contenders


def localflow_command(b: Bench, src: Source, sink: str, target: str) -> tuple[list[str], Catalog]:
    task = f"bench/{b.name('peer_lf')}"
    if sink == "postgres":
        endpoint: dict[str, Any] = {"postgres": {"url": "${POSTGRES_URL}", "schema": PG_SCHEMA}}
        resource: dict[str, Any] = {"table": target}
    elif sink == "s3":
        endpoint = {"s3": {"bucket": S3_BUCKET, "endpoint_url": "${S3_ENDPOINT_URL}", "create_bucket": True,
                           "aws_access_key_id": "${AWS_ACCESS_KEY_ID}", "aws_secret_access_key": "${AWS_SECRET_ACCESS_KEY}"}}
        # Quix's sink writes each partition's file at every checkpoint (its commit_interval): both get
        # the same bound on how long a document waits for its object (S3_FLUSH_S).
        resource = {"prefix": target + "/", "compression": "none", "max_age": f"{S3_FLUSH_S:g}s"}
    else:
        endpoint, resource = {"redis": {"url": "${REDIS_URL}"}}, {"key": target + ":{/metadata/id}"}
    cat = b.catalog({
        "collections": {src.collection: b.raw_collection(src.partitions)},
        "materializations": {task: {"endpoint": endpoint, "bindings": [{"source": src.collection,
                                                                        "resource": resource}]}},
    })
    assert cat.path is not None
    return [sys.executable, "-m", "pipeline", "run", str(cat.path), "--task", task], cat


def peer_command(b: Bench, peer: str, src: Source, sink: str, target: str) -> list[str] | str:
    """The peer's command line, or why it cannot run here."""
    venv, app, _ = PEERS[peer]
    python = VENVS / venv / "bin" / "python"
    if not (VENVS / venv / ".installed").exists():
        return (f"not installed: no venv at bench/.venvs/{venv} (`make peers`, run by `make bench`, creates it; "
                f"if it failed, bench/.venvs/{venv}-install.log says why)")
    cfg: dict[str, Any] = {"bootstrap": b.kafka.bootstrap_servers, "topic": src.topic, "group": b.name("peer_group"),
                           "session_timeout_ms": SESSION_TIMEOUT_MS, "sink": sink, "table": target,
                           "postgres": _pg_settings(b.services.postgres.url)}
    if sink == "redis":
        cfg["redis"] = {**_redis_settings(b.services.redis.url), "prefix": target}
    if sink == "s3":
        cfg["commit_interval"] = S3_FLUSH_S
        cfg["s3"] = {"bucket": S3_BUCKET, "endpoint_url": b.services.s3.endpoint_url, "prefix": target,
                     "access_key": b.env["AWS_ACCESS_KEY_ID"], "secret_key": b.env["AWS_SECRET_ACCESS_KEY"]}
    return [str(python), str(APPS / app), json.dumps(cfg)]


async def peers(b: Bench) -> list[Row]:
    """Kafka -> PostgreSQL (and Redis and S3, for the peer that has those sinks): localflow, Quix
    Streams, Pathway, each in turn per repetition."""
    src = await b.source()
    n = src.n
    conn = await asyncpg.connect(b.services.postgres.url)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {pg_ident(PG_SCHEMA)}")
    client = Redis.from_url(b.services.redis.url)
    session = aioboto3.Session(aws_access_key_id=b.env["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=b.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    stack = contextlib.AsyncExitStack()
    s3c = await stack.enter_async_context(session.client("s3", endpoint_url=b.services.s3.endpoint_url))
    rows: list[Row] = []
    try:
        await s3c.create_bucket(Bucket=S3_BUCKET)  # Quix's sink needs it to exist
        for sink in ("postgres", "redis", "s3"):
            races: dict[str, list[Race]] = {"localflow": []}
            why: dict[str, str] = {}
            contenders = ["localflow", *(p for p, (_, _, sinks) in PEERS.items() if sink in sinks)]
            for _ in range(b.sizes.reps):
                for who in contenders:
                    if who in why:
                        continue
                    target = b.name(f"peer_{sink}")
                    if who == "localflow":
                        command: list[str] | str = localflow_command(b, src, sink, target)[0]
                    else:
                        command = peer_command(b, who, src, sink, target)
                    if isinstance(command, str):
                        why[who] = command
                        continue
                    if sink == "postgres":
                        qualified = pg_table(target) if who == "localflow" else pg_ident(target)
                        endpoint = pg_endpoint(conn, qualified)
                    elif sink == "s3":
                        endpoint = s3_endpoint(s3c, S3_BUCKET, target + "/", n)
                    else:
                        also = f"localflow:pos:{target}:" if who == "localflow" else None
                        endpoint = redis_endpoint(client, target, src, also)
                    try:
                        races.setdefault(who, []).append(await race(b, who, command, endpoint, n))
                    except BenchError as e:
                        why[who] = f"FAILED: {e}" if who == "localflow" else f"could not run here: {e}"
                    finally:
                        try:
                            await endpoint.cleanup()
                        except BenchError as e:
                            why.setdefault(who, f"wrong result: {e}")
            rows += peer_rows(sink, n, contenders, races, why)
    finally:
        await stack.aclose()
        await client.aclose()
        await conn.close()
    return rows


def peer_rows(sink: str, n: int, contenders: list[str], races: dict[str, list[Race]],
              why: dict[str, str]) -> list[Row]:
    """One row per contender (medians); localflow's says whether it is ahead of every peer that ran."""
    out: list[Row] = []
    scale = PER_DOCS / n
    for who in contenders:
        runs = races.get(who, [])
        label = f"peers {sink}: {who}"
        if who in why and not runs:
            out.append(Row(label, "docs/s", 0.0, note=why[who], met=False if who == "localflow" else None))
            continue

        def med(field: str, runs: list[Race] = runs) -> float:
            return statistics.median(getattr(r, field) for r in runs)

        row = Row(label, "docs/s", med("steady_rate"), runs={
            "steady_docs_per_s": [round(r.steady_rate, 1) for r in runs],
            "wall_s": [round(r.wall, 2) for r in runs], "first_row_s": [round(r.first_row, 2) for r in runs],
            "cpu_s": [round(r.cpu, 2) for r in runs], "steady_cpu_s": [round(r.steady_cpu, 2) for r in runs],
            "tree_cpu_s": [round(r.tree_cpu, 2) for r in runs]})
        row.cpu_100k = med("cpu") * scale
        row.figures = {"wall_s": med("wall"), "first_row_s": med("first_row"),
                       "steady_cpu_100k": med("steady_cpu") * scale, "tree_cpu_100k": med("tree_cpu") * scale}
        row.note = (f"wall {med('wall'):.1f} s from start, first rows after {med('first_row'):.1f} s; CPU-s per "
                    f"100k: {row.cpu_100k:.2f} process tree from start, {row.figures['steady_cpu_100k']:.2f} "
                    f"first row to last, {row.figures['tree_cpu_100k']:.2f} with the services"
                    + (f"; {why[who]}" if who in why else ""))
        out.append(row)
    lf = out[0]
    ran = [r for r in out[1:] if r.figures]
    if lf.figures and ran:
        lf.target = "ahead of every peer (steady docs/s and CPU/doc)"
        lf.met = all(lf.localflow > r.localflow and (lf.cpu_100k or 0) < (r.cpu_100k or 0) for r in ran)
        best = max(ran, key=lambda r: r.localflow)
        lf.ceiling = best.localflow
        lf.note += f"; the ceiling column is the fastest peer ({best.stage.split(': ', 1)[1]})"
    return out
