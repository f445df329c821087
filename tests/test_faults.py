"""Fault injection across the whole Sophia pipeline: nothing lost, nothing doubled (SPEC "Guarantees").

One pipeline for the module, as users run it: every task of a catalog derived from
examples/sophia/flow.yaml in its own `localflow run --task` process, on private servers
(durable Tansu on its own moto, Postgres, Redis, a second moto for the archive behind a TCP
proxy) and real sources (an HTTP API, agent log files, a /metrics endpoint). Each test is one
trial: it feeds new source records, injects one kind of fault mid-stream, waits until the
pipeline settles and checks everything captured so far, at every stage:

* every API record and log line is in its collection under exactly one key (re-sends carry
  the same key), and derived once;
* every key is in Postgres (one row), in Redis (one key) and every Kafka offset in exactly one
  S3 object, or in the endpoint's dead letters, never both: captured = materialized + dead.

Each trial also feeds records Postgres cannot hold, API records without an id and over-long
log lines, so dead letters take part in the count. The trials are printed as a table (pytest -s,
the terminal summary, and `fault-table.txt` in pytest's base temp dir). `make chaos` runs the
long version: many rounds of kill -9 at random points, of tasks and servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
import pytest
import yaml
from redis.asyncio import Redis
from redis.exceptions import RedisError

from pipeline.runtime.catalog import Catalog, load_catalog
from pipeline.runtime.collection import Collection, CollectionWriter, read_to_end
from tests.support.census import Endpoints, TopicContent
from tests.support.faults import CHAOS_ROUNDS, SEED, Sophia, _rows, _wait_rows, bad_input, pipeline_fixture
from tests.support.judge import Expected, Verdict, judge
from tests.support.pipeline import (
    AGENT_LOGS,
    API_TASK,
    CONSUMERS,
    METRICS,
    POSTGRES,
    PROCESSED,
    RAW,
    TASKS,
    TaskProcess,
)
from tests.support.tasks import running
from tests.support.waiting import wait_for_async
from tests.support.workers import HOLD, READER, Worker, task_worker

sophia = pipeline_fixture()


def test_the_judge_counts_a_missing_row_as_lost_and_a_second_copy_as_doubled() -> None:
    """The checks have teeth: a row deleted, an object archived twice, a key both applied and refused."""
    expected = Expected(api_ids={"a", "b"}, log_lines=set())
    raw = TopicContent(messages=[(0, 0, "a", {"metadata": {"id": "a"}}), (0, 1, "b", {"metadata": {"id": "b"}})])
    processed = TopicContent(messages=[(0, 0, "a", {"id": "a"}), (1, 0, "b", {"id": "b"})],
                             dead=[{"task": POSTGRES, "original": '{"id": "b"}'}])
    topics = {RAW: raw, PROCESSED: processed, AGENT_LOGS: TopicContent(), METRICS: TopicContent()}
    ends = Endpoints(postgres={PROCESSED: ["a", "b"], AGENT_LOGS: [], METRICS: []},
                     redis={RAW: {"a", "b"}, PROCESSED: {"a"}, AGENT_LOGS: set(), METRICS: set()},
                     s3={RAW: Counter({(0, 0): 1, (0, 1): 2}), PROCESSED: Counter({(0, 0): 1, (1, 0): 1}),
                         AGENT_LOGS: Counter(), METRICS: Counter()})
    v = judge(expected, topics, ends, topics)
    assert (v.lost, v.doubled) == (1, 2), v.problems  # redis lost "b"; s3 doubled (0, 1); pg holds refused "b"
    assert judge(expected, topics, ends, topics).ok is False


async def test_without_faults_every_record_lands_once_in_every_endpoint(sophia: Sophia) -> None:
    fed = sophia.fed
    sophia.feed(40, 40)
    bad_input(sophia)
    await sophia.trial("baseline", "none", fed)


async def test_kill_9_of_every_task_at_random_points_loses_and_doubles_nothing(sophia: Sophia) -> None:
    fed = sophia.fed
    rng = random.Random(SEED)
    order = list(TASKS)
    rng.shuffle(order)
    with sophia.feeding(every=0.2, records=10, lines=25):  # busy enough that kills land mid-batch
        bad_input(sophia)
        for name in order:
            await asyncio.sleep(rng.uniform(0.3, 2.0))  # the random point of the kill
            task = sophia.pipeline.tasks[name]
            task.kill()
            await asyncio.sleep(rng.uniform(0, 0.5))  # an orchestrator's restart delay
            task.start()
    await sophia.trial("kill -9", f"each task once, order {','.join(t.split('/')[1] for t in order)} "
                                  f"(seed {SEED})", fed)


async def test_sigterm_during_a_busy_batch_flushes_commits_and_exits_0(sophia: Sophia) -> None:
    fed = sophia.fed
    before = await _rows(sophia)
    sophia.feed(600, 1500)
    bad_input(sophia)
    # Busy: the burst is on its way through every stage when the signal comes.
    await _wait_rows(sophia, lambda n: n > before, "Postgres to start taking the burst")
    codes = sophia.pipeline.stop()
    assert codes == dict.fromkeys(TASKS, 0), f"exit codes after SIGTERM: {codes}\n" + "\n".join(
        f"--- {name}\n{sophia.log_of(name)[-4000:]}" for name, code in codes.items() if code)
    for name in TASKS:
        assert "all tasks stopped; checkpoints committed" in sophia.log_of(name), name
    sophia.pipeline.start()
    await sophia.trial("SIGTERM", "every task mid-burst (600 records, 1500 lines)", fed)


ZOMBIE_KEYS = 40
ZOMBIE_OPTIONS = {"reader": READER, "batch_seconds": 1}
"""A short session, so the group gives up on a paused worker within seconds."""


async def test_derivation_worker_stalled_past_its_session_never_makes_a_key_older(
        sophia: Sophia, tmp_path: Path) -> None:
    """Two workers of one derivation; Z is paused (SIGSTOP) holding the batch of every key's v1, W
    takes the partition over and derives v1 and v2, then Z resumes and writes its v1 after them.
    Postgres and Redis must still end at v2 of every key (the source clock), not at Z's v1."""
    started = time.monotonic()
    z = Zombie.create(sophia, tmp_path)
    await z.ingest(1)
    async with running(z.catalog, z.postgres, options={"reader": READER}), \
            running(z.catalog, z.redis, options={"reader": READER}):
        with z.workers():
            stalled = z.spawn("stalled", hold=True)
            await wait_for_async(lambda: (z.hold / "holding").exists(), timeout=60,
                                 message="the first worker to hold its first batch")
            stalled.pause()
            z.spawn("other")
            await z.wait_versions(1, "the other worker to take over and derive v1")
            await z.ingest(2)
            await z.wait_versions(2, "the other worker to derive v2")
            (z.hold / "released").touch()
            stalled.resume()
            late = await wait_for_async(lambda: z.late_writes(stalled.pid), timeout=60,
                                        message="the resumed worker's late v1 outputs in the derived topic")
            await z.wait_applied()

    pg, redis = await z.versions()
    verdict = Verdict(source_records=2 * ZOMBIE_KEYS, keys=ZOMBIE_KEYS, resent=late,
                      pg=(sum(v == 2 for v in pg.values()), 0, ZOMBIE_KEYS),
                      redis=(sum(v == 2 for v in redis.values()), 0, ZOMBIE_KEYS))
    for name, held in (("postgres", pg), ("redis", redis)):
        older = sorted(k for k in z.keys if held.get(k) != 2)
        verdict.lose(len(older), f"{name}: {len(older)} keys not at their latest version (v2), e.g. "
                                 f"{[(k, held.get(k)) for k in older[:3]]}")
    sophia.table.add("derivation", f"SIGSTOP of a worker holding a batch past its session; the other derives v1, "
                                   f"v2; SIGCONT ({late} late v1 outputs)", 2 * ZOMBIE_KEYS, verdict,
                     time.monotonic() - started)
    print(f"\n{sophia.table.render()}\n")
    assert verdict.ok, "\n".join(verdict.problems) + "\n" + z.logs()


@dataclass
class Zombie:
    """The zombie trial's own small flow on the module's servers: raw -> derived (python, two
    worker processes) -> postgres and redis."""

    sophia: Sophia
    dir: Path
    name: str
    catalog: Catalog
    procs: dict[str, Worker] = field(default_factory=dict)

    @classmethod
    def create(cls, s: Sophia, tmp: Path) -> Zombie:
        name = f"zombie{uuid.uuid4().hex[:8]}"
        schema = {"type": "object", "required": ["id", "version"], "properties": {
            "id": {"type": "string"}, "version": {"type": "integer"}, "worker": {"type": "integer"}}}
        raw = {"kafka": {"bootstrap_servers": s.infra.kafka.bootstrap_servers}, "collections": {
            f"{name}/raw": {"schema": schema, "key": ["/id"]},
            f"{name}/derived": {"schema": schema, "key": ["/id"], "derive": {"using": {"python": {}}, "transforms": [
                {"name": "held", "source": f"{name}/raw", "lambda": "tests.support.workers:held"}]}},
        }, "materializations": {
            f"{name}/postgres": {"endpoint": {"postgres": {"url": s.ends.postgres.url, "schema": name}},
                                 "bindings": [{"source": f"{name}/derived", "resource": {"table": "derived"}}]},
            f"{name}/redis": {"endpoint": {"redis": {"url": s.ends.redis.url,
                                                     "advanced": {"state_prefix": f"{name}:lf:"}}},
                              "bindings": [{"source": f"{name}/derived"}]},
        }}
        (tmp / "hold").mkdir()
        (tmp / "flow.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return cls(s, tmp, name, load_catalog(tmp / "flow.yaml", env={}))

    @property
    def hold(self) -> Path:
        return self.dir / "hold"

    @property
    def keys(self) -> list[str]:
        return [f"k{i}" for i in range(ZOMBIE_KEYS)]

    @property
    def postgres(self) -> str:
        return f"{self.name}/postgres"

    @property
    def redis(self) -> str:
        return f"{self.name}/redis"

    def derived(self) -> Collection:
        return Collection.from_catalog(self.catalog, f"{self.name}/derived")

    async def ingest(self, version: int) -> None:
        async with CollectionWriter(self.catalog.kafka, "test") as writer:
            await writer.write(Collection.from_catalog(self.catalog, f"{self.name}/raw"),
                               [{"id": k, "version": version} for k in self.keys])

    def spawn(self, role: str, *, hold: bool = False) -> Worker:
        """A derivation worker process; with ``hold``, it stalls in its first batch (``held``)."""
        env = {**os.environ, **({HOLD: str(self.hold)} if hold else {})}
        self.procs[role] = task_worker(self.dir / "flow.yaml", f"{self.name}/derived", self.dir / f"{role}.log",
                                       options=ZOMBIE_OPTIONS, env=env, grace=30)
        return self.procs[role]

    @contextlib.contextmanager
    def workers(self) -> Iterator[None]:
        """Every worker spawned in the block is resumed and stopped (SIGTERM, then SIGKILL) after it."""
        try:
            yield
        finally:
            for proc in self.procs.values():
                proc.resume()
                proc.send(signal.SIGTERM)
            for proc in self.procs.values():
                proc.close()

    async def versions(self) -> tuple[dict[str, int], dict[str, int]]:
        """Each key's version in Postgres and in Redis (absent keys are left out)."""
        conn = await asyncpg.connect(self.sophia.ends.postgres.url, timeout=10)
        try:
            pg = {r["id"]: r["version"] for r in await conn.fetch(f'SELECT id, version FROM "{self.name}".derived')}
        except asyncpg.UndefinedTableError:
            pg = {}
        finally:
            await conn.close()
        redis = Redis.from_url(self.sophia.ends.redis.url, socket_timeout=10)
        try:
            values = await redis.mget([f"{self.name}/derived:{k}" for k in self.keys])
        finally:
            await redis.aclose()
        return pg, {k: orjson.loads(v)["version"] for k, v in zip(self.keys, values, strict=True) if v is not None}

    async def wait_versions(self, version: int, message: str) -> None:
        async def there() -> bool:
            pg, redis = await self.versions()
            return all(pg.get(k) == version and redis.get(k) == version for k in self.keys)

        await wait_for_async(there, timeout=60, interval=0.2, message=message + f" (logs: {self.logs()})",
                             ignore=(OSError, asyncpg.PostgresError, RedisError))

    async def late_writes(self, pid: int) -> int | None:
        """How many v1 outputs the resumed worker wrote after the topic's v2 (None until all are there)."""
        records = await read_to_end(self.catalog.kafka, self.derived().topic)
        first_v2 = next(i for i, r in enumerate(records) if r.doc["version"] == 2)
        late = [r for r in records[first_v2:] if r.doc["version"] == 1 and r.doc.get("worker") == pid]
        return len(late) if len(late) >= ZOMBIE_KEYS else None

    async def wait_applied(self) -> None:
        """Until both materializations checkpointed the end of the derived topic."""
        topic = self.derived().topic
        end = 1 + max(r.offset for r in await read_to_end(self.catalog.kafka, topic))

        async def applied() -> bool:
            conn = await asyncpg.connect(self.sophia.ends.postgres.url, timeout=10)
            try:
                pg = await conn.fetchval(f'SELECT next_offset FROM "{self.name}".localflow_checkpoints '
                                         "WHERE materialization = $1 AND topic = $2", self.postgres, topic)
            finally:
                await conn.close()
            redis = Redis.from_url(self.sophia.ends.redis.url, socket_timeout=10)
            try:
                held = await redis.hget(f"{self.name}:lf:checkpoint:{self.redis}", f"{topic}:0")
            finally:
                await redis.aclose()
            return pg == end and held is not None and int(held) == end

        await wait_for_async(applied, timeout=60, interval=0.2, message=f"both endpoints to apply {topic} to {end}",
                             ignore=(OSError, asyncpg.PostgresError, RedisError))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in self.dir.glob("*.log"))


async def test_a_2_mib_api_record_becomes_a_dead_letter_and_the_capture_goes_on(sophia: Sophia) -> None:
    fed = sophia.fed
    huge = f"huge-{fed}"
    sophia.sources.add_records([{"id": huge, "type": "user_query", "note": "x" * (2 * 1024 * 1024)}])
    sophia.feed(20, 20)
    bad_input(sophia)
    verdict = await sophia.trial("too large", "a 2 MiB API record among 20 (kafka.max_message_bytes 1 MiB)", fed)
    letters = [d for d in (await sophia.census.topics())[RAW].dead_from(API_TASK)
               if d.get("reason") == "too_large" and (d.get("source_position") or {}).get("id") == huge]
    assert len(letters) == 1, f"no too_large dead letter of {huge}"
    assert letters[0]["original_size"] > 2 * 1024 * 1024 and letters[0]["original_truncated"] is True
    assert "task failed" not in sophia.log_of(API_TASK), "the capture failed on the 2 MiB record"
    assert verdict.ok


async def test_a_second_live_instance_of_a_capture_is_refused_and_polls_only_once_the_first_is_gone(
        sophia: Sophia) -> None:
    """README: a capture runs as one instance. A second replica refuses while the first lives, takes
    over after a kill -9 (once the first's presence expires), and hands back on SIGTERM; the API
    is polled by one process at a time throughout (each names itself in a request header)."""
    fed = sophia.fed
    first = sophia.pipeline.tasks[API_TASK]
    second = TaskProcess(f"{API_TASK}#2", first.catalog, {**first.env, "LOCALFLOW_TEST_INSTANCE": "second"},
                         first.logs, tasks=[API_TASK])
    pollers = sophia.sources.pollers

    async def refused(task: TaskProcess) -> None:
        before = task.output().count("is already running elsewhere")
        await wait_for_async(lambda: task.output().count("is already running elsewhere") > before, timeout=120,
                             message=f"{task.name} to refuse a second live instance")

    async def polls(instance: str, what: str) -> None:
        await wait_for_async(lambda: bool(pollers) and pollers[-1] == instance, timeout=120, message=what)

    start = len(pollers)
    try:
        second.start()
        sophia.feed(20, 5)
        await refused(second)
        await polls("first", "the first to poll")
        killed_at = time.monotonic()
        first.kill()
        sophia.feed(20, 5)
        await polls("second", "the second instance to take the capture over")
        takeover = time.monotonic() - killed_at
        first.start()  # the orchestrator restarts the killed one: it must refuse now
        await refused(first)
        assert second.terminate() == 0, second.output(all_runs=False)[-3000:]
        sophia.feed(20, 5)
        await polls("first", "the restarted first instance to take the capture back")
    finally:
        if second.running:
            second.kill()
    seen = pollers[start:]
    order = [who for i, who in enumerate(seen) if i == 0 or seen[i - 1] != who]
    assert order == ["first", "second", "first"], f"the API was polled by interleaved instances: {order}"
    verdict = await sophia.trial("second instance", f"a second replica of {API_TASK.split('/')[1]}: refused, "
                                                    f"takes over {takeover:.1f}s after a kill -9, hands back", fed)
    assert verdict.ok


@pytest.mark.chaos
@pytest.mark.timeout(3600)
async def test_chaos_kill_9_at_random_points_many_times(sophia: Sophia) -> None:
    """Rounds of random kills of tasks (often two at once) and servers, while feeding."""
    rng = random.Random(SEED + 1)
    for round_ in range(1, CHAOS_ROUNDS + 1):
        fed = sophia.fed
        done: list[str] = []
        with sophia.feeding():
            bad_input(sophia)
            for _ in range(rng.randint(4, 10)):
                await asyncio.sleep(rng.uniform(0.2, 2.5))  # the random point of the next kill
                victims = rng.sample(TASKS, rng.choice((1, 1, 2)))
                for name in victims:
                    sophia.pipeline.tasks[name].kill()
                await asyncio.sleep(rng.uniform(0, 1))  # an orchestrator's restart delay
                for name in victims:
                    sophia.pipeline.tasks[name].start()
                done += [v.split("/")[1] for v in victims]
            server = rng.choice(("postgres", "redis", "broker", "none"))
            if server == "postgres":
                sophia.ends.postgres.kill()
                await asyncio.sleep(rng.uniform(0.5, 3))  # the outage
                sophia.ends.postgres.start()
            elif server == "redis":
                sophia.ends.redis.kill()
                await asyncio.sleep(rng.uniform(0.5, 3))  # the outage
                sophia.ends.redis.start()
            elif server == "broker":
                sophia.infra.kafka.restart()
            done.append(f"server:{server}")
        await sophia.trial("chaos", f"round {round_}: {' '.join(done)} (seed {SEED + 1})", fed)


@pytest.mark.chaos
async def test_chaos_consumers_killed_together_mid_burst(sophia: Sophia) -> None:
    """Every consumer of the collections killed at once while a burst is being applied."""
    fed = sophia.fed
    before = await _rows(sophia)
    sophia.feed(1000, 2000)
    bad_input(sophia)
    await _wait_rows(sophia, lambda n: n > before, "Postgres to start taking the burst")
    for name in CONSUMERS:
        sophia.pipeline.tasks[name].kill()
    for name in CONSUMERS:
        sophia.pipeline.tasks[name].start()
    await sophia.trial("chaos", "derivation and all materializations kill -9 mid-burst", fed)
