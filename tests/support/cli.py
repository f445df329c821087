"""Running `localflow` as a user does, in a subprocess, for the tests of its commands (test_cli_*).

    result = localflow("status", str(path))                 # CompletedProcess, text
    with worker(path, "--metrics-port", "0") as w: ...      # `localflow run`, stopped by SIGTERM after
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from pipeline.runtime.catalog import Catalog, load_catalog
from pipeline.runtime.collection import Collection, CollectionWriter
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent

DOC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["id", "n"],
}
"""A small document shape keyed by ``/id``."""


def cli_env(**extra: str) -> dict[str, str]:
    """The current environment (with the session services), wide enough for tables, plus ``extra``."""
    return {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **extra}


def localflow(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `python -m pipeline ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def spawn(*args: str, stdout: Any, stderr: Any, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `python -m pipeline ARGS` (the caller waits for it or signals it)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env or cli_env(),
                            stdout=stdout, stderr=stderr, text=True)


def write_catalog(path: Path, catalog: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def redis_catalog(tmp_path: Path, name: str) -> Path:
    """A collection ``NAME/docs`` and a Redis materialization ``NAME/cache`` reading it (a task
    with a consumer group), on KAFKA_BOOTSTRAP_SERVERS and REDIS_URL."""
    return write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {f"{name}/docs": {"schema": DOC_SCHEMA, "key": ["/id"]}},
        "materializations": {f"{name}/cache": {
            "endpoint": {"redis": {"url": "${REDIS_URL}"}},
            "bindings": [{"source": f"{name}/docs", "resource": {"key": "k:{/id}"}}]}},
    })


class Worker:
    """A `localflow run` process; stderr goes to a file the test can read while it runs."""

    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc, self.log = proc, log

    def output(self) -> str:
        return self.log.read_text()

    def url(self) -> str:
        """The metrics endpoint, once the worker logged it (run with --metrics-port 0)."""
        found = wait_for(lambda: re.search(r"on (http://127\.0\.0\.1:\d+) ", self.output()), timeout=30,
                         message="the worker to log its metrics URL")
        return found.group(1)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@contextmanager
def worker(catalog: Path, *args: str, log: Path, env: dict[str, str] | None = None) -> Iterator[Worker]:
    """`localflow run CATALOG ARGS` until the block ends (then SIGTERM, and SIGKILL if it hangs)."""
    with log.open("w") as err:
        proc = spawn("run", str(catalog), *args, stdout=subprocess.DEVNULL, stderr=err, env=env)
    w = Worker(proc, log)
    try:
        yield w
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def produce(catalog: Catalog | Path, collection: str, docs: list[dict[str, Any]]) -> None:
    """Write documents into a collection of the catalog, as a capture would."""
    cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    async with CollectionWriter(cat.kafka, "test-writer") as writer:
        await writer.write(Collection.from_catalog(cat, collection), docs)
