"""Every metric localflow exports, in one place and one naming scheme (``localflow_*``).

Names follow Prometheus' naming guide: the unit last, in the plural (``_documents``,
``_bytes``, ``_seconds``), then ``_total`` for counters (added by prometheus_client); a time
is a ``_timestamp_seconds`` gauge whose age the query computes (``time() - ...``).

Labels: ``task`` (catalog task name), ``collection`` (collection name), ``topic``/``partition``
for per-partition gauges. Use these objects; never create metrics elsewhere.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

DOCS_IN = Counter("localflow_input_documents", "Documents read by a task, per input collection.",
                  ["task", "collection"])
DOCS_OUT = Counter("localflow_output_documents", "Documents written by a task, per output collection or binding.",
                   ["task", "collection"])
BYTES_IN = Counter("localflow_input_bytes", "Bytes read by a task (source bytes for captures).",
                   ["task", "collection"])
BYTES_OUT = Counter("localflow_output_bytes", "Bytes written by a task.", ["task", "collection"])
DEAD_LETTERS = Counter("localflow_dead_letter_documents", "Documents sent to a dead-letter topic, by reason.",
                       ["task", "collection", "reason"])
ERRORS = Counter("localflow_errors", "Errors by kind (auth, source, endpoint, config, fenced, internal).",
                 ["task", "kind"])
CONSUMER_LAG = Gauge("localflow_consumer_lag_documents",
                     "Fetch high watermark minus the task's checkpoint, per partition, in documents.",
                     ["task", "topic", "partition"])
CAPTURE_LAG = Gauge("localflow_capture_lag_seconds", "Now minus the newest source timestamp a capture wrote.",
                    ["task"])
BATCH_SIZE = Histogram("localflow_batch_documents", "Documents per applied batch.", ["task"],
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
LAST_CHECKPOINT = Gauge("localflow_last_checkpoint_timestamp_seconds",
                        "When the task last committed a checkpoint (Unix time; its age is time() minus this).",
                        ["task"])

_checkpoints: dict[str, float] = {}


def checkpointed(task: str) -> None:
    """Record that ``task`` just committed a checkpoint."""
    _checkpoints[task] = now = time.time()
    LAST_CHECKPOINT.labels(task).set(now)


def checkpoint_times() -> dict[str, float]:
    """Epoch seconds of each task's last checkpoint (for `status` and `/readyz`)."""
    return dict(_checkpoints)
