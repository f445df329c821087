"""What the `files` capture tests share: a catalog over a temp log directory, a running task, readers.

Run as a script it is one of the real processes of the kill -9 and rotation tests:
``python tests/files_support.py <catalog> <task>`` runs the capture task until it is killed;
``python tests/files_support.py write <log> <count> <per second>`` is a log writer: it appends
numbered lines at a steady rate through an ``O_APPEND`` descriptor and reopens its log on
SIGUSR1, as nginx does when logrotate's ``postrotate`` signals it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from pipeline.runtime.catalog import Catalog, KafkaConfig, load_catalog, topic_of
from pipeline.runtime.checkpoint import KafkaCheckpoints
from pipeline.runtime.collection import read_to_end
from pipeline.runtime.task import TaskContext, run_tasks

RAW_SCHEMA = str(Path(__file__).resolve().parent.parent / "examples/sophia/schemas/raw.schema.yaml")


@dataclass
class Flow:
    """One capture task tailing ``logs`` into one collection, with names no other test uses."""

    root: Path
    kafka_bootstrap: str
    task: str
    collection: str

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def kafka(self) -> KafkaConfig:
        return KafkaConfig(bootstrap_servers=self.kafka_bootstrap)

    @property
    def topic(self) -> str:
        return topic_of(self.collection)

    def catalog(self, *, globs: Sequence[str] = ("*.log",), mask: Sequence[str] = (), interval: str = "500ms",
                **endpoint: Any) -> Catalog:
        """Write and load the catalog; ``endpoint`` adds `files` settings (start_at, advanced...)."""
        spec = {
            "kafka": {"bootstrap_servers": self.kafka_bootstrap},
            "collections": {self.collection: {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}},
            "captures": {self.task: {
                "interval": interval,
                "endpoint": {"files": {"directory": str(self.logs), **endpoint}},
                "bindings": [{"target": self.collection, "resource": {"globs": list(globs)}, "mask": list(mask)}],
            }},
        }
        path = self.root / "flow.yaml"
        path.write_text(yaml.safe_dump(spec))
        return load_catalog(path, env={})

    async def documents(self) -> list[dict[str, Any]]:
        """Every document of the collection, in topic order."""
        return [r.doc for r in await read_to_end(self.kafka, self.topic, timeout=60)]

    async def raw_values(self) -> list[bytes]:
        """The message bytes of the collection and its dead-letter topic, exactly as stored."""
        topics = (self.topic, self.topic + ".dead")
        return [r.value for t in topics for r in await read_to_end(self.kafka, t, timeout=60)]

    async def messages(self) -> list[str]:
        return [d["data"].get("message", d["data"].get("msg")) for d in await self.documents()]

    async def dead_letters(self) -> list[dict[str, Any]]:
        return [orjson.loads(r.value) for r in await read_to_end(self.kafka, self.topic + ".dead", timeout=60)]

    async def checkpoint(self) -> dict[str, Any] | None:
        """The task's saved state: ``{"version": 1, "files": {fingerprint: {...}}}``."""
        return await KafkaCheckpoints(self.kafka).load(self.task)


@asynccontextmanager
async def running(catalog: Catalog, task: str, *, expect_errors: bool = False) -> AsyncIterator[TaskContext]:
    """The capture task, supervised as in production, until the block ends (then stopped cleanly)."""
    from tests.helpers import running as supervised  # not at the top: this file also runs as a script

    async with supervised(catalog, task) as ctx:
        yield ctx
    if not expect_errors:
        assert ctx.status.last_error is None, ctx.status.last_error


def write_lines(path: Path, lines: Sequence[str]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())


async def start_process(*args: str, log: Path) -> asyncio.subprocess.Process:
    """``python tests/files_support.py ARGS`` (a capture task or a writer), output appended to ``log``."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(sys.executable, SCRIPT, *args, cwd=ROOT, stdout=out,
                                                    stderr=asyncio.subprocess.STDOUT)


async def end_process(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to a process this test started (if it still runs) and reap it."""
    if proc.returncode is None:
        proc.send_signal(sig)
    await asyncio.wait_for(proc.wait(), timeout=30)


def writer_line(n: int) -> str:
    """Line ``n`` of the test writer; ``writer_number`` reads ``n`` back from a captured message."""
    return f"line {n:07d} GET /api/agents/{n % 97} 200 " + "x" * 60


def writer_number(message: str) -> int:
    return int(message[5:12])


async def _run_until_killed(catalog_path: str, task: str) -> None:
    await run_tasks(load_catalog(catalog_path), [task], asyncio.Event())


def _write(log: str, count: int, per_second: float) -> None:
    reopen = False

    def on_usr1(signum: int, frame: object) -> None:
        nonlocal reopen
        reopen = True

    signal.signal(signal.SIGUSR1, on_usr1)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = time.monotonic()
    for n in range(count):
        if reopen:
            reopen = False
            os.close(fd)
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, (writer_line(n) + "\n").encode())
        time.sleep(max(0.0, start + (n + 1) / per_second - time.monotonic()))
    os.close(fd)


if __name__ == "__main__":
    if sys.argv[1] == "write":
        _write(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        asyncio.run(_run_until_killed(sys.argv[1], sys.argv[2]))
