"""`localflow export`: the effective catalog (the file plus the API's tasks)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pipeline.cli.app import (
    CATALOG_ARG,
    CONFIG_TOPIC,
    LogFormat,
    app,
    err_console,
    load_or_exit,
    run_async,
    setup,
)


@app.command()
def export(
    catalog: Path = CATALOG_ARG,
    config_topic: str = CONFIG_TOPIC,
) -> None:
    """Print the effective catalog as YAML: the file plus the tasks created through the API.

    Reads the config topic (where `localflow run --api-port` stores the API's changes) and
    merges its entries into the file's; ${VAR} references are printed as written, never their
    values. Tasks paused through the API are listed on stderr. Comments are not kept.

    \b
    Example:
      localflow export examples/sophia/flow.yaml > flow.effective.yaml
    """
    from pipeline.control.effective import export as render
    from pipeline.control.store import ConfigStore

    setup(LogFormat.text, "warning")
    cat = load_or_exit(catalog)

    async def go() -> int:
        store = ConfigStore(cat.kafka, config_topic)
        if config_topic:
            await store.load()
        sys.stdout.write(render(catalog, store.overlay()))
        for name in store.section("paused"):
            err_console.print(f"paused through the API: {name}", highlight=False, markup=False)
        return 0

    raise typer.Exit(run_async(go))
