"""Support for the control-plane tests: `localflow run --api-port 0` and a source API in the test."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from pipeline.control import effective
from tests.support.cli import cli_env, worker
from tests.support.sources import serve_on_loopback
from tests.support.workers import Worker

RAW_SCHEMA = effective.RAW_SCHEMA
"""The raw document schema (the one the API gives a collection made for a short-form capture)."""


def api_url(w: Worker) -> str:
    """The worker's API URL, once it logged it."""
    return w.url(r"API on (http://127\.0\.0\.1:\d+) ", "its API URL")


@contextmanager
def api_worker(catalog: Path, log: Path, *args: str, **env: str) -> Iterator[tuple[Worker, str]]:
    """`localflow run CATALOG --api-port 0 ARGS` with ``env``; yields the worker and its API URL."""
    with worker(catalog, "--api-port", "0", *args, log=log, env=cli_env(**env)) as w:
        yield w, api_url(w)


class Source:
    """A JSON API on a free loopback port: each GET of a path answers the next record of that path.

    It serves from a thread of its own, so it keeps answering while the test blocks (waiting
    for a worker to exit, say): a poll in flight at a worker's SIGTERM then ends at once.
    """

    def __init__(self, run: str) -> None:
        self.run = run
        self.hits: Counter[str] = Counter()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-source", daemon=True)

    async def __aenter__(self) -> Source:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._answer)
        self.runner, self.url = await serve_on_loopback(app)

    async def _answer(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.hits[path] += 1
        n = self.hits[path]
        return web.json_response([{"id": f"{self.run}-{path}-{n}", "n": n, "type": "agent_interaction"}])
