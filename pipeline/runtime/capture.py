"""The runtime task that drives a capture connector (its contract: pipeline/sdk/capture.py).

Estuary's rule, enforced here: emit nothing without a checkpoint. A capture yields
``Captured`` items, each holding documents *and* the state that covers them; the runtime
writes the documents, waits for the broker's acknowledgement, then saves the state. After a
crash the capture resumes from the last saved state, so it re-sends at most the last
unacknowledged item, with the same keys (``metadata.id`` is deterministic).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from pipeline.runtime.catalog import CaptureSpec
from pipeline.runtime.checkpoint import KafkaCheckpoints, Presence, describe_epoch, next_epoch
from pipeline.runtime.collection import CollectionWriter
from pipeline.runtime.task import Task
from pipeline.sdk.capture import Capture, Captured
from pipeline.sdk.errors import ConfigError, ImplementationError
from pipeline.sdk.pointers import MISSING, pointer_tokens, resolve
from pipeline.telemetry import metrics

MASK_KEY_ENV = "LOCALFLOW_MASK_KEY"
STOP_GRACE = 5.0
"""Seconds an in-flight poll may still finish after a stop before it is abandoned."""


class Masker:
    """Replaces values at JSON pointers with a keyed hash, so equal values still join."""

    def __init__(self, pointers: list[str], key: bytes) -> None:
        tokens = [pointer_tokens(p) for p in pointers]
        self.paths = [(t[:-1], t[-1]) for t in tokens]  # (parent, member): catalog pointers are never ""
        self.key = key

    def __call__(self, doc: dict[str, Any]) -> None:
        for parent, last in self.paths:
            node = resolve(doc, parent)
            if isinstance(node, dict) and last in node:
                node[last] = self.mask(node[last])
            elif isinstance(node, list) and resolve(node, (last,)) is not MISSING:
                node[int(last)] = self.mask(node[int(last)])

    def mask(self, value: Any) -> str:
        raw = value if isinstance(value, str) else repr(value)
        return "masked:" + hmac.new(self.key, raw.encode(), hashlib.sha256).hexdigest()[:32]


class CaptureTask(Task):
    """Runs a capture connector: documents -> acknowledged writes -> checkpoint."""

    async def run(self) -> None:
        from pipeline.runtime.registry import load_connector

        ctx = self.ctx
        spec: CaptureSpec = ctx.spec
        collections = [ctx.collection(b.target) for b in spec.bindings]
        maskers = self._maskers(spec)
        store = KafkaCheckpoints(ctx.kafka, replication_factor=max(c.replication_factor for c in collections))
        capture: Capture = load_connector(spec.connector).build(*ctx.for_connector())
        # In a cluster the lease picks the one worker that runs the capture; presence stays on too, so a
        # capture started outside the cluster (a per-task container of the same catalog) is refused.
        lease = ctx.lease
        presence = Presence(store, ctx.name, store.replication_factor)
        writer = CollectionWriter(ctx.kafka, ctx.name)
        try:
            await writer.start()
            if lease is not None:
                lease.check()
            await presence.enter(writer, ctx.stopping)  # before anything is polled: a second live instance is refused here
            if ctx.stopping.is_set():
                return
            await writer.ensure(collections)
            state, highest = await store.resume(ctx.name)
            epoch = next_epoch(highest, lease.fencing_generation if lease is not None else 0)
            await capture.open()
            ctx.status.connected = True
            ctx.log.info("capture started from %s (checkpoint epoch: %s)",
                         "its checkpoint" if state else "the beginning", describe_epoch(epoch))
            stream = capture.run(state)
            try:
                while (item := await self._next(stream)) is not None:
                    self._check(lease, presence)  # another instance holds the capture: write nothing more
                    if item.documents and item.state is None:
                        raise ImplementationError(
                            f"capture {ctx.name} ({spec.connector}) yielded {len(item.documents)} documents without "
                            "a state: an item that carries documents MUST carry the state that covers them "
                            "(pipeline/sdk/capture.py); nothing of it was written")
                    await self._emit(item, collections, maskers, writer)
                    if item.state is not None:
                        self._check(lease, presence)
                        await store.save(writer, ctx.name, item.state, epoch=epoch)
                        metrics.checkpointed(ctx.name)
                    ctx.status.progressed(len(item.documents))
                    if ctx.stopping.is_set():
                        break
            finally:
                await stream.aclose()
        finally:
            try:
                await capture.close()
            finally:
                try:
                    await presence.leave()
                finally:
                    await writer.stop()

    @staticmethod
    def _check(lease: Any, presence: Presence) -> None:
        """Raise (LeaseLost, AlreadyRunning) once another instance holds the capture."""
        if lease is not None:
            lease.check()
        presence.check()

    async def _next(self, stream: AsyncIterator[Captured]) -> Captured | None:
        """The capture's next item; None when it ended, or when stopping and it is not ready.

        An in-flight poll (a hung request, a slow scrape) gets ``STOP_GRACE`` seconds after a
        stop, then is abandoned: it yielded nothing, so no state advanced and nothing is lost.
        """
        pending = asyncio.ensure_future(anext(stream))
        stopping = asyncio.ensure_future(self.ctx.stopping.wait())
        try:
            done, _ = await asyncio.wait({pending, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if pending not in done:
                done, _ = await asyncio.wait({pending}, timeout=STOP_GRACE)
            if pending in done:
                try:
                    return pending.result()
                except StopAsyncIteration:
                    return None
            self.ctx.log.info("stopping: abandoned a poll still in flight after %.0fs", STOP_GRACE)
            pending.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await pending
            return None
        finally:
            stopping.cancel()

    async def _emit(self, item: Captured, collections: list, maskers: list[Masker | None],
                    writer: CollectionWriter) -> None:
        by_binding: dict[int, list[dict[str, Any]]] = {}
        newest = None
        for index, doc in item.documents:
            m = maskers[index]
            if m is not None:
                m(doc)
            by_binding.setdefault(index, []).append(doc)
            ts = doc.get("timestamp")
            if isinstance(ts, str) and (newest is None or ts > newest):
                newest = ts
        for index, docs in by_binding.items():
            await writer.write(collections[index], docs, reason="invalid")
        for index, error, original in item.dead:
            if maskers[index] is not None:  # raw input cannot be masked by pointer: withhold it
                error, original = f"{error} (original withheld: the binding masks fields)", b""
            await writer.write_dead(collections[index], error, original, reason="unparseable")
        if item.source_bytes:
            metrics.BYTES_IN.labels(self.ctx.name, collections[0].name).inc(item.source_bytes)
        if newest:
            try:
                age = time.time() - datetime.fromisoformat(newest.replace("Z", "+00:00")).timestamp()
                metrics.CAPTURE_LAG.labels(self.ctx.name).set(max(0.0, age))
            except ValueError:
                pass

    def _maskers(self, spec: CaptureSpec) -> list[Masker | None]:
        if not any(b.mask for b in spec.bindings):
            return [None] * len(spec.bindings)
        key = os.environ.get(MASK_KEY_ENV)
        if not key:
            raise ConfigError(f"bindings list `mask` pointers but {MASK_KEY_ENV} is not set "
                              f"(the key of the masking hash comes from the environment only)",
                              f"captures.{self.ctx.name}")
        return [Masker(b.mask, key.encode()) if b.mask else None for b in spec.bindings]
