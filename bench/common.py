"""Shared pieces of the benchmarks: data, timing, results.

Every stage measures localflow and its ceiling (a raw client doing the same work on the same
data) in the same run, on the same services, and reports the ratio of medians.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

RAW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "timestamp": {"type": "string", "format": "date-time"},
        "source": {"type": "string"},
        "data": {"type": "object"},
        "metadata": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
    },
    "required": ["timestamp", "source", "data", "metadata"],
}

TYPES = ["agent_interaction", "system_metric", "user_query", "user_response", "system_event"]


def sophia_docs(n: int, *, keys: int | None = None, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` Sophia raw documents of about 300 bytes; ``keys`` distinct ids (default: all distinct)."""
    rng = random.Random(seed)
    base = datetime(2026, 11, 28, tzinfo=UTC)
    out = []
    for i in range(n):
        k = i if keys is None else rng.randrange(keys)
        out.append({
            "timestamp": (base + timedelta(milliseconds=i)).isoformat().replace("+00:00", "Z"),
            "source": "sophia-ai-api",
            "data": {"type": TYPES[i % len(TYPES)], "agent": f"agent-{i % 17}", "session": f"s-{i % 1009}",
                     "latency_ms": rng.randint(5, 900), "confidence": round(rng.random(), 3),
                     "query": "summarize the quarterly pipeline metrics for the platform team"},
            "metadata": {"id": f"rec-{k:08d}", "page": i // 100},
        })
    return out


@dataclass
class Row:
    """One line of the results table."""

    stage: str
    unit: str
    localflow: float
    ceiling: float
    target: float
    runs: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.localflow / self.ceiling if self.ceiling else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 3)}


async def median_rate(fn: Callable[[], Awaitable[float]], reps: int) -> tuple[float, list[float]]:
    """Run ``fn`` (which returns a rate) ``reps`` times; the median and all runs."""
    runs = [await fn() for _ in range(reps)]
    return statistics.median(runs), runs


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
