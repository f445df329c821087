"""Real `logrotate` rotating a log that a real process writes at a steady rate, under the `files` capture.

Every scheme runs twice: with the capture running through the rotation, and with the capture
killed -9 before the rotation and restarted after it. Each line the writer wrote is counted:
it must be in the collection under exactly one key (0 lost, 0 doubled). A batch re-sent after
the kill carries the keys it had (the capture guarantee), so it doubles no line.

`copytruncate` loses, in logrotate itself, whatever is written between its copy and its
truncation (its man page says so); the writer is stopped (SIGSTOP) across the `logrotate`
call in those schemes only, so that every line the test counts as lost is the capture's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.files import Flow, log_writer, writer_number
from tests.support.waiting import wait_for_async
from tests.support.workers import task_worker

pytestmark = pytest.mark.system

LOGROTATE = shutil.which("logrotate", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
TOTAL, RATE = 1500, 400.0  # lines, lines per second: about 4 s of writing
SCHEMES = {
    "create": "create\n",
    "copytruncate": "copytruncate\n",
    "copytruncate-compress-delaycompress": "copytruncate\ncompress\ndelaycompress\n",
    "copytruncate-compress": "copytruncate\ncompress\n",
    "dateext": "create\ndateext\n",
}


@pytest.fixture
def flow(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> Flow:
    if LOGROTATE is None:
        pytest.fail("logrotate is not installed: run `make test-system` (it installs it)")
    f = Flow(tmp_path, kafka_bootstrap, f"rotation/{unique_name('cap')}", f"rotation/{unique_name()}")
    f.logs.mkdir()
    return f


def logrotate_conf(flow: Flow, scheme: str, writer_pid: int) -> Path:
    signal_writer = "" if "copytruncate" in scheme else f"postrotate\n  kill -USR1 {writer_pid}\nendscript\n"
    conf = flow.root / "logrotate.conf"
    conf.write_text(f"{flow.logs / 'agent.log'} {{\nrotate 5\nmissingok\n{SCHEMES[scheme]}{signal_writer}}}\n")
    return conf


def rotate(flow: Flow, conf: Path) -> None:
    done = subprocess.run([LOGROTATE, "-f", "-s", str(flow.root / "logrotate.state"), str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


async def count_lines(flow: Flow) -> dict[int, set[str]]:
    """Writer line number -> the keys it was captured under."""
    keys: dict[int, set[str]] = defaultdict(set)
    for d in await flow.documents():
        keys[writer_number(d["data"]["message"])].add(d["metadata"]["id"])
    return keys


async def wait_until_finished(flow: Flow) -> None:
    """Every line captured, and the rotated file retired (read to its end on two rescans): a
    capture that would read something twice has done it by then."""
    async def done() -> bool:
        if len(await count_lines(flow)) < TOTAL:
            return False
        state = await flow.checkpoint() or {"files": {}}
        return sum("retired" not in e for e in state["files"].values()) == 1

    await wait_for_async(done, timeout=90, interval=0.3, message=f"{TOTAL} lines in {flow.collection}")


@pytest.mark.parametrize("killed", [False, True], ids=["running", "killed"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
async def test_logrotate_loses_and_doubles_no_line(flow: Flow, scheme: str, killed: bool) -> None:
    flow.catalog(interval="300ms")
    proc_log = flow.root / "processes.log"
    writer = log_writer(flow.logs / "agent.log", TOTAL, RATE, output=proc_log)
    capture = task_worker(flow.root / "flow.yaml", flow.task, proc_log)
    try:
        await wait_for_async(lambda: _captured_at_least(flow, TOTAL // 4), timeout=60, interval=0.2,
                             message="the capture under way")
        if killed:
            await capture.ended()  # kill -9, mid-stream
        pause = "copytruncate" in scheme
        if pause:
            writer.pause()
        try:
            rotate(flow, logrotate_conf(flow, scheme, writer.pid))
        finally:
            if pause:
                writer.resume()
        rotated = sorted(p.name for p in flow.logs.iterdir())
        assert len(rotated) == 2, rotated  # agent.log and one rotated copy
        if killed:
            await asyncio.sleep(0.5)  # the writer goes on while the capture is down (a real gap)
            capture = task_worker(flow.root / "flow.yaml", flow.task, proc_log)
        await writer.exited(timeout=60)
        await wait_until_finished(flow)
    finally:
        await writer.ended()
        await capture.ended(signal.SIGTERM)

    keys = await count_lines(flow)
    lost = sorted(set(range(TOTAL)) - set(keys))
    doubled = sorted(n for n, ks in keys.items() if len(ks) > 1)
    print(f"\n{scheme}, capture {'killed -9 and restarted' if killed else 'running'}: files {rotated}, "
          f"{TOTAL} lines written, {len(lost)} lost, {len(doubled)} doubled")
    assert (lost, doubled) == ([], [])


async def _captured_at_least(flow: Flow, n: int) -> bool:
    return len(await flow.documents()) >= n
