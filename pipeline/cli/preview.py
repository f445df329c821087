"""`localflow preview`: print a collection's documents as JSON lines (like `vector tap`).

It reads without a consumer group, so it never moves any task's checkpoint. Without
``--from-beginning`` it starts at each partition's current end, read from a fetch response
(the only "latest offset" every broker reports right), and waits for new documents.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import BinaryIO

import orjson
import typer
from aiokafka.errors import KafkaError

from pipeline.cli.app import (
    CATALOG_ARG,
    LogFormat,
    app,
    err_console,
    load_or_exit,
    run_command,
    setup,
)
from pipeline.runtime.catalog import Catalog
from pipeline.runtime.collection import Collection
from pipeline.runtime.offsets import beginning_offsets, high_watermarks, partitions_of, probe_consumer
from pipeline.sdk.errors import ConfigError, EndpointError


async def preview(catalog: Catalog, collection: str, *, limit: int | None, follow: bool, from_beginning: bool,
                  out: BinaryIO, stopping: asyncio.Event | None = None) -> int:
    """Write documents to ``out``, one JSON object per line; return how many were written.

    Stops after ``limit`` documents; with ``from_beginning`` and without ``follow``, at the
    end each partition had when preview started; otherwise when ``stopping`` is set.
    """
    if collection not in catalog.collections:
        raise ConfigError(f"{collection!r} is not a collection of the catalog; collections: "
                          f"{', '.join(sorted(catalog.collections))}", "COLLECTION")
    topic = Collection.from_catalog(catalog, collection).topic
    stopping = stopping or asyncio.Event()
    written = 0
    async with probe_consumer(catalog.kafka, partition_fetch_bytes=1024 * 1024) as consumer:
        tps = await partitions_of(consumer, topic)
        if not tps:
            raise ConfigError(f"collection {collection} has no topic {topic} on {catalog.kafka.bootstrap_servers} yet "
                              f"(nothing was written to it)", "COLLECTION")
        ends = await high_watermarks(consumer, tps)
        starts = await beginning_offsets(consumer, tps) if from_beginning else ends
        for tp in tps:
            consumer.seek(tp, starts[tp])
        if not from_beginning:
            print(f"waiting for new documents of {collection} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        until = ends if from_beginning and not follow else None
        pending = {tp for tp in tps if until is None or starts[tp] < until[tp]}
        while pending and not stopping.is_set() and (limit is None or written < limit):
            try:
                batch = await consumer.getmany(timeout_ms=200, max_records=limit - written if limit else 1000)
            except KafkaError as e:
                raise EndpointError(f"Kafka at {catalog.kafka.bootstrap_servers}: fetch failed: {e!r}") from e
            for tp, messages in batch.items():
                for m in messages:
                    if until is not None and m.offset >= until[tp]:
                        break
                    line = _line(m.value)
                    if line:
                        out.write(line)
                        written += 1
            out.flush()
            if until is not None:
                pending = {tp for tp in pending if await consumer.position(tp) < until[tp]}
    return written


def _line(value: bytes | None) -> bytes:
    """The document re-serialized on one line; a value that is not JSON is shown as a string."""
    try:
        return orjson.dumps(orjson.loads(value or b"null")) + b"\n"
    except orjson.JSONDecodeError:
        print(f"(not JSON: {value[:80]!r})", file=sys.stderr)
        return b""


# ---------------------------------------------------------------------------- the command

def _preview_arguments(first: Path, second: str | None, option: Path | None) -> tuple[Path, str]:
    """(catalog, collection) from `preview CATALOG COLLECTION`, or from the deprecated
    `preview COLLECTION [--catalog FILE]` (./flow.yaml by default), which still works."""
    if second is not None:
        if option is not None:
            err_console.print("[bold red]error:[/] the catalog is given twice (argument and --catalog); "
                              "write: localflow preview CATALOG COLLECTION", highlight=False)
            raise typer.Exit(2)
        return first, second
    if option is None and first.is_file():
        err_console.print("[bold red]error:[/] name the collection to read: localflow preview CATALOG COLLECTION",
                          highlight=False)
        raise typer.Exit(2)
    catalog = option or Path("flow.yaml")
    err_console.print(f"warning: `preview COLLECTION --catalog FILE` is deprecated; write: localflow preview {catalog} {first}",
                      highlight=False, markup=False)
    return catalog, str(first)


@app.command("preview")
def preview_command(
    catalog: Path = CATALOG_ARG,
    collection: str | None = typer.Argument(
        None, metavar="COLLECTION", help="The collection to read, e.g. sophia/sophia_raw_data.  [required]"),
    catalog_option: Path | None = typer.Option(
        None, "--catalog", "-c", hidden=True, dir_okay=False,
        help="Deprecated: the catalog is the first argument, as in every other command."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new documents until Ctrl-C."),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Stop after this many documents."),
    from_beginning: bool = typer.Option(
        False, "--from-beginning", help="Start at the first document instead of only showing new ones."),
) -> None:
    """Print a collection's documents as JSON lines, without moving any task's checkpoint.

    Without --from-beginning, preview shows documents written from now on and waits for them
    (until --limit or Ctrl-C). With --from-beginning it prints what the collection holds and
    exits, or keeps going with --follow.

    \b
    Example:
      localflow preview examples/sophia/flow.yaml sophia/sophia_raw_data --from-beginning --limit 5
    """
    from pipeline.cli.preview import preview as read

    catalog, collection = _preview_arguments(catalog, collection, catalog_option)
    setup(LogFormat.text, "warning", quiet_clients=True)
    cat = load_or_exit(catalog)

    async def go() -> int:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await read(cat, collection, limit=limit, follow=follow or not from_beginning,
                       from_beginning=from_beginning, out=sys.stdout.buffer, stopping=stopping)
        except BrokenPipeError:  # `| head`: the reader is gone, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 0

    raise typer.Exit(run_command(go))
