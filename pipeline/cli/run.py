"""`localflow run`: run the catalog's tasks until SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from pipeline.runtime.catalog import Catalog
from pipeline.sdk.errors import ConfigError, LocalflowError

if TYPE_CHECKING:
    from pipeline.runtime.task import TaskKind
from pipeline.cli.app import (
    CATALOG_ARG,
    CONFIG_TOPIC,
    RUN_LOG_FORMAT,
    RUN_LOG_LEVEL,
    LogFormat,
    app,
    err_console,
    exit_now,
    load_or_exit,
    setup,
)


@app.command()
def run(
    catalog: Path = CATALOG_ARG,
    task: list[str] | None = typer.Option(
        None, "--task", "-t", help="Run only this task (repeat for several). Default: every task of the catalog."),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", envvar="LOCALFLOW_METRICS_PORT",
        help="Serve /metrics, /healthz, /readyz and /status on this port (0: any free port, logged)."),
    metrics_host: str = typer.Option(
        "127.0.0.1", "--metrics-host", help="Address the metrics port binds (0.0.0.0 in a container)."),
    shutdown_timeout: float = typer.Option(
        30.0, "--shutdown-timeout",
        help="Seconds tasks get to flush and commit after SIGTERM/SIGINT; then exit 1 naming those that did not stop."),
    api_port: int | None = typer.Option(
        None, "--api-port", envvar="LOCALFLOW_API_PORT",
        help="Serve the REST API (/v1/..., OpenAPI at /v1/openapi.json) on this port (0: any free port, logged)."),
    api_host: str = typer.Option(
        "127.0.0.1", "--api-host",
        help="Address the API binds; beyond loopback LOCALFLOW_API_TOKEN must be set (bearer token)."),
    watch: bool = typer.Option(
        False, "--watch", help="Apply edits of the catalog file without a restart (an invalid edit is refused)."),
    restart_failed: bool = typer.Option(
        False, "--restart-failed",
        help="Restart tasks with backoff even after errors a restart would not fix (configuration, checkpoint, "
             "implementation, offset gap), instead of leaving them FAILED."),
    cluster: str | None = typer.Option(
        None, "--cluster", envvar="LOCALFLOW_CLUSTER",
        help="Join this cluster: workers of one name share every task (captures by lease, the rest by partitions)."),
    config_topic: str = CONFIG_TOPIC,
    log_format: LogFormat = RUN_LOG_FORMAT,
    log_level: str = RUN_LOG_LEVEL,
) -> None:
    """Run the catalog's tasks until SIGTERM or Ctrl-C: all of them, or those named by --task.

    A task that fails is restarted with backoff (its error logged and counted in
    localflow_errors_total); the others keep running. After an error a restart would not fix
    (a configuration, checkpoint or implementation error, an offset gap) it stops FAILED, seen in
    `localflow status`, /readyz and localflow_task_failed, until it is restarted through the API,
    or the worker is: with --restart-failed such tasks are restarted with backoff too. On SIGTERM or SIGINT every task stops
    reading, flushes its open batch and commits its checkpoint, and the process exits 0; a
    second signal exits at once. With --metrics-port the process serves Prometheus metrics,
    /healthz, /readyz and /status (read by `localflow status --worker`).

    With --api-port it serves the REST API (`pipeline.control.client.LocalflowClient` talks to it).
    Tasks created, paused or removed through it are kept in the config topic, so they survive
    a restart and every worker applies them (one started with --task runs those it names).
    With --watch, edits of the catalog file start, stop or restart the tasks they touch.

    With --cluster NAME, any number of workers (machines, containers) started with the same
    name share the tasks through Kafka's group protocol: each capture runs on one worker at a
    time (it holds the capture's lease; another takes over within the session timeout when
    it dies), derivations and materializations spread their partitions over all of them.

    \b
    Example:
      localflow run examples/sophia/flow.yaml --task sophia/postgres --metrics-port 9100
      localflow run examples/sophia/flow.yaml --api-port 8730 --watch
      localflow run examples/sophia/flow.yaml --cluster sophia --metrics-port 9100
    """
    from pipeline.runtime.task import kind_of

    setup(log_format, log_level)
    if api_port is not None:
        from pipeline.control.api import TOKEN_ENV, is_loopback

        if not is_loopback(api_host) and not os.environ.get(TOKEN_ENV):
            err_console.print(f"[bold red]error:[/] --api-host {escape(api_host)} is beyond loopback: set {TOKEN_ENV} "
                              "(clients send it as `Authorization: Bearer ...`) or use --api-host 127.0.0.1",
                              highlight=False)
            raise typer.Exit(2)
    cat = load_or_exit(catalog)
    names = list(dict.fromkeys(task or cat.task_names()))
    if not names and api_port is None and not watch:  # with the API or --watch, tasks may come later
        err_console.print(f"[bold red]error:[/] catalog {catalog} declares no task to run", highlight=False)
        raise typer.Exit(2)
    try:
        known = cat if set(names) <= set(cat.task_names()) or not config_topic else _with_api_tasks(cat, config_topic)
        kinds = {n: kind_of(known, n) for n in names}
    except ConfigError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    gc.freeze()  # the catalog, schemas and imports live as long as the worker: keep them out of GC scans
    api = (api_host, api_port) if api_port is not None else None
    code = asyncio.run(_run(cat, kinds, metrics_host, metrics_port, shutdown_timeout,
                            catalog_path=catalog, selected=task, api=api, watch=watch, config_topic=config_topic,
                            restart_failed=restart_failed, cluster=cluster))
    raise typer.Exit(code)


def _with_api_tasks(cat: Catalog, config_topic: str) -> Catalog:
    """The catalog plus the tasks created through the API (for --task naming one of those)."""
    from pipeline.control.effective import build
    from pipeline.control.store import ConfigStore

    store = ConfigStore(cat.kafka, config_topic)
    try:
        asyncio.run(store.load())
    except LocalflowError as e:
        logging.getLogger("localflow.run").warning("cannot read the API's tasks: %s", e)
        return cat
    assert cat.path is not None
    return build(cat.path, store.overlay())


async def _run(catalog: Catalog, kinds: dict[str, TaskKind], host: str, port: int | None, shutdown_timeout: float,
               *, catalog_path: Path, selected: list[str] | None, api: tuple[str, int] | None, watch: bool,
               config_topic: str, restart_failed: bool = False, cluster: str | None = None) -> int:
    from pipeline.control.api import ApiServer
    from pipeline.control.runner import Controller
    from pipeline.control.store import ConfigStore
    from pipeline.runtime.task import TASK_PREFIX
    from pipeline.telemetry.server import Telemetry

    log = logging.getLogger("localflow.run")
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stopping.is_set():
            exit_now(sig)
        log.info("received %s: stopping; tasks flush and commit (up to %gs; send it again to exit at once)",
                 sig.name, shutdown_timeout)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    store = ConfigStore(catalog.kafka, config_topic) if config_topic else None
    controller = Controller(catalog_path, catalog, stopping, store=store, selected=selected, watch=watch,
                            restart_failed=restart_failed)
    controller.kinds.update(kinds)  # the same dict object: /status follows tasks added and removed
    telemetry = server = None
    await controller.open()  # the API answers from the config topic once it is read
    if api is not None:
        server = ApiServer(controller)
        try:
            await server.start(*api)
        except ConfigError as e:
            log.error("%s", e)
            return 2
        except OSError as e:
            log.error("cannot serve the API on %s:%s: %s", api[0], api[1], e.strerror or e)
            return 2
        log.info("API on %s (/v1/health, OpenAPI at /v1/openapi.json)%s", server.url,
                 "; every request must carry LOCALFLOW_API_TOKEN" if os.environ.get("LOCALFLOW_API_TOKEN") else "")
    if port is not None:
        telemetry = Telemetry(controller.kinds, kafka=catalog.kafka)  # registered in Kafka, for `localflow status`
        try:
            await telemetry.start(host, port)
        except OSError as e:
            log.error("cannot serve metrics on %s:%s: %s", host, port, e.strerror or e)
            if server is not None:
                await server.stop()
            return 2
        log.info("metrics, health and status on %s (/metrics /healthz /readyz /status)", telemetry.url)
    log.info("running %d task(s): %s", len(kinds), ", ".join(kinds))
    runner = asyncio.create_task(controller.run(), name="localflow-run")
    member = None
    if cluster:
        from pipeline.runtime.cluster import join

        member = join(cluster, catalog, controller, telemetry, stopping, runner)
    try:
        stop_wait = asyncio.create_task(stopping.wait())
        await asyncio.wait({runner, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not runner.done():
            await asyncio.wait({runner}, timeout=shutdown_timeout)
        if not runner.done():
            stuck = sorted(t.get_name().removeprefix(TASK_PREFIX) for t in asyncio.all_tasks()
                           if t.get_name().startswith(TASK_PREFIX) and not t.done())
            log.error("shutdown took longer than %gs: task(s) %s did not stop; exiting without their flush "
                      "(they resume from their last checkpoint)", shutdown_timeout, ", ".join(stuck) or "?")
            sys.stderr.flush()
            os._exit(1)
        runner.result()
        log.info("all tasks stopped; checkpoints committed")
        return 0
    finally:
        if member is not None:
            await member.stop()
        if telemetry is not None:
            await telemetry.stop()
        if server is not None:
            await server.stop()
