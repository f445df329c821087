"""The results: a table on the terminal and ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import Row


def _figure(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> Table:
    t = Table(title="localflow benchmarks (medians)", title_justify="left")
    for name, justify in (("stage", "left"), ("unit", "left"), ("localflow", "right"), ("ceiling", "right"),
                          ("ratio", "right"), ("target", "left"), ("met", "center"),
                          ("CPU-s/100k", "right"), ("ceiling CPU-s/100k", "right"), ("CPU ratio", "right")):
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        if r.stage.startswith("peers "):
            continue  # in peers_table
        ratio = r.ratio
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[r.met]
        t.add_row(r.stage, r.unit, _figure(r.localflow), _figure(r.ceiling),
                  "" if ratio is None else f"{ratio:.2f}", r.target, met,
                  _figure(r.cpu_100k), _figure(r.ceiling_cpu_100k),
                  "" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}")
    return t


def peers_table(rows: list[Row]) -> Table:
    """The peers' rows: steady-state rate, wall and first-row times, CPU per 100,000 documents."""
    t = Table(title="localflow and its peers (medians)", title_justify="left")
    for name in ("sink: contender", "steady docs/s", "wall s", "first rows s", "CPU-s/100k",
                 "steady CPU-s/100k", "with services CPU-s/100k", "ahead"):
        t.add_column(name, justify="left" if name in ("sink: contender", "ahead") else "right")
    for r in rows:
        if not r.stage.startswith("peers "):
            continue
        f = r.figures
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[r.met]
        if not f:
            t.add_row(r.stage.removeprefix("peers "), "", "", "", "", "", "", r.note[:60])
            continue
        t.add_row(r.stage.removeprefix("peers "), _figure(r.localflow), _figure(f.get("wall_s")),
                  _figure(f.get("first_row_s")), _figure(r.cpu_100k), _figure(f.get("steady_cpu_100k")),
                  _figure(f.get("tree_cpu_100k")), met)
    return t


def show(rows: list[Row], console: Console | None = None) -> None:
    console = console or Console()
    console.print(peers_table(rows) if rows and rows[0].stage.startswith("peers ") else table(rows))
    for r in rows:
        if r.note:
            console.print(f"[dim]{r.stage}: {r.note}[/]", highlight=False)


def write(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    body = {**meta, "rows": [r.as_dict() for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
