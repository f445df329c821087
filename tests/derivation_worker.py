"""A derivation worker in its own process, for tests that kill it (tests/test_derivation.py).

    python tests/derivation_worker.py CATALOG COLLECTION [OPTIONS_JSON]

Runs the derived COLLECTION's task until SIGTERM (then finishes its batch, commits, exits 0).
OPTIONS_JSON is the task's runtime options, e.g. ``{"reader": {"max_records": 200}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from pipeline.catalog import load_catalog
from pipeline.task import TaskContext, supervise


async def main(catalog_path: str, collection: str, options: dict) -> None:
    catalog = load_catalog(catalog_path)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await supervise(TaskContext(catalog, collection, "derivation", stopping, options))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}))
