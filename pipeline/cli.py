"""The `localflow` command line (typer). Every command's --help teaches with an example."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from enum import StrEnum
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperOption

from pipeline.catalog import Catalog, Problem, load_catalog, topic_of
from pipeline.errors import ConfigError, LocalflowError
from pipeline.logs import describe, no_broker, setup_logging

if TYPE_CHECKING:
    from pipeline.task import TaskKind

class _Command(TyperCommand):
    """Help in click's usual notation (``validate [OPTIONS] CATALOG``, ``--task TEXT``) instead of the
    Python types typer shows (``{catalog}``, ``<list[str]>``), which mean nothing to a user."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._verbatim = {p.name for p in self.params if p.metavar is not None}  # shown as written
        for p in self.params:
            if p.metavar is None and isinstance(p, TyperArgument):
                p.metavar = p.name.upper()
            elif p.metavar is None and isinstance(p, TyperOption) and not (p.is_flag or p.count):
                p.metavar = _metavar(p.display_type(None))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument) and not p.hidden:
                verbatim = p.required or p.name in self._verbatim
                pieces.append(p.metavar if verbatim else f"[{p.metavar}]")
        return pieces

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        args, opts = [], []
        for p in self.get_params(ctx):
            record = p.get_help_record(ctx)
            if record is None:
                continue
            if isinstance(p, TyperArgument):
                args.append((p.metavar, record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "int range": "INTEGER", "float": "NUMBER", "float range": "NUMBER",
               "file": "FILE", "path": "PATH", "directory": "DIRECTORY", "datetime": "DATETIME"}


def _metavar(display: str) -> str:
    """``<list[str]>`` -> ``TEXT``, ``<text|json>`` -> ``[text|json]``: what an option takes, in words."""
    label = display.strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]  # repeatable: the help says so
    if "|" in label:
        return f"[{label}]"
    return _TYPE_NAMES.get(label, re.sub(r"\W+", "_", label).upper())


class _App(typer.Typer):
    """Every command, including those registered from other modules, gets the readable help."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


def _version(value: bool) -> None:
    if value:
        print(f"localflow {package_version('localflow')}")
        raise typer.Exit(0)


app = _App(
    name="localflow",
    help="Self-hosted streaming pipeline: captures -> Kafka collections -> derivations -> materializations.\n\n"
         "Start with `localflow validate examples/sophia/flow.yaml`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: reflows docstring paragraphs to the terminal width
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Self-hosted streaming pipeline: captures -> Kafka collections -> derivations -> materializations."""


CATALOG_ARG = typer.Argument(..., help="The catalog file (flow.yaml).", exists=False, dir_okay=False)


def load_or_exit(path: Path) -> Catalog:
    """Load the catalog; on problems print each with its position and place, and exit 2."""
    try:
        return load_catalog(path)
    except ConfigError as e:
        _print_problems(path, e)
        raise typer.Exit(2) from None


def _print_problems(path: Path, e: ConfigError) -> None:
    count = f"{len(e.problems)} problem{'s' * (len(e.problems) != 1)}"
    err_console.print(f"[bold red]error:[/] catalog {escape(str(path))} is not valid ({count}):", highlight=False)
    for problem in e.problems:
        if isinstance(problem, Problem):
            line = str(problem)
        else:
            place, message = problem
            line = f"{place}: {message}" if place else message
        err_console.print(f"  {line}", highlight=False, markup=False)


class Output(StrEnum):
    text = "text"
    json = "json"


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
    import orjson

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


@app.command()
def schema(
    reference: bool = typer.Option(
        False, "--reference", help="Print the Markdown reference of every catalog and connector field instead."),
) -> None:
    """Print the catalog's JSON Schema (draft 2020-12), generated from the models `validate` uses.

    Point an editor at it for completion and inline errors in flow.yaml (the YAML language
    server reads `# yaml-language-server: $schema=flow.schema.json`). With --reference, print
    docs/reference.md: every field of the catalog and of each connector, with its type, default,
    description and example (the page `validate`'s messages point at).

    \b
    Example:
      localflow schema > flow.schema.json
      localflow schema --reference > docs/reference.md
    """
    import orjson

    from pipeline.reference import catalog_json_schema, reference_markdown

    if reference:
        sys.stdout.write(reference_markdown())
    else:
        sys.stdout.buffer.write(orjson.dumps(catalog_json_schema(), option=orjson.OPT_INDENT_2) + b"\n")


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def _log_options(default_level: str = "info") -> tuple[Any, Any]:
    return (typer.Option(LogFormat.text, "--log-format",
                         help="`text` (readable; rich on a terminal) or `json` (one object per line)."),
            typer.Option(default_level, "--log-level", help="debug, info, warning or error."))


_RUN_LOG_FORMAT, _RUN_LOG_LEVEL = _log_options()
_CONFIG_TOPIC = typer.Option(
    "localflow.config", "--config-topic", envvar="LOCALFLOW_CONFIG_TOPIC",
    help="The compacted Kafka topic holding tasks created through the API (one per deployment; '' for none).")
_QUIET_LOG_FORMAT, _QUIET_LOG_LEVEL = _log_options("warning")


class Output(StrEnum):
    text = "text"
    json = "json"


_OUTPUT = typer.Option(Output.text, "--output", "-o", help="`text` (for people) or `json` (one object, for scripts).")


def _setup(log_format: LogFormat, log_level: str, *, quiet_clients: bool = False) -> None:
    setup_logging(log_format.value, log_level, quiet_clients=quiet_clients)


def _exit_now(sig: signal.Signals) -> None:
    """The second signal: exit at once, without flushing (the first one asked for that)."""
    logging.getLogger("localflow").warning("received %s again: exiting at once, without flushing", sig.name)
    sys.stderr.flush()
    os._exit(128 + sig)


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
    cluster: str | None = typer.Option(
        None, "--cluster", envvar="LOCALFLOW_CLUSTER",
        help="Join this cluster: workers of one name share every task (captures by lease, the rest by partitions)."),
    config_topic: str = _CONFIG_TOPIC,
    log_format: LogFormat = _RUN_LOG_FORMAT,
    log_level: str = _RUN_LOG_LEVEL,
) -> None:
    """Run the catalog's tasks until SIGTERM or Ctrl-C: all of them, or those named by --task.

    A task that fails is restarted with backoff (its error logged and counted in
    localflow_errors_total); the others keep running. On SIGTERM or SIGINT every task stops
    reading, flushes its open batch and commits its checkpoint, and the process exits 0; a
    second signal exits at once. With --metrics-port the process serves Prometheus metrics,
    /healthz, /readyz and /status (read by `localflow status --worker`).

    With --api-port it serves the REST API (`pipeline.client.LocalflowClient` talks to it).
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
    from pipeline.task import kind_of

    _setup(log_format, log_level)
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
                            cluster=cluster))
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
               config_topic: str, cluster: str | None = None) -> int:
    from pipeline.control.api import ApiServer
    from pipeline.control.runner import Controller
    from pipeline.control.store import ConfigStore
    from pipeline.server import Telemetry
    from pipeline.task import TASK_PREFIX

    log = logging.getLogger("localflow.run")
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stopping.is_set():
            _exit_now(sig)
        log.info("received %s: stopping; tasks flush and commit (up to %gs; send it again to exit at once)",
                 sig.name, shutdown_timeout)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    store = ConfigStore(catalog.kafka, config_topic) if config_topic else None
    controller = Controller(catalog_path, catalog, stopping, store=store, selected=selected, watch=watch)
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
        from pipeline.cluster import join

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


@app.command()
def export(
    catalog: Path = CATALOG_ARG,
    config_topic: str = _CONFIG_TOPIC,
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

    _setup(LogFormat.text, "warning")
    cat = load_or_exit(catalog)

    async def go() -> int:
        store = ConfigStore(cat.kafka, config_topic)
        if config_topic:
            await store.load()
        sys.stdout.write(render(catalog, store.overlay()))
        for name in store.section("paused"):
            err_console.print(f"paused through the API: {name}", highlight=False, markup=False)
        return 0

    raise typer.Exit(_run_async(go))


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
    log_format: LogFormat = _QUIET_LOG_FORMAT,
    log_level: str = _QUIET_LOG_LEVEL,
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
    from pipeline import replay as rp

    _setup(log_format, log_level)
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

    raise typer.Exit(_run_async(go))


def _run_async(make: Callable[[], Awaitable[int]]) -> int:
    """Run a command's coroutine; its exit code, or 2 for a ConfigError and 1 for another error."""
    try:
        return asyncio.run(make())
    except LocalflowError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return 2 if isinstance(e, ConfigError) else 1


def _run_command(make: Callable[[], Awaitable[int]]) -> int:
    """`_run_async` for doctor, preview, status and test: the error in plain words, and where to
    find a broker when none answered."""
    from pipeline.doctor import NO_BROKER_HINT

    try:
        return asyncio.run(make())
    except LocalflowError as e:
        err_console.print(f"[bold red]error:[/] {escape(describe(e))}", highlight=False)
        if no_broker(e) is not None:
            err_console.print(NO_BROKER_HINT, highlight=False, markup=False)
        return 2 if isinstance(e, ConfigError) else 1


def _workers(given: list[str] | None) -> list[str] | None:
    """--worker, else LOCALFLOW_WORKERS, else None: the workers of the registry."""
    if given:
        return given
    return [w for w in re.split(r"[,\s]+", os.environ.get("LOCALFLOW_WORKERS", "")) if w] or None


@app.command()
def status(
    catalog: Path = CATALOG_ARG,
    worker: list[str] | None = typer.Option(
        None, "--worker", "-w",
        help="URL of a worker's metrics port (repeatable); default: LOCALFLOW_WORKERS (comma-separated), "
             "else every live worker of the registry in Kafka."),
    watch: bool = typer.Option(False, "--watch", help="Refresh in place until Ctrl-C."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes with --watch."),
    output: Output = _OUTPUT,
) -> None:
    """Show each task: running or not, documents per second, lag per partition, checkpoint age, last error.

    Lag (partition end minus the task's committed checkpoint, in documents) comes from the
    broker; running, documents per second and errors from the workers' /status (`localflow
    run --metrics-port`). Workers register themselves in Kafka (topic localflow.workers), so
    status finds every live worker of the cluster; --worker or LOCALFLOW_WORKERS name them
    instead. Exit 1 when the broker or a worker did not answer (what could be read is still
    shown).

    \b
    Example:
      localflow status examples/sophia/flow.yaml --watch
      localflow status examples/sophia/flow.yaml --output json
    """
    from pipeline import status as st

    _setup(LogFormat.text, "warning", quiet_clients=True)
    cat = load_or_exit(catalog)
    urls = _workers(worker)

    def show(report: st.StatusReport) -> None:
        if output == Output.json:
            print(orjson.dumps(report.as_json()).decode(), flush=True)
        else:
            console.print(st.render(report))

    async def once() -> int:
        report = await st.gather(cat, urls)
        show(report)
        return 1 if report.problems else 0

    async def live() -> int:
        from rich.live import Live

        if output == Output.json or not console.is_terminal:  # a pipe or a file: one snapshot after the other
            while True:
                show(await st.gather(cat, urls))
                await asyncio.sleep(interval)
        with Live(console=console, auto_refresh=False, screen=False) as view:
            while True:
                view.update(st.render(await st.gather(cat, urls)), refresh=True)
                await asyncio.sleep(interval)

    try:
        raise typer.Exit(_run_command(live if watch else once))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


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


@app.command()
def preview(
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
    from pipeline.preview import preview as read

    catalog, collection = _preview_arguments(catalog, collection, catalog_option)
    _setup(LogFormat.text, "warning", quiet_clients=True)
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

    raise typer.Exit(_run_command(go))


@app.command()
def doctor(
    catalog: Path = CATALOG_ARG,
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds each check may take."),
    output: Output = _OUTPUT,
) -> None:
    """Check that the catalog can run here: Kafka, every task's endpoint, and api.estuary.dev.

    One line per check: OK, FAIL (a required check failed), WARN (an optional one did) or
    SKIP, and why. Estuary (DNS, HTTPS, token expiry, refresh token present) is reported but
    never required: localflow is what runs while it is unreachable. Secrets are never
    printed. Exit 1 when a required check fails.

    \b
    Example:
      localflow doctor examples/sophia/flow.yaml
      localflow doctor examples/sophia/flow.yaml --output json
    """
    from pipeline import doctor as dr

    _setup(LogFormat.text, "error", quiet_clients=True)
    cat = load_or_exit(catalog)

    async def go() -> int:
        lines = await dr.diagnose(cat, timeout=timeout)
        if output == Output.json:
            print(orjson.dumps(dr.as_json(lines), option=orjson.OPT_INDENT_2).decode())
        else:
            print("\n".join(dr.render(lines)))
        return 1 if any(ln.blocking for ln in lines) else 0

    raise typer.Exit(_run_command(go))


class Broker(StrEnum):
    auto = "auto"
    embedded = "embedded"
    catalog = "catalog"


@app.command("test")
def test_catalog(
    catalog: Path = CATALOG_ARG,
    test: list[str] | None = typer.Option(None, "--test", help="Run only this test (repeatable). Default: all."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds a verify step waits for the expected documents."),
    keep_topics: bool = typer.Option(False, "--keep-topics", help="Keep the test's topics (to inspect them)."),
    broker: Broker = typer.Option(
        Broker.auto, "--broker",
        help="`catalog`: the catalog's broker; `embedded`: a broker of its own (Tansu, stopped afterwards); "
             "`auto`: the catalog's when KAFKA_BOOTSTRAP_SERVERS is set, else embedded."),
    log_format: LogFormat = _QUIET_LOG_FORMAT,
    log_level: str = _QUIET_LOG_LEVEL,
) -> None:
    """Run the catalog's `tests:` in topics of their own, on the catalog's broker or an embedded one.

    With no broker configured (KAFKA_BOOTSTRAP_SERVERS unset) the tests need no infrastructure:
    they run on an embedded broker started for them and stopped afterwards. Each test ingests
    documents and verifies what its derivations made, in a namespace of fresh topics
    (production topics and consumer groups are never touched; the topics are deleted
    afterwards). A verify step compares, per key, only the properties the expected document
    states. Each failing document is shown as a diff. Exit 1 when a test fails.

    \b
    Example:
      localflow test examples/sophia/flow.yaml
    """
    from pipeline.catalog import KafkaConfig
    from pipeline.catalog_test import report_lines, run_tests
    from pipeline.services import Kafka, ServiceError

    _setup(log_format, log_level, quiet_clients=True)
    cat = load_or_exit(catalog)
    unknown = [t for t in test or [] if t not in cat.tests]
    if unknown:
        err_console.print(f"[bold red]error:[/] no test {escape(', '.join(unknown))} in {catalog}; tests: "
                          f"{escape(', '.join(cat.tests)) or 'none'}", highlight=False)
        raise typer.Exit(2)
    if not cat.tests:
        console.print(f"{catalog} declares no tests", highlight=False)
        raise typer.Exit(0)
    embedded = Kafka() if broker == Broker.embedded or (
        broker == Broker.auto and not os.environ.get(Kafka.env_var)) else None
    if embedded is not None:
        why = "" if broker == Broker.embedded else f"no broker configured ({Kafka.env_var} is not set): "
        err_console.print(f"{why}testing on an embedded broker", highlight=False, markup=False)
        try:
            embedded.start()
        except ServiceError as e:
            err_console.print(f"[bold red]error:[/] cannot start the embedded broker: {escape(str(e))}\n"
                              f"Set {Kafka.env_var} to test on your broker, or install it: "
                              "pip install 'localflow[services]'", highlight=False)
            raise typer.Exit(1) from None
        cat = cat.model_copy(update={"kafka": KafkaConfig(bootstrap_servers=embedded.bootstrap_servers)})

    async def go() -> int:
        results = await run_tests(cat, test or None, timeout=timeout, keep_topics=keep_topics)
        for r in results:
            console.print("[green]PASS[/]" if r.passed else "[red]FAIL[/]", highlight=False, end=" ")
            console.print("\n".join(report_lines(r)), highlight=False, markup=False)
        failed = sum(not r.passed for r in results)
        console.print(f"{len(results) - failed} passed, {failed} failed", highlight=False)
        return 1 if failed else 0

    try:
        code = _run_command(go)
    finally:
        if embedded is not None:
            embedded.stop()
    raise typer.Exit(code)


from pipeline.demo import demo_command, demo_sources_command  # noqa: E402 - registered here, defined there

app.command("demo")(demo_command)
app.command("demo-sources")(demo_sources_command)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except ConfigError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
