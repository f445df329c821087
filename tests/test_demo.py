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
import httpx
import orjson
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


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `python -m pipeline ARGS` to its end (killed after 4 minutes): exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(240):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


def assert_closed(port: int) -> None:
    """Nothing listens on ``port`` any more (the demo stopped the server it started there)."""
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


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
    assert_closed(port)


def test_the_live_view_of_the_sophia_catalog_fits_80_columns_and_24_lines() -> None:
    from rich.console import Console

    from pipeline.embedded.demo import Endpoints, Snapshot, render
    from pipeline.embedded.services import Services
    from pipeline.runtime.catalog import load_catalog

    catalog = load_catalog(CATALOG)
    endpoints = Endpoints(catalog, Services())

    def busy(at: float, k: int) -> Snapshot:
        """Large counts, every task restarting with a long error: the widest and tallest view."""
        return Snapshot(at, documents=dict.fromkeys(catalog.collections, 123_456 * k),
                        dead=dict.fromkeys(catalog.collections, 12 * k),
                        tasks={n: {"state": "restarting", "documents": 123_456 * k, "restarts": 3, "lag": "12,345",
                                   "error": "EndpointError: " + "x" * 300} for n in catalog.task_names()},
                        endpoints={(t.materialization, t.label): 99_999 * k for t in endpoints.targets},
                        sources={"api_records": 123_456, "api_requests": 1_234, "log_lines": 123_456})

    console = Console(width=80, height=24, record=True)
    console.print(render(catalog, busy(10.0, 2), busy(0.0, 1),
                         "localflow demo: examples/sophia/flow.yaml: 1234s, 1000s left (Ctrl-C stops)",
                         endpoints.targets))
    lines = console.export_text().rstrip("\n").split("\n")
    assert len(lines) <= 24 and max(map(len, lines)) <= 80, "\n".join(lines)
    header = next(line for line in lines if line.startswith("task "))
    assert header.split() == ["task", "state", "documents", "rate", "lag", "(docs)", "restarts"], "lag in documents"
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.strip()}
    assert rows["sophia_metrics"][-3:] == ["199,998"] * 3, "postgres rows, redis keys, s3 objects per collection"


async def _line_matching(stream: asyncio.StreamReader, pattern: bytes, seen: list[bytes]) -> re.Match[bytes]:
    while not (found := re.search(pattern, line := await stream.readline())):
        assert line, f"demo ended early: {b''.join(seen).decode()}"
        seen.append(line)
    seen.append(line)
    return found


async def test_kept_services_answer_preview_status_and_postgres_with_the_printed_exports() -> None:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS} | {"PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "demo", str(CATALOG), "--duration", "0", "--keep-services",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    seen: list[bytes] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(120):
            metrics_url = (await _line_matching(proc.stdout, rb"^metrics on (\S+/metrics) ", seen))[1].decode()
            exports: dict[str, str] = {}
            while "AWS_DEFAULT_REGION" not in exports:
                line = await _line_matching(proc.stdout, rb"^  export (.+)$", seen)
                exports |= dict(kv.split("=", 1) for kv in line[1].decode().split())
            async with httpx.AsyncClient() as client:
                scrape = await client.get(metrics_url)
            assert scrape.status_code == 200 and "localflow_output_documents_total" in scrape.text
            await _line_matching(proc.stdout, rb"sophia_raw_data=[1-9]", seen)
            shell = env | exports
            status = await _run("status", str(CATALOG), "--output", "json", env=shell)
            report = orjson.loads(status[1])
            assert report["workers"] == [metrics_url.removesuffix("/metrics")], "status finds the demo"
            proc.send_signal(signal.SIGTERM)  # the tasks stop; the servers stay
            await _line_matching(proc.stdout, rb"^Ctrl-C or SIGTERM stops them\.", seen)
        code, out, err = await _run("preview", "sophia/sophia_raw_data", "--catalog", str(CATALOG),
                                    "--from-beginning", "-n", "1", env=shell)
        assert code == 0, err
        assert orjson.loads(out)["source"]
        conn = await asyncpg.connect(exports["POSTGRES_URL"])
        try:
            assert await conn.fetchval("SELECT count(*) FROM estuary.sophia_metrics") > 0
        finally:
            await conn.close()
        proc.send_signal(signal.SIGTERM)
        rest, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"{b''.join(seen).decode()}{rest.decode()}\n--- stderr\n{err.decode()}"
    port = int(exports["POSTGRES_URL"].rsplit(":", 1)[1].split("/")[0])
    assert_closed(port)



async def test_on_a_terminal_the_demo_keeps_its_servers_until_enter() -> None:
    """An 80x24 pseudo-terminal, as a user's: the run ends, the servers stay, Enter stops them."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS} | {"TERM": "xterm"}
    env.pop("COLUMNS", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "demo", str(CATALOG), "--duration", "3", cwd=ROOT, env=env,
        stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    screen = b""
    try:
        async with asyncio.timeout(120):
            while b"Press Enter to stop them." not in screen:
                chunk = await asyncio.to_thread(os.read, leader, 65536)
                assert chunk, screen.decode(errors="replace")
                screen += chunk
            text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", screen).decode(errors="replace")
            assert re.search(r"export KAFKA_BOOTSTRAP_SERVERS=127\.0\.0\.1:\d+", text), text
            port = int(re.search(r"export POSTGRES_URL=postgresql://postgres@127\.0\.0\.1:(\d+)/", text)[1])
            socket.create_connection(("127.0.0.1", port), timeout=5).close()  # still up
            os.write(leader, b"\r")
            assert await proc.wait() in (0, 1), text  # the verdict of a 3 s run (0 or 1) does not matter here
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(leader)
    assert_closed(port)
