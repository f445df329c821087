"""What the `files` capture tests share: a catalog over a temp log directory, readers, a log writer.

``log_writer(log, count, per_second, output=...)`` is one of the real processes of the rotation
tests (``python -m tests.support.files write LOG COUNT PER_SECOND``): it appends numbered lines at
a steady rate through an ``O_APPEND`` descriptor and reopens its log on SIGUSR1, as nginx does
when logrotate's ``postrotate`` signals it. The capture task itself runs in-process
(`tests.support.tasks.running`) or as a worker (`tests.support.workers.task_worker`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from pipeline.runtime.catalog import Catalog, KafkaConfig, load_catalog, topic_of
from pipeline.runtime.checkpoint import KafkaCheckpoints
from pipeline.runtime.collection import read_to_end
from tests.support.workers import ROOT, Worker, python_module

RAW_SCHEMA = str(ROOT / "examples/sophia/schemas/raw.schema.yaml")


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


def write_lines(path: Path, lines: Sequence[str]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def log_writer(log: Path, count: int, per_second: float, *, output: Path) -> Worker:
    """The test writer as its own process: ``count`` numbered lines into ``log`` at ``per_second``."""
    return Worker(python_module("tests.support.files", "write", str(log), str(count), str(per_second)), output)


def writer_line(n: int) -> str:
    """Line ``n`` of the test writer; ``writer_number`` reads ``n`` back from a captured message."""
    return f"line {n:07d} GET /api/agents/{n % 97} 200 " + "x" * 60


def writer_number(message: str) -> int:
    return int(message[5:12])


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


if __name__ == "__main__" and sys.argv[1] == "write":
    _write(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
