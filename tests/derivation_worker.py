"""A derivation worker in its own process, for tests that kill or pause it (tests/test_derivation.py,
tests/test_faults.py).

    python tests/derivation_worker.py CATALOG COLLECTION [OPTIONS_JSON]

Runs the derived COLLECTION's task supervised (restarted after a failure, e.g. a commit refused
because the group moved on) until SIGTERM (then finishes its batch, commits, exits 0).
OPTIONS_JSON is the task's runtime options, e.g. ``{"reader": {"max_records": 200}}``.

``held`` is a Python transform for the zombie trial: the identity (plus the worker's pid), except
that a worker started with ``LOCALFLOW_TEST_HOLD=DIR`` stops in its first batch: it creates
``DIR/holding`` and waits for ``DIR/released``, holding the batch while the test pauses it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.runtime.catalog import load_catalog  # noqa: E402
from pipeline.runtime.task import Backoff, TaskContext, supervise  # noqa: E402

HOLD = "LOCALFLOW_TEST_HOLD"
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


async def main(catalog_path: str, collection: str, options: dict) -> None:
    catalog = load_catalog(catalog_path)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await supervise(TaskContext(catalog, collection, "derivation", stopping, options), Backoff(initial=0.2, maximum=2.0))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}))
