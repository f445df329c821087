"""What the `files` capture tests share: a catalog over a temp log directory, a running task, readers.

Run as a script it is the capture process of the kill -9 test:
``python tests/files_support.py <catalog> <task>`` runs the task until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from pipeline.catalog import Catalog, KafkaConfig, load_catalog, topic_of
from pipeline.checkpoint import KafkaCheckpoints
from pipeline.collection import read_to_end
from pipeline.task import TaskContext, run_tasks

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


async def _run_until_killed(catalog_path: str, task: str) -> None:
    await run_tasks(load_catalog(catalog_path), [task], asyncio.Event())


if __name__ == "__main__":
    asyncio.run(_run_until_killed(sys.argv[1], sys.argv[2]))
