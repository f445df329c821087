"""One materialization task in its own process, for tests that kill -9, pause or SIGTERM it.

    python tests/materialization_worker.py CATALOG TASK

Runs TASK supervised (restarted with backoff after a failure, e.g. when it was fenced) until
SIGTERM, then exits 0. A short consumer session lets the group notice a killed or paused worker
quickly. Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.runtime.catalog import load_catalog  # noqa: E402
from pipeline.runtime.task import Backoff, TaskContext, supervise  # noqa: E402

READER = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


async def main(catalog: str, task: str) -> None:
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    ctx = TaskContext(load_catalog(catalog), task, "materialization", stopping, {"reader": READER})
    await supervise(ctx, Backoff(initial=0.2, maximum=2.0))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2]))
