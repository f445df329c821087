"""The one launcher of a test's processes: a task of a catalog as its own worker process (or any
command: `localflow run`, a log writer), its log file, its environment, and how it ends.

Why one: tests kill -9, SIGSTOP and SIGTERM workers to prove the guarantees; each such test had
its own Popen, its own teardown and its own way of showing the log of a worker that failed.

    with task_worker(catalog_path, task, log) as w:   # python -m tests.support.workers ...
        ...
        w.kill()                                       # SIGKILL by PID, reaped
        assert w.stop() == 0, w.tail()                 # SIGTERM, wait for the exit code

Run as a script it is the worker itself:

    python -m tests.support.workers CATALOG TASK [OPTIONS_JSON]

Runs TASK (a capture, derivation or materialization) supervised, restarted with a short backoff
after a failure (e.g. when it was fenced), until SIGTERM, then exits 0. OPTIONS_JSON is the task's
runtime options; by default a short consumer session (``READER``), so that the group notices a
killed or paused worker quickly. Logs go to stderr.

``held`` is a Python transform for the zombie trial: the identity (plus the worker's pid), except
that a worker started with ``LOCALFLOW_TEST_HOLD=DIR`` stops in its first batch: it creates
``DIR/holding`` and waits for ``DIR/released``, holding the batch while the test pauses it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent

READER = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}
"""Reader options of a worker that tests kill or pause: a short session, quick heartbeats."""

HOLD = "LOCALFLOW_TEST_HOLD"


class Worker:
    """One process started by a test: ``argv`` from the repository root, output appended to ``log``.

    stderr goes to ``log`` (appended, or a fresh file unless ``append``); stdout too, unless
    ``stdout`` names another file or is DEVNULL. Leaving the ``with`` block ends the process if it
    still runs (resumed, SIGTERM, SIGKILL after ``grace``).
    """

    def __init__(self, argv: list[str], log: Path, *, env: dict[str, str] | None = None,
                 stdout: Path | int | None = None, append: bool = True, grace: float = 60) -> None:
        self.argv, self.log, self.grace = argv, log, grace
        with log.open("ab" if append else "wb") as err:
            out: Any = err if stdout is None else stdout if isinstance(stdout, int) else stdout.open("wb")
            try:
                self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=err)
            finally:
                if isinstance(stdout, Path):
                    out.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` by PID if the process still runs."""
        if self.alive:
            os.kill(self.pid, sig)

    def pause(self) -> None:
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)

    def kill(self, timeout: float = 30) -> int:
        """SIGKILL: the process ends at once, mid-whatever, as in a crash or an OOM kill; reaped."""
        self.send(signal.SIGKILL)
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` (a paused process is resumed first) and wait for the exit code."""
        self.resume()
        self.send(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        """The exit code; AssertionError (with the log's tail) if it still runs after ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self} still runs after {timeout:g}s:\n{self.tail()}") from None

    async def ended(self, sig: signal.Signals = signal.SIGKILL, timeout: float = 30) -> int:
        """`stop` off the event loop (the loop goes on serving while the process exits)."""
        return await asyncio.to_thread(self.stop, sig, timeout)

    async def exited(self, timeout: float = 60) -> int:
        """`wait` off the event loop, for a process that ends by itself."""
        return await asyncio.to_thread(self.wait, timeout)

    def close(self) -> None:
        """End the process if it still runs: resumed, SIGTERM, then SIGKILL after ``grace``
        (at once with ``grace=0``: a paused zombie must not finish its batch after the test)."""
        if not self.alive:
            return
        self.resume()
        if self.grace > 0:
            self.send(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.grace)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def url(self, pattern: str = r"metrics, health and status on (http://127\.0\.0\.1:\d+) ",
            what: str = "its metrics URL") -> str:
        """The first URL the process logged that ``pattern`` matches (`localflow run --metrics-port 0`)."""
        found = wait_for(lambda: re.search(pattern, self.output()), timeout=30, message=f"{self} to log {what}")
        return found.group(1)

    def tail(self, chars: int = 3000) -> str:
        """The end of the log, for an assertion message."""
        return f"{self} log {self.log}:\n{self.output()[-chars:]}"

    def assert_exit(self, code: int | None, expected: int = 0) -> None:
        """Fail with the log of a worker that exited otherwise than ``expected``."""
        assert code == expected, f"{self} exited {code}, not {expected}\n{self.tail()}"

    def __str__(self) -> str:
        return f"process {self.pid} ({' '.join(self.argv[2:5])})"

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def python_module(module: str, *args: str) -> list[str]:
    """The argv of ``python -m MODULE ARGS`` in this interpreter."""
    return [sys.executable, "-m", module, *args]


def task_worker(catalog: Path | str, task: str, log: Path, *, options: dict[str, Any] | None = None,
                env: dict[str, str] | None = None, grace: float = 60) -> Worker:
    """TASK of CATALOG supervised in a process of its own (this module as a script); see the docstring."""
    args = [str(catalog), task] + ([json.dumps(options)] if options is not None else [])
    return Worker(python_module("tests.support.workers", *args), log, env=env, grace=grace)


_held = False


def held(doc: dict[str, Any]) -> dict[str, Any]:
    global _held  # noqa: PLW0603 - once per process
    hold = os.environ.get(HOLD)
    if hold and not _held:
        _held = True
        Path(hold, "holding").touch()
        deadline = time.monotonic() + 120
        while not Path(hold, "released").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # this is the stall itself (on the engine's thread)
    return {**doc, "worker": os.getpid()}


async def _main(catalog_path: str, task: str, options: dict[str, Any]) -> None:
    from pipeline.runtime.catalog import load_catalog
    from pipeline.runtime.task import Backoff, TaskContext, kind_of, supervise

    catalog = load_catalog(catalog_path)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    ctx = TaskContext(catalog, task, kind_of(catalog, task), stopping, options)
    await supervise(ctx, Backoff(initial=0.2, maximum=2.0))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    asyncio.run(_main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {"reader": READER}))
