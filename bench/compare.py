"""Before and after, in the same run: ``python -m bench.compare BEFORE_DIR [bench options]``.

BEFORE_DIR is another checkout of localflow (e.g. ``git worktree add /tmp/before main``, with this
bench/ copied in so both sides measure the same way). Rounds alternate before / after, each a
``python -m bench`` run of the given stages with this venv's Python (the checkout's own code is
imported: its directory comes first on the path), so a busy minute of a shared machine falls on
both alike. Prints, per stage, the medians of both sides: rate, ratio to the ceiling, and CPU-s per
100,000 documents; ``--output`` keeps every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_side(checkout: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-m", "bench", *args, "--output", str(out)], cwd=checkout, env=env,
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"bench in {checkout} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--output", type=Path, help="JSON file of every run of both sides")
    known, rest = p.parse_known_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="localflow-compare-") as tmp:
        for i in range(known.rounds):
            for side, checkout in (("before", known.before.resolve()), ("after", ROOT)):
                runs[side].append(run_side(checkout, rest, Path(tmp) / f"{side}-{i}.json"))
                print(f"round {i + 1}: {side} done", file=sys.stderr)
    if known.output:
        known.output.write_text(json.dumps(runs, indent=1) + "\n")
    stages = [r["stage"] for r in runs["after"][0]["rows"]]
    print(f"{'stage':34s} {'before':>10s} {'after':>10s} {'ratio b':>8s} {'ratio a':>8s} "
          f"{'CPU/100k b':>10s} {'CPU/100k a':>10s}")
    for stage in stages:
        def med(side: str, field: str, stage: str = stage) -> float | None:
            values = [r[field] for run in runs[side] for r in run["rows"] if r["stage"] == stage and r.get(field)]
            return statistics.median(values) if values else None

        cells = [med("before", "localflow"), med("after", "localflow"), med("before", "ratio"), med("after", "ratio"),
                 med("before", "cpu_100k"), med("after", "cpu_100k")]
        print(f"{stage:34s} " + " ".join("" .rjust(10 if i in (0, 1, 4, 5) else 8) if v is None else
                                         f"{v:{10 if i in (0, 1, 4, 5) else 8},.2f}" for i, v in enumerate(cells)))


if __name__ == "__main__":
    main()
