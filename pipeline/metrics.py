"""Every metric localflow exports, in one place and one naming scheme (``localflow_*``).

Labels: ``task`` (catalog task name), ``collection`` (collection name), ``topic``/``partition``
for per-partition gauges. Use these objects; never create metrics elsewhere.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

DOCS_IN = Counter("localflow_documents_in", "Documents read by a task, per input collection.",
                  ["task", "collection"])
DOCS_OUT = Counter("localflow_documents_out", "Documents written by a task, per output collection or binding.",
                   ["task", "collection"])
BYTES_IN = Counter("localflow_bytes_in", "Bytes read by a task (source bytes for captures).",
                   ["task", "collection"])
BYTES_OUT = Counter("localflow_bytes_out", "Bytes written by a task.", ["task", "collection"])
DEAD_LETTERS = Counter("localflow_dead_letters", "Documents sent to a dead-letter topic, by reason.",
                       ["task", "collection", "reason"])
ERRORS = Counter("localflow_errors", "Errors by kind (auth, source, endpoint, config, fenced, internal).",
                 ["task", "kind"])
CONSUMER_LAG = Gauge("localflow_consumer_lag", "Fetch high watermark minus the task's checkpoint, per partition.",
                     ["task", "topic", "partition"])
CAPTURE_LAG = Gauge("localflow_capture_lag_seconds", "Now minus the newest source timestamp a capture wrote.",
                    ["task"])
BATCH_SIZE = Histogram("localflow_batch_size", "Documents per applied batch.", ["task"],
                       buckets=(1, 10, 100, 500, 1000, 5000, 10000, 50000))
BATCH_SECONDS = Histogram("localflow_batch_duration_seconds", "Time to apply one batch.", ["task"],
                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
END_TO_END = Histogram("localflow_end_to_end_latency_seconds",
                       "Document timestamp to materialized (or derived) time.", ["task", "collection"],
                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600))
ARCHIVE_BYTES = Counter("localflow_archive_bytes", "Bytes of objects written to the archive (storage growth).",
                        ["task", "collection"])
TASK_RESTARTS = Counter("localflow_task_restarts", "Times a task was restarted after a failure.", ["task"])
TASK_INFO = Gauge("localflow_task_info", "1 for each task this process runs; `type` is capture, derivation or "
                  "materialization (alerts join on it).", ["task", "type"])
TASK_UP = Gauge("localflow_task_up", "1 while a task is running, 0 after it failed or stopped.", ["task"])


class _CheckpointAge(Collector):
    """Seconds since each task last committed a checkpoint, computed at scrape time."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        family = GaugeMetricFamily("localflow_checkpoint_age_seconds",
                                   "Seconds since the task last committed a checkpoint.", labels=["task"])
        now = time.time()
        for task, at in self.last.items():
            family.add_metric([task], now - at)
        yield family


_CHECKPOINTS = _CheckpointAge()
REGISTRY.register(_CHECKPOINTS)


def checkpointed(task: str) -> None:
    """Record that ``task`` just committed a checkpoint."""
    _CHECKPOINTS.last[task] = time.time()


def checkpoint_times() -> dict[str, float]:
    """Epoch seconds of each task's last checkpoint (for `status` and `/readyz`)."""
    return dict(_CHECKPOINTS.last)
