"""Judging a census against what the sources produced: nothing lost, nothing doubled, and
captured = materialized + dead letters at every endpoint (SPEC "Guarantees").
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from tests.support.census import Census, Endpoints, TopicContent, dead_key
from tests.support.pipeline import (
    AGENT_LOGS,
    API_TASK,
    COLLECTIONS,
    LOGS_TASK,
    METRICS,
    PG_TABLES,
    POSTGRES,
    PROCESSED,
    RAW,
    REDIS,
    REDIS_PREFIXES,
    S3,
)
from tests.support.sources import log_seq


@dataclass
class Expected:
    """What the sources produced, so far."""

    api_ids: set[str] = field(default_factory=set)
    """Records with an id: each must be captured once (a key of sophia_raw_data)."""
    api_without_id: int = 0
    """Records the capture must dead-letter (no id)."""
    api_refused: set[str] = field(default_factory=set)
    """Ids whose documents Postgres cannot hold (dead letters of the processed collection)."""
    log_lines: set[int] = field(default_factory=set)
    log_too_long: int = 0
    log_refused: set[int] = field(default_factory=set)
    """Sequence numbers of lines Postgres cannot hold."""

    @property
    def source_records(self) -> int:
        return len(self.api_ids) + self.api_without_id + len(self.log_lines) + self.log_too_long


@dataclass
class Verdict:
    """The outcome of one check of the whole pipeline."""

    source_records: int = 0
    keys: int = 0
    resent: int = 0
    pg: tuple[int, int, int] = (0, 0, 0)
    redis: tuple[int, int, int] = (0, 0, 0)
    s3: tuple[int, int, int] = (0, 0, 0)
    """(materialized, dead letters, captured) of each endpoint, summed over its bindings."""
    lost: int = 0
    doubled: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.lost and not self.doubled

    def lose(self, n: int, what: str) -> None:
        if n > 0:
            self.lost += n
            self.problems.append(what)

    def double(self, n: int, what: str) -> None:
        if n > 0:
            self.doubled += n
            self.problems.append(what)


def _sample(values: Iterable[Any]) -> list[str]:
    return sorted(map(str, values))[:3]


def log_keys(content: TopicContent) -> dict[int, set[Any]]:
    """Sequence number of each captured `AgentLogs` line -> the keys it was captured under."""
    out: dict[int, set[Any]] = defaultdict(set)
    for _, _, key, doc in content.messages:
        seq = log_seq(doc or {})
        if seq is not None:
            out[seq].add(key)
    return out


def judge_captures(expected: Expected, topics: dict[str, TopicContent], v: Verdict) -> None:
    """Captures and derivation: every source record under exactly one key, derived once."""
    raw_ids = topics[RAW].keys
    v.lose(len(expected.api_ids - raw_ids), f"API records not captured: {_sample(expected.api_ids - raw_ids)}")
    v.double(len(raw_ids - expected.api_ids), f"raw keys that no API record has: {_sample(raw_ids - expected.api_ids)}")
    no_id = {d["original"] for d in topics[RAW].dead_from(API_TASK) if d.get("original")}
    v.lose(expected.api_without_id - len(no_id),
           f"{expected.api_without_id} API records without id, {len(no_id)} capture dead letters")
    by_seq = log_keys(topics[AGENT_LOGS])
    v.lose(len(expected.log_lines - by_seq.keys()), f"log lines not captured: {_sample(expected.log_lines - by_seq.keys())}")
    v.double(sum(len(k) - 1 for k in by_seq.values()), "log lines captured under two keys: "
             f"{_sample(s for s, k in by_seq.items() if len(k) > 1)}")
    too_long = {d["error"].split(": line of")[0] for d in topics[AGENT_LOGS].dead_from(LOGS_TASK)
                if "longer than max_line_bytes" in d.get("error", "")}
    v.lose(expected.log_too_long - len(too_long),
           f"{expected.log_too_long} over-long log lines, {len(too_long)} capture dead letters")
    derived = topics[PROCESSED].keys
    v.lose(len(raw_ids - derived), f"raw documents not derived: {_sample(raw_ids - derived)}")
    v.double(len(derived - raw_ids), f"derived keys without a raw document: {_sample(derived - raw_ids)}")


def judge(expected: Expected, before: dict[str, TopicContent], ends: Endpoints,
          after: dict[str, TopicContent]) -> Verdict:
    """Check the whole pipeline.

    ``before``: the topics once the sources were captured; ``ends``: the endpoints afterwards;
    ``after``: the topics again. Metrics keep flowing, so each endpoint must hold at least what
    ``before`` holds and nothing that ``after`` does not.
    """
    v = Verdict(source_records=expected.source_records)
    judge_captures(expected, before, v)
    v.keys = sum(len(before[c].keys) for c in COLLECTIONS)
    v.resent = sum(len(before[c].messages) - len(before[c].keys) for c in COLLECTIONS)

    def endpoint(task: str, held: dict[str, Any], bindings: Iterable[str]) -> tuple[int, int, int]:
        """Per binding: captured keys = materialized keys + dead-lettered keys, none in both."""
        materialized = dead_total = captured = 0
        for c in bindings:
            want, allowed = before[c].keys, after[c].keys
            dead = {dead_key(d, c) for d in after[c].dead_from(task)}
            have = held[c]
            if isinstance(have, list):  # Postgres rows
                v.double(len(have) - len(set(have)), f"{task} {c}: keys in two rows")
                have = set(have)
            missing = want - have - dead
            v.lose(len(missing), f"{task} {c}: {len(missing)} keys missing, e.g. {_sample(missing)}")
            v.double(len(have & dead), f"{task} {c}: keys both materialized and dead-lettered: {_sample(have & dead)}")
            extra = have - allowed
            if extra:
                v.problems.append(f"{task} {c}: {len(extra)} keys that no document has, e.g. {_sample(extra)}")
            materialized += len(have & want)
            dead_total += len(dead & want)
            captured += len(want)
        return materialized, dead_total, captured

    v.pg = endpoint(POSTGRES, ends.postgres, PG_TABLES)
    v.redis = endpoint(REDIS, dict(ends.redis), REDIS_PREFIXES)
    s3 = [0, 0, 0]
    for c in COLLECTIONS:
        counts = ends.s3[c]
        want, allowed = before[c].offsets(), after[c].offsets()
        twice = [o for o, n in counts.items() if n > 1]
        v.double(len(twice), f"{S3} {c}: offsets archived in two objects, e.g. {twice[:3]}")
        missing = want - counts.keys()
        v.lose(len(missing), f"{S3} {c}: {len(missing)} documents not archived, e.g. {sorted(missing)[:3]}")
        extra = counts.keys() - allowed
        if extra:
            v.problems.append(f"{S3} {c}: {len(extra)} archived offsets that the topic does not hold")
        s3[0] += len(want & counts.keys())
        s3[1] += len(after[c].dead_from(S3))
        s3[2] += len(want)
    v.s3 = (s3[0], s3[1], s3[2])
    # Postgres dead-letters exactly the documents it cannot hold.
    by_seq = log_keys(before[AGENT_LOGS])
    refused = {PROCESSED: set(expected.api_refused),
               AGENT_LOGS: {k for s in expected.log_refused for k in by_seq.get(s, ())}, METRICS: set()}
    for c, keys in refused.items():
        dead = {dead_key(d, c) for d in after[c].dead_from(POSTGRES)}
        if dead - keys:
            v.problems.append(f"{POSTGRES} {c}: dead-lettered documents it can hold: {_sample(dead - keys)}")
        if keys - dead:
            v.problems.append(f"{POSTGRES} {c}: documents it cannot hold are not dead letters (yet): "
                              f"{_sample(keys - dead)}")
    return v


async def settle(census: Census, expected: Expected, *, within: float = 180) -> tuple[Verdict, float]:
    """Wait until the sources are captured and every endpoint holds everything; then judge.

    Returns the verdict of the last look (good, or the deadline passed, or something that
    waiting cannot fix, such as a doubled document) and the seconds it took.
    """
    started = time.monotonic()
    deadline = started + within
    while True:
        before = await census.topics()
        pending = Verdict()
        judge_captures(expected, before, pending)
        if not pending.lost or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)  # polling the topics, bounded by the deadline
    v = pending
    while time.monotonic() <= deadline:
        ends = await _endpoints_or_none(census)
        if ends is not None:
            v = judge(expected, before, ends, await census.topics())
            if not v.lost:
                break
        await asyncio.sleep(1)  # polling the endpoints, bounded by the deadline
    return v, time.monotonic() - started


async def _endpoints_or_none(census: Census) -> Endpoints | None:
    """The endpoints' content, or None while one of them cannot be read (e.g. it is restarting)."""
    try:
        return await census.endpoints()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("redis", "botocore", "aiobotocore"):
            return None
        raise
