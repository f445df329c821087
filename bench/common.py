"""Shared pieces of the benchmarks: sizes, data, rows of the results table, the machine.

Every stage measures localflow and its ceiling (a raw client doing the same work on the same
data) in the same run, on the same services, and reports the ratio of medians.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

RAW_SCHEMA: dict[str, Any] = yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "examples/sophia/schemas/raw.schema.yaml").read_text())
"""The Sophia raw document schema, exactly as the example catalog declares it."""
RAW_KEY = ["/metadata/id"]

TYPES = ["agent_interaction", "system_metric", "user_query", "user_response", "system_event"]


@dataclass(frozen=True)
class Sizes:
    """How much work each part does; ``quick()`` is for the smoke test."""

    docs: int = 100_000
    reps: int = 3
    latency_seconds: float = 60.0
    latency_rates: tuple[int, ...] = (1_000, 10_000)
    backlog: int = 1_000_000
    scaling_docs: int = 200_000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(docs=2_000, reps=1, latency_seconds=2.0, latency_rates=(200, 1_000), backlog=5_000,
                   scaling_docs=2_000)


def sophia_data(i: int, rng: random.Random) -> dict[str, Any]:
    """The ``data`` of a Sophia raw record (an agent interaction, a metric, a query...)."""
    return {"type": TYPES[i % len(TYPES)], "agent": f"agent-{i % 17}", "session": f"s-{i % 1009}",
            "latency_ms": rng.randint(5, 900), "confidence": round(rng.random(), 3),
            "query": "summarize the quarterly pipeline metrics for the platform team"}


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
            "data": sophia_data(i, rng),
            "metadata": {"id": f"rec-{k:08d}", "page": i // 100},
        })
    return out


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int | None = None) -> float:
    """CPU seconds used so far by a process and all its descendants (their reaped children too).

    The root defaults to this process, whose descendants are the services it started and any
    worker subprocess: so a window's CPU is all the work of a run, on a machine others share.
    """
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(b")") + 2:].split()
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total / _TICKS


@dataclass
class Sample:
    """One timed run: how much work, in how long, for how much CPU (of the whole process tree)."""

    work: float
    seconds: float
    cpu: float
    docs: int = 0
    """Documents the run handled (the work may be MB): the base of CPU-seconds per 100,000 documents."""

    @property
    def rate(self) -> float:
        return self.work / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_cpu(self) -> float:
        return self.work / self.cpu if self.cpu > 0 else 0.0

    @property
    def cpu_100k(self) -> float | None:
        """CPU-seconds of the whole process tree per 100,000 documents."""
        return self.cpu * PER_DOCS / self.docs if self.docs else None


class Meter:
    """``with Meter() as m: ...``, then ``m.sample(work)``: wall time and tree CPU of the block."""

    def __enter__(self) -> Meter:
        self.cpu = tree_cpu()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu = tree_cpu() - self.cpu

    def sample(self, work: float, docs: int | None = None) -> Sample:
        """``docs`` defaults to ``work`` (a stage counted in documents)."""
        return Sample(work, self.seconds, self.cpu, int(work) if docs is None else docs)


PER_DOCS = 100_000
"""CPU is reported per this many documents."""


@dataclass
class Row:
    """One line of the results table: localflow and its ceiling (medians), or one figure."""

    stage: str
    unit: str
    localflow: float
    ceiling: float | None = None
    target: str = ""
    """E.g. ``ratio >= 0.8`` or ``p99 < 500 ms``; empty for figures without one."""
    runs: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""
    met: bool | None = None
    """Whether the target is met (None when the row has no target)."""
    cpu_ratio: float | None = None
    """localflow's work per CPU-second over the ceiling's (both measured on the whole process tree)."""
    cpu_100k: float | None = None
    """localflow's CPU-seconds per 100,000 documents (median, whole process tree)."""
    ceiling_cpu_100k: float | None = None
    figures: dict[str, float] = field(default_factory=dict)
    """Further figures of the row (the peers': wall, first row, steady CPU), by name."""

    @property
    def ratio(self) -> float | None:
        return self.localflow / self.ceiling if self.ceiling else None

    def as_dict(self) -> dict[str, Any]:
        ratio = self.ratio
        out = {**asdict(self), "ratio": None if ratio is None else round(ratio, 3)}
        for name in ("cpu_ratio", "cpu_100k", "ceiling_cpu_100k"):
            if out[name] is not None:
                out[name] = round(out[name], 3)
        out["figures"] = {k: round(v, 3) for k, v in self.figures.items()}
        return out


def ratio_row(stage: str, unit: str, localflow: list[Sample], ceiling: list[Sample], target: float | None,
              note: str = "") -> Row:
    """A stage row: medians of both sides' rates, whether ratio >= target, and the CPU ratio."""
    lf, ce = (statistics.median(s.rate for s in localflow), statistics.median(s.rate for s in ceiling))
    runs = {"localflow": [round(s.rate, 2) for s in localflow], "ceiling": [round(s.rate, 2) for s in ceiling],
            "localflow_seconds": [round(s.seconds, 3) for s in localflow],
            "ceiling_seconds": [round(s.seconds, 3) for s in ceiling],
            "localflow_cpu_seconds": [round(s.cpu, 2) for s in localflow],
            "ceiling_cpu_seconds": [round(s.cpu, 2) for s in ceiling]}
    row = Row(stage, unit, lf, ce, f"ratio >= {target}" if target else "", runs, note)
    if target:
        row.met = row.ratio is not None and row.ratio >= target
    lf_cpu = statistics.median(s.per_cpu for s in localflow)
    ce_cpu = statistics.median(s.per_cpu for s in ceiling)
    row.cpu_ratio = lf_cpu / ce_cpu if ce_cpu else None
    row.cpu_100k, row.ceiling_cpu_100k = _median_cpu_100k(localflow), _median_cpu_100k(ceiling)
    return row


def _median_cpu_100k(samples: list[Sample]) -> float | None:
    values = [v for s in samples if (v := s.cpu_100k) is not None]
    return statistics.median(values) if values else None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kib / 1024 / 1024, 1),
            "python": platform.python_version(), "kernel": platform.release(),
            "load_average_at_start": [round(x, 2) for x in load]}
