"""The benchmark harness: services, catalogs, source topics, and running a task to a condition.

How localflow is timed. A task runs through the real runtime (``pipeline.runtime.task.run_tasks``:
supervision, the connector from the registry, the collection reader/writer) in this process,
or as ``python -m pipeline run`` workers (memory, scaling, latency). The clock starts when the
task is ready to work: a consumer-group task when its partitions are assigned (the runtime logs
``assigned ...``), a capture when it logs ``capture started``. So Tansu's group join (3-6 s,
which would dominate a 2-second stage) is excluded, and so is connecting; everything after it
(first fetch, every batch, the final flush) is included. The clock stops when the endpoint has
everything: a materialization runs with a replay plan's ``stop_at_end`` and returns once it
read every offset and flushed; a derivation or capture when its task status counts every
document as written and checkpointed. Each endpoint is then checked to hold all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import RAW_KEY, RAW_SCHEMA, Sample, Sizes, chunks, sophia_docs, tree_cpu
from pipeline.embedded.services import Services
from pipeline.runtime.catalog import Catalog, KafkaConfig, load_catalog, topic_of
from pipeline.runtime.collection import Admin, Collection
from pipeline.runtime.task import STATUS, ReplayPlan, run_tasks

ROOT = Path(__file__).resolve().parent.parent
SOPHIA_CATALOG = ROOT / "examples" / "sophia" / "flow.yaml"
PRODUCER = {"acks": "all", "linger_ms": 5, "max_batch_size": 256 * 1024, "enable_idempotence": False}
"""The settings of localflow's CollectionWriter, given to every raw producer too."""


PG_SCHEMA = "bench"
"""The Postgres schema of every benchmark table."""


def pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def pg_table(name: str) -> str:
    """A benchmark table's qualified, quoted name."""
    return f"{pg_ident(PG_SCHEMA)}.{pg_ident(name)}"


class BenchError(RuntimeError):
    """A benchmark could not run or its endpoint did not get everything; says which and why."""


@dataclass
class Source:
    """A collection topic filled with Sophia raw documents before a stage starts."""

    collection: str
    topic: str
    partitions: int
    docs: list[dict[str, Any]]
    values: list[bytes]
    """The documents as serialized in the topic."""
    placement: list[tuple[int, int]] = field(default_factory=list)
    """(partition, offset) of each document."""

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def bytes(self) -> int:
        return sum(map(len, self.values))

    def ends(self) -> dict[TopicPartition, int]:
        """Next offset after the last document, per partition."""
        out = {TopicPartition(self.topic, p): 0 for p in range(self.partitions)}
        for p, o in self.placement:
            tp = TopicPartition(self.topic, p)
            out[tp] = max(out[tp], o + 1)
        return out


@dataclass
class Timed:
    """When a task became ready to work and when its endpoint had everything (epoch seconds),
    and the CPU seconds the process tree used in between."""

    started: float
    finished: float
    cpu: float

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    def sample(self, work: float, docs: int | None = None) -> Sample:
        """``docs`` defaults to ``work`` (a stage counted in documents)."""
        return Sample(work, self.seconds, self.cpu, int(work) if docs is None else docs)


class _Marks(logging.Handler):
    """Watches one task's log: when it got ready (assigned / capture started), and its failures."""

    READY = ("assigned ", "capture started")

    def __init__(self, task: str) -> None:
        super().__init__(logging.INFO)
        self.task = task
        self.ready: float | None = None
        self.ready_cpu = 0.0
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "task", None) != self.task:
            return
        message = record.getMessage()
        if self.ready is None and message.startswith(self.READY):
            self.ready = record.created
            self.ready_cpu = tree_cpu()
        if record.levelno >= logging.ERROR:
            if record.exc_info and record.exc_info[1] is not None:
                error = record.exc_info[1]
                message += f" ({type(error).__name__}: {error})"
            self.errors.append(message)


class Bench:
    """One benchmark run: its services, a scratch directory, and names no earlier run used."""

    def __init__(self, services: Services, sizes: Sizes, workdir: Path, profile: Path | None = None) -> None:
        self.services = services
        self.sizes = sizes
        self.workdir = workdir
        self.profile = profile
        self.run_id = uuid.uuid4().hex[:6]
        self.env = {**os.environ, **services.env()}
        self.kafka = KafkaConfig(bootstrap_servers=services.kafka.bootstrap_servers)
        self._counter = 0
        self._raw: Source | None = None
        self._sophia: Catalog | None = None

    # ------------------------------------------------------------------ names and catalogs

    def name(self, what: str) -> str:
        """``what_<run>_<n>``: unique per run and call, usable in topics, tables, keys and buckets."""
        self._counter += 1
        return f"{what}_{self.run_id}_{self._counter}"

    def catalog(self, spec: dict[str, Any]) -> Catalog:
        """Write ``spec`` as a catalog file (kept for workers) and load it like `localflow run` does."""
        path = self.workdir / f"catalog_{self.run_id}_{self._counter}_{uuid.uuid4().hex[:4]}.yaml"
        body = {"kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"}, **spec}
        path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
        return load_catalog(path, env=self.env)

    @property
    def sophia(self) -> Catalog:
        """The Sophia catalog (its derivation SQL and schemas are what the stages run)."""
        if self._sophia is None:
            self._sophia = load_catalog(SOPHIA_CATALOG, env=self.env)
        return self._sophia

    @staticmethod
    def raw_collection(partitions: int = 3) -> dict[str, Any]:
        return {"schema": RAW_SCHEMA, "key": RAW_KEY, "partitions": partitions}

    @contextlib.contextmanager
    def profiled(self, what: str) -> Iterator[None]:
        """With ``--profile DIR``: a pyinstrument profile of this process while the block runs.

        Sampling slows the run down a lot: figures of a profiled run are not comparable.
        """
        if self.profile is None:
            yield
            return
        from pyinstrument import Profiler  # a development tool, imported only when asked for

        profiler = Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
        try:
            yield
        finally:
            profiler.stop()
            self.profile.mkdir(parents=True, exist_ok=True)
            name = f"{what.replace(' ', '_').replace('/', '_')}_{self._counter}"
            (self.profile / f"{name}.txt").write_text(profiler.output_text(unicode=True, show_all=False))
            (self.profile / f"{name}.html").write_text(profiler.output_html())

    # ------------------------------------------------------------------ Kafka

    def producer(self, **overrides: Any) -> AIOKafkaProducer:
        return AIOKafkaProducer(**self.kafka.client_options(), **{**PRODUCER, **overrides})

    async def create_topic(self, topic: str, partitions: int) -> None:
        await Admin(self.kafka).ensure({topic: (partitions, 1, {})})

    async def source(self) -> Source:
        """The raw collection of the stages that read Kafka: ``sizes.docs`` documents, made once."""
        if self._raw is None:
            docs = sophia_docs(self.sizes.docs)
            keys = [orjson.dumps([d["metadata"]["id"]]) for d in docs]
            values = [orjson.dumps(d) for d in docs]
            # Named like the Sophia collection: the derivation's SQL reads the table `sophia_raw_data`.
            collection = f"bench/{self.name('raw')}/sophia_raw_data"
            src = Source(collection, topic_of(collection), 3, docs, values)
            # With the headers localflow's writer gives every record (a capture wrote them).
            headers = Collection(collection, RAW_SCHEMA, RAW_KEY, 3).headers("bench/capture")
            src.placement = await self.produce(src.topic, src.partitions, keys, values, headers)
            self._raw = src
        return self._raw

    async def produce(self, topic: str, partitions: int, keys: Sequence[bytes | None],
                      values: Sequence[bytes], headers: list[tuple[str, bytes]] | None = None) -> list[tuple[int, int]]:
        """Fill a topic (setup, not timed); (partition, offset) of each message."""
        await self.create_topic(topic, partitions)
        producer = self.producer(acks=1, linger_ms=10)
        await producer.start()
        out: list[tuple[int, int]] = []
        try:
            for part in chunks(range(len(values)), 50_000):
                futures = [await producer.send(topic, values[i], key=keys[i], headers=headers) for i in part]
                out += [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
        finally:
            await producer.stop()
        return out

    async def topic_size(self, topic: str) -> int:
        """Messages in a topic: the sum of its fetch high watermarks (right on every broker)."""
        consumer = AIOKafkaConsumer(**self.kafka.client_options(), enable_auto_commit=False,
                                    max_partition_fetch_bytes=4096, fetch_max_bytes=65536)
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()  # noqa: SLF001 - first sight of the topic
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            deadline = time.monotonic() + 30
            while any(consumer.highwater(tp) is None for tp in tps):
                if time.monotonic() > deadline:
                    raise BenchError(f"Kafka: no high watermark for {topic} after 30 s")
                await consumer.getmany(timeout_ms=200, max_records=1)
            return sum(consumer.highwater(tp) or 0 for tp in tps)
        finally:
            await consumer.stop()

    # ------------------------------------------------------------------ running tasks

    async def run_task(self, catalog: Catalog, task: str, *, options: dict[str, Any] | None = None,
                       replay: ReplayPlan | None = None,
                       done: Callable[[], bool] | None = None, deadline_s: float = 300.0) -> Timed:
        """Run one task through the runtime until it returns by itself or ``done()`` holds.

        Raises BenchError when the task fails (the supervisor would restart it, which the
        figures must not hide) or the deadline passes.
        """
        marks = _Marks(task)
        logger = logging.getLogger("localflow")
        logger.setLevel(logging.INFO)
        logger.addHandler(marks)
        stopping = asyncio.Event()
        runner = asyncio.create_task(run_tasks(catalog, [task], stopping, options, replay=replay))
        deadline = time.monotonic() + deadline_s
        finished = None
        try:
            with self.profiled(task):
                while finished is None:
                    if runner.done():
                        runner.result()
                        finished, cpu = time.time(), tree_cpu()
                    elif done is not None and done():
                        finished, cpu = time.time(), tree_cpu()
                    elif marks.errors:
                        raise BenchError(f"task {task} failed: {marks.errors[0]}")
                    elif time.monotonic() > deadline:
                        raise BenchError(f"task {task} did not finish in {deadline_s:.0f} s "
                                         f"(status: {STATUS.get(task)})")
                    else:
                        await asyncio.sleep(0.005)  # polling a cheap condition
        finally:
            stopping.set()
            try:
                await asyncio.wait_for(runner, 60)
            finally:
                logger.removeHandler(marks)
        if marks.errors:
            raise BenchError(f"task {task} failed: {marks.errors[0]}")
        if marks.ready is None:
            raise BenchError(f"task {task} never logged that it was ready (assigned / capture started)")
        return Timed(marks.ready, finished, cpu - marks.ready_cpu)


def documents_done(task: str, n: int) -> Callable[[], bool]:
    """True once the task's status counts ``n`` documents (written and checkpointed)."""
    return lambda: (s := STATUS.get(task)) is not None and s.documents >= n
