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
import random
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from tests.faults_support import CHAOS_ROUNDS, SEED, Sophia, _rows, _wait_rows, bad_input, open_sophia
from tests.pipeline_harness import (
    AGENT_LOGS,
    CONSUMERS,
    METRICS,
    POSTGRES,
    PROCESSED,
    RAW,
    TASKS,
    Endpoints,
    Expected,
    TopicContent,
    judge,
)


@pytest.fixture(scope="module")
async def sophia(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> AsyncIterator[Sophia]:
    """This module's own pipeline (each test is one trial on it)."""
    async with open_sophia(tmp_path_factory, request) as running:
        yield running


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
    assert codes == dict.fromkeys(TASKS, 0), f"exit codes after SIGTERM: {codes}"
    for name in TASKS:
        assert "all tasks stopped; checkpoints committed" in sophia.log_of(name), name
    sophia.pipeline.start()
    await sophia.trial("SIGTERM", "every task mid-burst (600 records, 1500 lines)", fed)


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


