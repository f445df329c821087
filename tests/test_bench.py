"""`python -m bench --quick` runs every benchmark against the session services and reports them.

A smoke test of the benchmark machinery only: tiny sizes, and no assertion on any figure
(speed belongs to `make bench`, not to the test suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STAGES = ["collection write", "collection read", "derivation", "postgres", "postgres (vs no-Kafka ceiling)", "redis",
          "s3", "s3 (vs no-Kafka ceiling)", "file capture"]
PEERS = ["peers postgres: localflow", "peers postgres: Quix Streams", "peers postgres: Pathway",
         "peers redis: localflow", "peers redis: Quix Streams"]


def test_quick_run_prints_every_row_and_writes_results(services_env: dict[str, str], tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(output)], cwd=ROOT,
                          env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads(output.read_text())
    assert results["quick"] is True
    assert {"nproc", "cpu", "memory_gib"} <= results["machine"].keys()
    rows = {r["stage"]: r for r in results["rows"]}
    for stage in STAGES:
        row = rows[stage]
        assert row["localflow"] > 0 and row["ceiling"] > 0, row
        assert row["ratio"] == round(row["localflow"] / row["ceiling"], 3)
        assert len(row["runs"]["localflow"]) == len(row["runs"]["ceiling"]) == 1
        assert row["cpu_100k"] is not None and row["ceiling_cpu_100k"] is not None, row
    for stage in PEERS:  # a peer that is not installed (no `make peers`) or cannot run says why
        row = rows[stage]
        assert row["localflow"] > 0 if row["figures"] else row["note"], row
    assert rows["peers postgres: localflow"]["figures"]["wall_s"] > 0
    latency = [s for s in rows if s.startswith("latency @")]
    assert len(latency) == 6 and all(rows[s]["unit"] == "ms" and rows[s]["localflow"] > 0 for s in latency)
    assert rows["memory: worker peak RSS"]["localflow"] > 0
    assert len([s for s in rows if s.startswith("scaling:")]) == 4
    for stage in [*STAGES, "memory: worker peak RSS"]:
        assert stage in done.stdout
