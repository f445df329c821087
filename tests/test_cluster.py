"""Cluster mode: three `localflow run --cluster` workers run the whole Sophia pipeline.

What a user relies on (SPEC "Control plane and cluster"): each capture runs on one worker at a
time and another takes it over when its worker dies; nothing is lost or doubled per key at any
endpoint; a worker that stalled past the session timeout cannot move a checkpoint back;
`localflow status` shows which worker holds which lease and which partitions.

The API stand-in counts concurrent pollers: every request to the API and to /metrics takes a
little while, and two workers polling one capture at once would overlap there.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from pipeline.runtime.catalog import KafkaConfig
from pipeline.runtime.checkpoint import CHECKPOINT_PREFIX, CaptureCheckpoint, KafkaCheckpoints, next_epoch
from pipeline.runtime.collection import CollectionWriter, read_to_end
from tests.support.faults import Sophia, open_sophia
from tests.support.judge import settle
from tests.support.pipeline import API_TASK, CAPTURES, CONSUMERS, Pipeline, TaskProcess
from tests.support.sources import API_PATH, METRICS_PATH
from tests.support.waiting import wait_for_async
from tests.support.workers import ROOT

CLUSTER = "sophia"
WORKERS = 3
SESSION_TIMEOUT = 10.0  # pipeline.runtime.cluster.SESSION_TIMEOUT_MS
TAKEOVER_WITHIN = 90.0
"""A kill -9's session timeout plus a rebalance or two on a loaded 2-core machine."""


def cluster_of(count: int) -> Callable[[Path, dict[str, str], Path], Pipeline]:
    """``count`` workers of one cluster, each running the whole catalog (no --task)."""
    def make(catalog: Path, env: dict[str, str], logs: Path) -> Pipeline:
        pipeline = Pipeline(catalog, env, logs, tasks=())
        for i in range(1, count + 1):
            worker = TaskProcess(f"worker-{i}", catalog, env, logs)
            worker.args = ["--cluster", CLUSTER, "--metrics-port", "0", "--api-port", "0"]
            pipeline.tasks[worker.name] = worker
        return pipeline

    return make


class Pollers:
    """Wraps the API's and /metrics' handlers: counts requests in flight per path, and the most seen."""

    HOLD = 0.1
    """Seconds each request takes (the poll itself): long enough for two pollers to overlap."""

    def __init__(self, s: Sophia) -> None:
        self.now: Counter[str] = Counter()
        self.most: Counter[str] = Counter()
        for path in (API_PATH, METRICS_PATH):
            s.sources.routes[path] = self._counting(path, s.sources.routes[path])

    def _counting(self, path: str, inner: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.now[path] += 1
            self.most[path] = max(self.most[path], self.now[path])
            try:
                await asyncio.sleep(self.HOLD)  # the poll's own duration, not a wait for a condition
                return await inner(request)
            finally:
                self.now[path] -= 1

        return handle


@pytest.fixture(scope="module")
async def sophia(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> AsyncIterator[Sophia]:
    async with open_sophia(tmp_path_factory, request, workers=cluster_of(WORKERS)) as running:
        running.pollers = Pollers(running)  # type: ignore[attr-defined]
        yield running


# ============================================================================ looking at the workers


def url_of(worker: TaskProcess) -> str | None:
    """The current incarnation's /status URL (it logs the port it got)."""
    found = re.findall(r"metrics, health and status on (http://\S+)", worker.output(all_runs=False))
    return found[-1] if found else None


async def statuses(s: Sophia) -> dict[str, dict[str, Any]]:
    """The /status of every running worker that answers, by worker process name."""
    out = {}
    async with httpx.AsyncClient(timeout=3.0) as client:
        for name, worker in s.pipeline.tasks.items():
            url = url_of(worker) if worker.running else None
            if url is None:
                continue
            try:
                out[name] = (await client.get(url + "/status")).json()
            except (httpx.HTTPError, ValueError):
                continue
    return out


async def holders(s: Sophia) -> dict[str, list[str]]:
    """Capture -> the workers whose capture holds its lease and runs."""
    out: dict[str, list[str]] = {c: [] for c in CAPTURES}
    for name, status in (await statuses(s)).items():
        leases = (status.get("cluster") or {}).get("leases") or {}
        for capture in leases:
            if capture in out and (status["tasks"].get(capture) or {}).get("running"):
                out[capture].append(name)
    return out


async def held_by_one(s: Sophia, capture: str, *, not_by: str | None = None, within: float = TAKEOVER_WITHIN) -> str:
    """Wait until exactly one worker (other than ``not_by``) runs ``capture`` under its lease."""
    async def one() -> str | None:
        who = (await holders(s))[capture]
        return who[0] if len(who) == 1 and who[0] != not_by else None

    return await wait_for_async(one, timeout=within, interval=0.2, message=f"one worker holding {capture}'s lease")


async def all_held(s: Sophia) -> dict[str, str]:
    return {c: await held_by_one(s, c) for c in CAPTURES}


async def quiet(s: Sophia, within: float = TAKEOVER_WITHIN) -> None:
    """Wait until no group of the cluster is rebalancing: every running worker holds input partitions
    of every derivation and materialization, and each capture lease is held by one worker.

    A worker frozen in the middle of a rebalance wakes up with a stale assignment; Tansu 0.6 was
    seen to lose a group for good when that zombie's claim made the rightful owners restart
    (docs/scaling.md): the stall trials start from a quiet cluster, as a pause in production would."""
    async def settled() -> bool:
        answers = await statuses(s)
        if len(answers) != sum(w.running for w in s.pipeline.tasks.values()):
            return False
        partitions = all((a["tasks"].get(t) or {}).get("partitions") for a in answers.values() for t in CONSUMERS)
        return partitions and all(len(w) == 1 for w in (await holders(s)).values())

    await wait_for_async(settled, timeout=within, interval=0.5, message="every group of the cluster settled")


async def trial(s: Sophia, kind: str, fault: str, fed_before: int, *, within: float = 240) -> None:
    """Settle, judge, record a table row; fail unless nothing was lost or doubled and one poller at a time."""
    s.pipeline.ensure_running()
    verdict, seconds = await settle(s.census, s.expected, within=within)
    exits = s.pipeline.unexpected_exits()
    if exits:
        verdict.problems.append(f"worker processes exited by themselves: {exits}")
    pollers: Pollers = s.pollers  # type: ignore[attr-defined]
    for path in (API_PATH, METRICS_PATH):
        if pollers.most[path] > 1:
            verdict.problems.append(f"{pollers.most[path]} workers polled {path} at once")
    s.table.add(kind, fault, s.fed - fed_before, verdict, seconds)
    print(f"\n{s.table.render()}\n")
    logs = next(iter(s.pipeline.tasks.values())).logs
    assert verdict.ok, "\n".join(verdict.problems) + f"\nworker logs: {logs}"


# ============================================================================ the checkpoint fence


async def test_checkpoint_reader_ignores_a_lower_epoch(kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    """A writer that lost its lease writes after its successor: the checkpoint stays the successor's."""
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    store = KafkaCheckpoints(kafka, prefix=unique_name("checkpoints") + ".")
    old = next_epoch(0, 4)
    new = next_epoch(old, 5)
    await store.ensure("c")
    async with CollectionWriter(kafka, "cp") as writer:
        await store.save(writer, "c", {"cursor": 1}, epoch=old)
        await store.save(writer, "c", {"cursor": 2}, epoch=new)
        await store.save(writer, "c", {"cursor": 1}, epoch=old)  # the stale writer, after its successor
        assert await store.resume("c") == ({"cursor": 2}, new)
        recreated = next_epoch(new, 1)  # the lease group was recreated: its generations start again
        assert recreated > new
        await store.save(writer, "c", {"cursor": 3}, epoch=recreated)
        assert await store.load("c") == {"cursor": 3}
        assert next_epoch(recreated, 0) > recreated  # a run outside a cluster starts a new era too


# ============================================================================ the cluster trials


async def test_status_shows_the_whole_cluster(sophia: Sophia) -> None:
    """`localflow status` from anywhere: one holder per capture lease, a worker per input partition."""
    s = sophia
    s.feed(10, 10)
    await all_held(s)
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pipeline", "status", str(s.pipeline.catalog), "--output", "json"],
        cwd=ROOT, env=s.pipeline.env, capture_output=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr.decode()
    report = orjson.loads(proc.stdout)
    assert len(report["clusters"][CLUSTER]) == WORKERS, report["clusters"]
    tasks = {t["name"]: t for t in report["tasks"]}
    for capture in CAPTURES:
        assert len(tasks[capture]["leases"]) == 1, (capture, tasks[capture]["leases"])
    for task in CONSUMERS:
        assert tasks[task]["partitions"], task
        assert all(p["worker"] for p in tasks[task]["partitions"]), (task, tasks[task]["partitions"])
    text = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pipeline", "status", str(s.pipeline.catalog)],
        cwd=ROOT, env=s.pipeline.env, capture_output=True, timeout=120)
    assert f"cluster {CLUSTER}: {WORKERS} worker(s)" in text.stdout.decode()
    assert text.stdout.decode().count("lease held by") == len(CAPTURES)
    api = re.findall(r"API on (http://\S+)", s.pipeline.tasks["worker-1"].output(all_runs=False))[-1]
    async with httpx.AsyncClient(timeout=60) as client:
        listed = {t["name"]: t for t in (await client.get(api + "/v1/tasks")).json()["tasks"]}
    for capture in CAPTURES:
        assert len(listed[capture]["leases"]) == 1, listed[capture]
    for task in CONSUMERS:
        assert all(p["worker"] for p in listed[task]["partitions"]), listed[task]


async def kill_holder(s: Sophia, capture: str) -> float:
    """kill -9 the worker holding ``capture``'s lease; the seconds until another one runs it."""
    await quiet(s)
    victim = await held_by_one(s, capture)
    killed = time.monotonic()
    s.pipeline.tasks[victim].kill()
    successor = await held_by_one(s, capture, not_by=victim)
    took = time.monotonic() - killed
    print(f"\n{capture}: {victim} killed (-9); {successor} took the lease over in {took:.1f}s")
    return took


async def test_kill_9_of_a_lease_holder_hands_the_capture_over(sophia: Sophia) -> None:
    s = sophia
    fed = s.fed
    with s.feeding():
        took = await kill_holder(s, API_TASK)
        s.pipeline.ensure_running()
        await all_held(s)
    assert took < TAKEOVER_WITHIN
    await trial(s, "cluster", f"kill -9 of {API_TASK}'s lease holder (takeover {took:.0f}s)", fed)


async def checkpoints_of(kafka: str, task: str) -> list[CaptureCheckpoint]:
    records = await read_to_end(KafkaConfig(bootstrap_servers=kafka), CHECKPOINT_PREFIX + task.replace("/", "."))
    return [CaptureCheckpoint.model_validate_json(r.value) for r in records if r.value]


def winners(records: list[CaptureCheckpoint]) -> tuple[list[str], int]:
    """The API cursor the checkpoint reader would resume from after each record, and how many
    records it ignores as stale (a lower epoch than one already seen)."""
    best, cursors, stale = -1, [], 0
    for c in records:
        if c.epoch >= best:
            best = c.epoch
            bindings = (c.state.get("bindings") or {}).values()
            cursors.append(max((str(b.get("cursor") or "") for b in bindings), default=""))
        else:
            stale += 1
    return cursors, stale


async def test_a_worker_stopped_past_the_session_timeout_cannot_move_the_checkpoint_back(sophia: Sophia) -> None:
    s = sophia
    fed = s.fed
    kafka = s.infra.kafka.bootstrap_servers
    with s.feeding():
        await quiet(s)
        victim = await held_by_one(s, API_TASK)
        proc = s.pipeline.tasks[victim].current
        assert proc is not None
        before = len(await checkpoints_of(kafka, API_TASK))
        proc.worker.pause()
        try:
            successor = await held_by_one(s, API_TASK, not_by=victim)

            async def successor_saved() -> bool:
                return len(await checkpoints_of(kafka, API_TASK)) > before + 2

            await wait_for_async(successor_saved, timeout=60, message="the successor's checkpoints")
        finally:
            proc.worker.resume()
        stopped_at = len(s.pipeline.tasks[victim].output(all_runs=False))

        def noticed() -> bool:  # the woken worker learns it lost the lease: its capture stops
            text = s.pipeline.tasks[victim].output(all_runs=False)[stopped_at:]
            return "generation" in text and "holds the leases of" in text

        await wait_for_async(noticed, timeout=60, message=f"{victim} to rejoin the cluster after SIGCONT")
        woken = s.pipeline.tasks[victim].output(all_runs=False)[stopped_at:]
        assert f"stopping {API_TASK} (lease released)" in woken, "the woken worker's capture did not stop"
        await held_by_one(s, API_TASK)
    records = await checkpoints_of(kafka, API_TASK)
    cursors, stale = winners(records)
    print(f"\n{victim} stopped past the session timeout, {successor} took over; checkpoint records: {len(records)}, "
          f"ignored as stale: {stale}")
    assert cursors == sorted(cursors), "the API capture's checkpoint went back"
    await trial(s, "cluster", f"SIGSTOP of {API_TASK}'s lease holder past the session timeout, then SIGCONT "
                f"({stale} stale checkpoint(s) ignored)", fed)


@pytest.mark.chaos
async def test_kill_9_of_every_lease_holder_then_a_rolling_restart(sophia: Sophia) -> None:
    s = sophia
    fed = s.fed
    takeovers = []
    with s.feeding():
        for capture in CAPTURES:
            takeovers.append(await kill_holder(s, capture))
            s.pipeline.ensure_running()
            await all_held(s)
        for name, worker in s.pipeline.tasks.items():
            started = time.monotonic()
            assert worker.terminate() == 0, f"{name} did not stop cleanly"
            worker.start()
            await all_held(s)
            print(f"\nrolling restart: {name} restarted, every lease held again after "
                  f"{time.monotonic() - started:.1f}s")
    takeover = ", ".join(f"{t:.0f}s" for t in takeovers)
    await trial(s, "cluster", f"kill -9 of each capture's lease holder (takeovers {takeover}), rolling restart",
                fed, within=300)


async def test_captures_share_the_lease_partitions_a_broker_cannot_add(kafka_bootstrap: str,
                                                                       unique_name: Callable[..., str]) -> None:
    """Tansu has no CreatePartitions: a lease topic made for one capture keeps one partition when two
    more are added, and its holder runs all three (capture i through partition i mod 1)."""
    from types import SimpleNamespace

    from pipeline.runtime.cluster import Cluster, leases_topic
    from pipeline.runtime.collection import Admin

    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    name = unique_name("cluster", sep="-")
    await Admin(kafka).ensure({leases_topic(name): (1, 1, {})})
    catalog = SimpleNamespace(captures=dict.fromkeys(("c/a", "c/b", "c/c")))

    async def settled() -> None:
        return None

    cluster = Cluster(kafka, name, lambda: catalog, changed=lambda: None, settled=settled)  # type: ignore[arg-type]
    await cluster.start()
    try:
        await wait_for_async(lambda: cluster.held, timeout=60, interval=0.2, message="the lease partition assigned")
        assert [cluster.holds(c) for c in catalog.captures] == [True, True, True]
        assert {c: v["partition"] for c, v in cluster.view()["leases"].items()} == {"c/a": 0, "c/b": 0, "c/c": 0}
        lease = cluster.lease("c/b")
        assert lease is not None
        lease.check()
    finally:
        await cluster.stop()
