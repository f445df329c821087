"""``python -m bench`` (``make bench``): every benchmark, a table, and ``bench/results.json``.

    python -m bench                          # everything, full sizes (< 15 minutes on 2 cores)
    python -m bench --quick                  # tiny sizes, to check that everything runs
    python -m bench --stages postgres,redis  # a selection

Services come from the environment (KAFKA_BOOTSTRAP_SERVERS, POSTGRES_URL, REDIS_URL,
S3_ENDPOINT_URL) or are started on loopback by ``pipeline.embedded.services.Services``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from bench import report
from bench.common import Row, Sizes, machine
from bench.harness import Bench, BenchError
from bench.latency import latency
from bench.peers import peers
from bench.scaling import cluster
from bench.stages import STAGES
from bench.workers import memory, scaling
from pipeline.embedded.services import Services

ALL = {**STAGES, "peers": peers, "latency": latency, "memory": memory, "scaling": scaling, "cluster": cluster}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"
WIDTH = 150
"""Columns of the printed tables (rich would cut them to 80 when output is not a terminal)."""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (a smoke run)")
    p.add_argument("--stages", default=",".join(ALL),
                   help=f"comma-separated selection of: {', '.join(ALL)} (default: all)")
    p.add_argument("--docs", type=int, help="documents per stage (default 100000; --quick 2000)")
    p.add_argument("--reps", type=int, help="repetitions per stage (default 3; --quick 1)")
    p.add_argument("--output", type=Path,
                   help="where to write results.json (default bench/results.json; with --quick a temp file)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="write a pyinstrument profile of each localflow run to DIR (slows runs: figures "
                        "of a profiled run are not comparable)")
    args = p.parse_args(argv)
    unknown = [s for s in args.stages.split(",") if s not in ALL]
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(ALL)}")
    if args.profile is not None and importlib.util.find_spec("pyinstrument") is None:
        p.error("--profile needs pyinstrument, in the `dev` extra: .venv/bin/pip install -e '.[dev]'")
    return args


async def run(bench: Bench, stages: list[str], console: Console) -> list[Row]:
    rows: list[Row] = []
    for name in stages:
        started = time.monotonic()
        console.print(f"[bold]{name}[/] ...", highlight=False)
        try:
            out = await ALL[name](bench)
        except Exception as e:  # noqa: BLE001 - one failed benchmark must not hide the others
            if not isinstance(e, BenchError):
                traceback.print_exc()
            out = [Row(name, "", 0.0, note=f"FAILED: {type(e).__name__}: {e}", met=False)]
        new = out if isinstance(out, list) else [out]
        rows += new
        console.print(f"  {name} took {time.monotonic() - started:.0f} s", highlight=False)
        report.show(new, console)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.docs:
        sizes = replace(sizes, docs=args.docs, scaling_docs=args.docs)
    if args.reps:
        sizes = replace(sizes, reps=args.reps)
    stages = args.stages.split(",")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # the harness turns localflow's INFO on to time tasks
        handler.setLevel(logging.WARNING)
    console = Console(stderr=True, width=WIDTH)
    started_at = datetime.now(UTC)
    began = time.monotonic()
    host = machine()
    with tempfile.TemporaryDirectory(prefix="localflow-bench-") as tmp:
        output = args.output or (Path(tmp).parent / "localflow-bench-quick.json" if args.quick else DEFAULT_OUTPUT)
        services = Services.from_env()
        console.print("starting services ...")
        with services:
            bench = Bench(services, sizes, Path(tmp), args.profile)
            rows = asyncio.run(run(bench, stages, console))
    seconds = time.monotonic() - began
    host["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Console(width=WIDTH).print(report.table(rows))
    if any(r.stage.startswith("peers ") for r in rows):
        Console(width=WIDTH).print(report.peers_table(rows))
    report.write(output, rows, {"started_at": started_at.isoformat(), "seconds": round(seconds, 1),
                                "quick": args.quick, "sizes": asdict(sizes), "machine": host})
    console.print(f"{len(rows)} rows in {seconds:.0f} s; written to {output}", highlight=False)
    return 1 if any(r.note.startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
