"""The `localflow` command line (typer). Every command's --help teaches with an example."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.catalog import Catalog, load_catalog, topic_of
from pipeline.errors import ConfigError

app = typer.Typer(
    name="localflow",
    help="Self-hosted streaming pipeline: captures -> Kafka collections -> derivations -> materializations.\n\n"
         "Start with `localflow validate examples/sophia/flow.yaml`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

@app.callback()
def _root() -> None:
    """Self-hosted streaming pipeline: captures -> Kafka collections -> derivations -> materializations."""


CATALOG_ARG = typer.Argument(..., help="The catalog file (flow.yaml).", exists=False, dir_okay=False)


def load_or_exit(path: Path) -> Catalog:
    """Load the catalog; on problems print each with its place and exit 2."""
    try:
        return load_catalog(path)
    except ConfigError as e:
        err_console.print(f"[bold red]error:[/] catalog {path} is not valid:", highlight=False)
        for place, message in e.problems:
            err_console.print(f"  {place}: {message}" if place else f"  {message}", highlight=False, markup=False)
        raise typer.Exit(2) from None


@app.command()
def validate(catalog: Path = CATALOG_ARG) -> None:
    """Check a catalog without running it: models, keys, bindings, connector configs, SQL.

    Exits 0 and lists tasks and collections when valid; exits 2 and prints every problem
    with its place (e.g. `captures.sophia/metrics.interval: '30x' is not a duration`).

    Example: localflow validate examples/sophia/flow.yaml
    """
    cat = load_or_exit(catalog)
    table = Table(title=f"{catalog}: valid", title_justify="left")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("details")
    for name, spec in cat.collections.items():
        kind = "derivation" if spec.derive else "collection"
        extra = f" <- {', '.join(t.source for t in spec.derive.transforms)} ({spec.derive.engine})" if spec.derive else ""
        table.add_row(kind, name, f"topic {topic_of(name)}, key {spec.key}, {spec.partitions} partition(s){extra}")
    for name, cap in cat.captures.items():
        table.add_row("capture", name, f"{cap.connector} every {cap.interval:g}s -> "
                      + ", ".join(b.target for b in cap.bindings))
    for name, mat in cat.materializations.items():
        table.add_row("materialization", name, f"{mat.connector} <- " + ", ".join(b.source for b in mat.bindings))
    console.print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except ConfigError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
