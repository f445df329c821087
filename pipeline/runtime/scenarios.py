"""`localflow test`: run a catalog's ``tests:`` against the real broker, without touching its data.

Each test runs in its own namespace: every collection ``c`` becomes ``<ns>/c`` (topic
``<ns>.c``, derivation group ``localflow.<ns>/c``), so tests never read or write production
topics or move a production group, and two tests never see each other's documents. The SQL
engine names tables by the last segment of a collection name, which the prefix leaves as is.

Steps run in order. ``ingest`` validates and writes documents (an invalid one fails the test,
it is not dead-lettered). ``verify`` waits (up to a deadline) until the derivations leading to
the collection have committed every input record, so their outputs are written, then checks
that the collection, reduced to its last document per key, matches the expected documents:
same keys, and each expected property equal to the actual one (Estuary's rule: properties
the expected document omits, such as a clock-derived ``processed_at``, are not compared). The derivations that lead to a
verified collection run in this process, supervised as in `localflow run`, until the test ends.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from pipeline.runtime.catalog import Catalog, CollectionSpec
from pipeline.runtime.collection import DEAD_SUFFIX, Collection, CollectionWriter, read_to_end
from pipeline.runtime.offsets import high_watermarks, partitions_of, probe_consumer
from pipeline.runtime.task import STATUS, TaskContext, supervise
from pipeline.sdk.errors import ValidationFailed


class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


MISSING: Any = _Missing()
"""Stands for a property the actual document does not have."""


@dataclass
class Difference:
    pointer: str
    expected: Any
    actual: Any


@dataclass
class DocumentFailure:
    """One document that does not match: missing, unexpected, or with differing properties."""

    key: list[Any]
    problem: Literal["missing", "unexpected", "differs"]
    expected: Any = None
    actual: Any = None
    differences: list[Difference] = field(default_factory=list)


@dataclass
class TestResult:
    name: str
    steps: int
    seconds: float = 0.0
    failed_step: int | None = None
    """Index of the step that failed (None: passed)."""
    step_title: str = ""
    error: str | None = None
    failures: list[DocumentFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Context for a failure: derivation errors, dead letters."""

    @property
    def passed(self) -> bool:
        return self.failed_step is None


def namespaced(catalog: Catalog, namespace: str) -> Catalog:
    """The catalog's collections (and derivations) renamed ``<namespace>/<name>``; no tasks."""
    collections: dict[str, CollectionSpec] = {}
    for name, spec in catalog.collections.items():
        if spec.derive is not None:
            transforms = [t.model_copy(update={"source": f"{namespace}/{t.source}"}) for t in spec.derive.transforms]
            spec = spec.model_copy(update={"derive": spec.derive.model_copy(update={"transforms": transforms})})
        collections[f"{namespace}/{name}"] = spec
    out = Catalog(kafka=catalog.kafka, collections=collections)
    out._path = catalog.path
    return out


def derivations_for(catalog: Catalog, verified: Iterable[str]) -> list[str]:
    """The derivations that (transitively) compute the verified collections."""
    needed: list[str] = []
    todo = [c for c in verified if catalog.collections[c].derive is not None]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.append(name)
        derive = catalog.collections[name].derive
        assert derive is not None
        todo.extend(t.source for t in derive.transforms if catalog.collections[t.source].derive is not None)
    return needed


def subset_differences(expected: Any, actual: Any, pointer: str = "") -> list[Difference]:
    """Where ``actual`` differs from ``expected``, comparing only what ``expected`` states."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [Difference(pointer or "/", expected, actual)]
        out = []
        for k, v in expected.items():
            at = f"{pointer}/{str(k).replace('~', '~0').replace('/', '~1')}"
            out.extend(subset_differences(v, actual[k], at) if k in actual else [Difference(at, v, MISSING)])
        return out
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [Difference(pointer or "/", expected, actual)]
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for d in subset_differences(e, a, f"{pointer}/{i}")]
    if isinstance(expected, bool) != isinstance(actual, bool) or expected != actual:
        return [Difference(pointer or "/", expected, actual)]
    return []


def compare(collection: Collection, expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> list[DocumentFailure]:
    """Failures of ``actual`` (last document per key) against ``expected``, in expected order."""
    by_key = {orjson.dumps(collection.key_of(d)): d for d in actual}
    failures, seen = [], set()
    for doc in expected:
        key = collection.key_of(doc)
        k = orjson.dumps(key)
        seen.add(k)
        if k not in by_key:
            failures.append(DocumentFailure(key, "missing", expected=doc))
            continue
        differences = subset_differences(doc, by_key[k])
        if differences:
            failures.append(DocumentFailure(key, "differs", doc, by_key[k], differences))
    for k, doc in by_key.items():
        if k not in seen:
            failures.append(DocumentFailure(orjson.loads(k), "unexpected", actual=doc))
    return failures


class _Run:
    """One test in its namespace: the derivations it needs, a writer, and the topics to delete."""

    def __init__(self, catalog: Catalog, name: str, steps: list[Any], timeout: float) -> None:
        self.name, self.steps, self.timeout = name, steps, timeout
        self.namespace = f"localflow_test_{uuid.uuid4().hex[:12]}"
        self.catalog = namespaced(catalog, self.namespace)
        self.original = catalog
        used = {(s.ingest or s.verify).collection for s in steps}
        self.derivations = derivations_for(catalog, [s.verify.collection for s in steps if s.verify])
        used |= set(self.derivations) | {t.source for d in self.derivations
                                         for t in catalog.collections[d].derive.transforms}  # type: ignore[union-attr]
        self.collections = {n: Collection.from_catalog(self.catalog, self.ns(n)) for n in sorted(used)}
        self.stopping = asyncio.Event()

    def ns(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    async def run(self) -> TestResult:
        result = TestResult(self.name, len(self.steps))
        started = time.monotonic()
        writer = CollectionWriter(self.catalog.kafka, "localflow-test")
        workers: list[asyncio.Task[None]] = []
        try:
            await writer.start()
            await writer.ensure(self.collections.values())
            workers = [asyncio.create_task(supervise(TaskContext(self.catalog, self.ns(d), "derivation", self.stopping)),
                                           name=f"localflow-test:{d}") for d in self.derivations]
            for i, step in enumerate(self.steps):
                if step.ingest is not None:
                    result.step_title = f"ingest {step.ingest.collection}"
                    error = await self._ingest(writer, step.ingest.collection, step.ingest.documents)
                    if error:
                        result.failed_step, result.error = i, error
                        break
                else:
                    result.step_title = f"verify {step.verify.collection}"
                    failures, error = await self._verify(step.verify.collection, step.verify.documents)
                    if failures or error:
                        result.failed_step, result.failures, result.error = i, failures, error
                        result.notes = await self._notes(step.verify.collection)
                        break
        finally:
            self.stopping.set()
            if workers:
                await asyncio.wait(workers, timeout=30)
            await writer.stop()
            for d in self.derivations:
                STATUS.pop(self.ns(d), None)
        result.seconds = time.monotonic() - started
        return result

    async def _ingest(self, writer: CollectionWriter, name: str, documents: list[dict[str, Any]]) -> str | None:
        collection = self.collections[name]
        for j, doc in enumerate(documents):
            try:
                collection.validate(doc)
                collection.key_of(doc)
            except ValidationFailed as e:
                return f"ingest document {j + 1} is not a valid {name} document: {str(e).removeprefix(collection.name + ': ')}"
        await writer.write(collection, documents)
        return None

    async def _verify(self, name: str, expected: list[dict[str, Any]]) -> tuple[list[DocumentFailure], str | None]:
        collection = self.collections[name]
        for j, doc in enumerate(expected):
            try:
                collection.key_of(doc)
            except ValidationFailed:
                return [], f"verify document {j + 1} lacks the collection's key {collection.key}: add it"
        deadline = time.monotonic() + self.timeout
        upstream = derivations_for(self.original, [name])
        while upstream and not await self._caught_up(upstream):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        records = await read_to_end(self.catalog.kafka, collection.topic, timeout=self.timeout)
        actual = [r.doc for r in sorted(records, key=lambda r: r.offset) if isinstance(r.doc, dict)]
        return compare(collection, expected, actual), None

    async def _caught_up(self, derivations: list[str]) -> bool:
        """Whether each derivation has committed every record of its sources (so its outputs are written)."""
        kafka = self.catalog.kafka
        sources = {d: [self.collections[t.source].topic for t in self.original.collections[d].derive.transforms]  # type: ignore[union-attr]
                   for d in derivations}
        async with probe_consumer(kafka) as consumer:
            tps = {t: await partitions_of(consumer, t) for ts in sources.values() for t in ts}
            ends = await high_watermarks(consumer, [tp for ps in tps.values() for tp in ps])
        for d, topics in sources.items():
            async with probe_consumer(kafka, group_id=f"localflow.{self.ns(d)}") as group:
                for tp in (tp for t in topics for tp in tps[t]):
                    if ends[tp] > (await group.committed(tp) or 0):
                        return False
        return True

    async def _notes(self, verified: str) -> list[str]:
        """Why documents may be missing: derivation errors and dead letters."""
        notes = []
        for d in self.derivations:
            status = STATUS.get(self.ns(d))
            if status and status.last_error:
                notes.append(f"derivation {d} failed: {status.last_error}")
            if status and not status.connected and not status.last_error:
                notes.append(f"derivation {d} never connected (did its consumer group join in time?)")
        dead = await read_to_end(self.catalog.kafka, self.collections[verified].topic + DEAD_SUFFIX, timeout=10)
        for r in dead[:5]:
            error = r.doc.get("error") if isinstance(r.doc, dict) else r.error
            notes.append(f"dead letter in {verified}: {error}")
        if len(dead) > 5:
            notes.append(f"... and {len(dead) - 5} more dead letters")
        return notes

    async def delete_topics(self) -> None:
        topics = [t for c in self.collections.values() for t in (c.topic, c.dead_topic)]
        admin = AIOKafkaAdminClient(**self.catalog.kafka.client_options())
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            await admin.delete_topics([t for t in topics if t in existing])
        except KafkaError:
            pass  # leftovers are harmless: the namespace is never reused
        finally:
            await admin.close()


async def run_tests(catalog: Catalog, names: list[str] | None = None, *, timeout: float = 60.0,  # noqa: ASYNC109
                    keep_topics: bool = False) -> list[TestResult]:
    """Run the named tests (all when None), one after the other; one result each."""
    results = []
    for name in names or list(catalog.tests):
        run = _Run(catalog, name, catalog.tests[name], timeout)
        try:
            results.append(await run.run())
        finally:
            if not keep_topics:
                await run.delete_topics()
    return results


def report_lines(result: TestResult) -> list[str]:
    """How `localflow test` shows a result: a heading line, then each failing document as a diff."""
    def show(value: Any) -> str:
        return repr(value) if value is MISSING else orjson.dumps(value).decode()

    if result.passed:
        return [f"{result.name} ({result.steps} steps, {result.seconds:.1f}s)"]
    assert result.failed_step is not None
    out = [f"{result.name}: step {result.failed_step + 1} ({result.step_title}), {result.seconds:.1f}s"]
    if result.error:
        out.append(f"  {result.error}")
    for f in result.failures:
        key = orjson.dumps(f.key).decode()
        if f.problem == "missing":
            out.append(f"  document {key}: missing; expected {show(f.expected)}")
        elif f.problem == "unexpected":
            out.append(f"  document {key}: unexpected {show(f.actual)}")
        else:
            out.append(f"  document {key}: differs")
            out.extend(f"    {d.pointer}: expected {show(d.expected)}, actual {show(d.actual)}" for d in f.differences)
    out.extend(f"  note: {n}" for n in result.notes)
    return out
