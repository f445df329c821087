"""`localflow demo`: the Sophia catalog end to end, as a user runs it (a subprocess).

The demo is pointed at the session services (through `services_env`), so what it wrote can be
counted after it ended. Counts are compared with those taken before it ran: other tests (or an
earlier demo) may have written to the same tables, keys or bucket.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aioboto3
import asyncpg
import pytest
import redis.asyncio as aioredis
import yaml

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "examples" / "sophia" / "flow.yaml"
TABLES = ("sophia_processed_data", "sophia_agent_logs", "sophia_metrics")
BUCKET, ARCHIVE_PREFIX = "sophia-intel-data", "estuary/"
SERVICE_VARS = ("KAFKA_BOOTSTRAP_SERVERS", "POSTGRES_URL", "REDIS_URL", "S3_ENDPOINT_URL")


async def _counts(env: dict[str, str]) -> dict[str, int]:
    """Rows per table of schema estuary, Sophia keys in Redis, archived objects in S3."""
    out: dict[str, int] = {}
    conn = await asyncpg.connect(env["POSTGRES_URL"])
    try:
        for table in TABLES:
            try:
                out[table] = await conn.fetchval(f"SELECT count(*) FROM estuary.{table}")
            except asyncpg.UndefinedTableError:
                out[table] = 0
    finally:
        await conn.close()
    client = aioredis.from_url(env["REDIS_URL"], socket_timeout=60)
    try:
        out["redis keys"] = len([k async for k in client.scan_iter(match="sophia:*", count=1000)])
    finally:
        await client.aclose()
    async with aioboto3.Session().client(
        "s3", endpoint_url=env["S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    ) as s3:
        try:
            listing = await s3.list_objects_v2(Bucket=BUCKET, Prefix=ARCHIVE_PREFIX)
            out["s3 objects"] = listing.get("KeyCount", 0)
        except s3.exceptions.NoSuchBucket:
            out["s3 objects"] = 0
    return out


async def _run(*args: str) -> tuple[int, str, str]:
    """Run `python -m pipeline ARGS` to its end (killed after 4 minutes): exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(240):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_demo_fills_every_table_redis_and_the_archive_and_says_how_to_query_them(
        services_env: dict[str, str]) -> None:
    before = await _counts(services_env)
    code, out, err = await _run("demo", str(CATALOG), "--duration", "20")
    assert code == 0, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    after = await _counts(services_env)
    assert {k: after[k] > before[k] for k in before} == dict.fromkeys(before, True), (before, after)
    port = services_env["POSTGRES_URL"].rsplit(":", 1)[1].split("/")[0]
    assert f"psql -h 127.0.0.1 -p {port}" in out
    assert "redis-cli" in out and f"--endpoint-url {services_env['S3_ENDPOINT_URL']}" in out


async def test_demo_exits_1_naming_the_table_a_materialization_left_empty(
        services_env: dict[str, str], tmp_path: Path, unique_name) -> None:
    # The Sophia catalog without its metrics capture, reading metrics from a fresh (empty) collection.
    text = CATALOG.read_text().replace("sophia/sophia_metrics", f"sophia/{unique_name()}")
    catalog = yaml.safe_load(text)
    del catalog["captures"]["sophia/metrics"]
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    (tmp_path / "schemas").symlink_to(CATALOG.parent / "schemas")
    code, out, err = await _run("demo", str(tmp_path / "flow.yaml"), "--duration", "3")
    assert code == 1, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert "sophia/postgres wrote nothing to estuary.sophia_metrics" in err


async def test_sigterm_ends_the_demo_cleanly_and_stops_the_servers_it_started() -> None:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}  # embedded servers of its own
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "demo", str(CATALOG), "--duration", "0", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        seen = []
        async with asyncio.timeout(120):  # until the processed table has rows, then SIGTERM
            while not re.search(rb"estuary\.sophia_processed_data=[1-9]", line := await proc.stdout.readline()):
                assert line, f"demo ended early: {b''.join(seen).decode()}"
                seen.append(line)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out.decode()}\n--- stderr\n{err.decode()}"
    port = int(re.search(rb"psql -h 127\.0\.0\.1 -p (\d+)", out).group(1))
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
