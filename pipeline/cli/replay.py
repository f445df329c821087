"""`localflow replay`: re-read collections into a materialization."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from pipeline.cli.app import (
    CATALOG_ARG,
    QUIET_LOG_FORMAT,
    QUIET_LOG_LEVEL,
    LogFormat,
    app,
    console,
    err_console,
    load_or_exit,
    run_async,
    setup,
)
from pipeline.sdk.errors import ConfigError


@app.command()
def replay(
    catalog: Path = CATALOG_ARG,
    materialization: str = typer.Option(..., "--materialization", "-m", help="The materialization to backfill."),
    binding: list[str] | None = typer.Option(
        None, "--binding", "-b", help="Replay only the binding reading this collection (repeatable). Default: all."),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Re-read each partition from its first record."),
    from_timestamp: str | None = typer.Option(
        None, "--from-timestamp",
        help="Re-read records written at or after this time (RFC 3339, e.g. 2026-11-28T10:00:00Z; UTC if no zone)."),
    log_format: LogFormat = QUIET_LOG_FORMAT,
    log_level: str = QUIET_LOG_LEVEL,
) -> None:
    """Re-read collections into a materialization to backfill it, with a progress bar per partition.

    Replay reads each partition from the start you choose up to its end when replay began,
    applies the documents through the materialization's own connector (upserts, so nothing is
    doubled) and leaves the endpoint's checkpoint where the workers expect it. Stop the
    materialization's workers first: partitions they hold are not replayed, and the summary
    says so. If the endpoint fails, replay stops with its error: run it again (replaying twice
    is harmless). Exit 0 when every partition was replayed, 1 otherwise, 2 for bad arguments.

    \b
    Example:
      localflow replay examples/sophia/flow.yaml --materialization sophia/postgres --from-beginning
    """
    from pipeline.runtime import replay as rp

    setup(log_format, log_level)
    if from_beginning == (from_timestamp is not None):
        err_console.print("[bold red]error:[/] give exactly one of --from-beginning or --from-timestamp", highlight=False)
        raise typer.Exit(2)
    cat = load_or_exit(catalog)
    try:
        collections = rp.sources_of(cat, materialization, binding)
        since = rp.parse_timestamp(from_timestamp) if from_timestamp else None
    except ConfigError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None

    async def go() -> int:
        plans = await rp.plan(cat, collections, since)
        total = sum(p.end - p.start for p in plans)
        console.print(f"replaying {total:,} documents of {len(plans)} partition(s) into {materialization}",
                      highlight=False)
        replayed = await rp.run_replay(cat, materialization, plans, console)
        console.print(rp.summary(materialization, replayed))
        return 0 if replayed.complete else 1

    raise typer.Exit(run_async(go))
