"""`localflow validate`: check a catalog without running it."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import typer
from rich.table import Table

from pipeline.cli.app import (
    CATALOG_ARG,
    Output,
    app,
    console,
    load_or_exit,
)
from pipeline.runtime.catalog import Catalog, load_catalog, topic_of
from pipeline.sdk.errors import ConfigError
from pipeline.sdk.problems import Problem


@app.command()
def validate(
    catalog: Path = CATALOG_ARG,
    output: Output = typer.Option(Output.text, "--output", "-o",
                                  help="`text` (readable) or `json` (one object: valid, problems, tasks)."),
) -> None:
    """Check a catalog without running it: models, schemas, keys, bindings, connector configs, SQL.

    Exits 0 and lists tasks and collections when valid; exits 2 and prints every problem at
    once, each at its file:line:column with its place, the offending value and, for a misspelled
    name, a suggestion and the valid names (e.g. `flow.yaml:12:15:
    captures.sophia/metrics.interval: '30x' is not a duration`). Fields of every connector are
    in docs/reference.md (`localflow schema --reference`).

    \b
    Example:
      localflow validate examples/sophia/flow.yaml
      localflow validate flow.yaml --output json | jq '.problems[].message'
    """
    if output is Output.json:
        raise typer.Exit(_validate_json(catalog))
    cat = load_or_exit(catalog)
    rows = _catalog_rows(cat)
    if not console.is_terminal:  # pipes and CI: plain lines, never cut to a terminal's width
        print(f"{catalog}: valid")
        for row in rows:
            print("  ".join(row))
        return
    table = Table(title=f"{catalog}: valid", title_justify="left")
    for column in ("kind", "name", "details"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _catalog_rows(cat: Catalog) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, spec in cat.collections.items():
        kind = "derivation" if spec.derive else "collection"
        extra = f" <- {', '.join(t.source for t in spec.derive.transforms)} ({spec.derive.engine})" if spec.derive else ""
        rows.append((kind, name, f"topic {topic_of(name)}, key {spec.key}, {spec.partitions} partition(s){extra}"))
    for name, cap in cat.captures.items():
        rows.append(("capture", name, f"{cap.connector} every {cap.interval:g}s -> "
                     + ", ".join(b.target for b in cap.bindings)))
    for name, mat in cat.materializations.items():
        rows.append(("materialization", name, f"{mat.connector} <- " + ", ".join(b.source for b in mat.bindings)))
    return rows


def _validate_json(path: Path) -> int:
    """`validate --output json`: one JSON object on stdout, for editors and CI; exit 0 or 2."""

    try:
        cat = load_catalog(path)
    except ConfigError as e:
        problems = [p.as_json() if isinstance(p, Problem) else {"path": p[0], "message": p[1]} for p in e.problems]
        sys.stdout.buffer.write(orjson.dumps({"catalog": str(path), "valid": False, "problems": problems},
                                             option=orjson.OPT_INDENT_2) + b"\n")
        return 2
    body = {"catalog": str(path), "valid": True, "problems": [],
            "collections": {n: {"topic": topic_of(n), "key": c.key, "partitions": c.partitions,
                                "derived_from": [t.source for t in c.derive.transforms] if c.derive else None}
                            for n, c in cat.collections.items()},
            "captures": {n: {"connector": c.connector, "interval_seconds": c.interval,
                             "targets": [b.target for b in c.bindings]} for n, c in cat.captures.items()},
            "materializations": {n: {"connector": m.connector, "sources": [b.source for b in m.bindings]}
                                 for n, m in cat.materializations.items()}}
    sys.stdout.buffer.write(orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")
    return 0
