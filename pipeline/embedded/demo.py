"""`localflow demo`: a catalog end to end on embedded services and simulated sources, shown live.

Why: the fastest way to see the whole flow work (and to notice when it does not). The command
starts the embedded servers of `pipeline.embedded.services` (or uses those KAFKA_BOOTSTRAP_SERVERS,
POSTGRES_URL, REDIS_URL and S3_ENDPOINT_URL name), starts the simulated Sophia sources of
`pipeline.embedded.demo_sources`, points the catalog's environment variables at both, runs every task
of the catalog in this process, and shows documents per collection and what each
materialization wrote, as a user would count it (rows, keys, objects). It ends after
`--duration` or on Ctrl-C / SIGTERM: tasks flush and stop first, then the sources, then the
servers it started. External servers are never cleaned: the demo only adds to them.

It leaves you somewhere: it prints the ``export KAFKA_BOOTSTRAP_SERVERS=... POSTGRES_URL=...``
lines that point another shell's `localflow preview`, `status` and `psql` at its servers, serves
``/metrics`` and ``/status`` while the tasks run (registered, so `localflow status` finds it), and
on a terminal keeps its servers up after the run until Enter (``--keep-services`` anywhere, until
Ctrl-C / SIGTERM). The live view fits 80x24: a row per collection with what each
materialization made of it, a row per task with its lag in documents.

Exit code 0 when every binding of every materialization grew during the run; 1 (naming the
binding) when one did not, so a broken demo is visible in CI; 2 for an invalid catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline.embedded.services import ServiceError, Services
from pipeline.runtime.catalog import Catalog
from pipeline.sdk.config import parse_duration
from pipeline.telemetry import metrics

if TYPE_CHECKING:
    from pipeline.embedded.demo_sources import DemoSources
    from pipeline.telemetry.server import Telemetry

STOP_TIMEOUT_S = 60.0
FIRST_INPUT_GRACE_S = 120.0
"""After --duration, how long the demo waits for a materialization that has read nothing yet (a
consumer group join can take tens of seconds on a loaded machine): a demo should show every endpoint."""
"""How long tasks get to flush and stop (the S3 archive may upload its open batches)."""
PROBE_TIMEOUT_S = 5.0
RATE_WINDOW = 10
"""Snapshots (about one a second) that rates in the live view are computed over."""
PLAIN_EVERY_S = 5.0
"""Without a terminal, a progress line this often."""
DEFAULT_MASK_KEY = "localflow-demo-mask-key"
DEMO_ROTATE_BYTES = 8 * 1024
"""Small, so agent log files rotate (by rename) within a minute and the files capture shows it copes."""

log = logging.getLogger("localflow.demo")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# What the materializations wrote, counted at the endpoints
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One binding's output as a user would count it: a table, a key pattern, an object prefix."""

    materialization: str
    connector: str
    label: str
    count: Callable[[], Awaitable[int | None]]
    """Current count; None when there is nothing to count yet (e.g. the table does not exist)."""
    collection: str = ""
    """The collection the binding reads (a row of the live view)."""
    unit: str = "docs"
    close: Callable[[], Awaitable[None]] | None = None
    query: str | None = None
    """A command line that shows what the binding wrote (from the connector's ``describe``)."""


class Endpoints:
    """Counts rows, keys and objects the catalog's materializations wrote (never writes anything).

    Each connector says how (its ``describe``: postgres counts rows, redis keys, s3 objects); a
    binding of a connector that does not is counted by the documents its task applied.
    """

    def __init__(self, catalog: Catalog, services: Services) -> None:
        self.services = services
        self.targets: list[Target] = []
        self._failed: set[str] = set()
        for name, spec in catalog.materializations.items():
            for binding in spec.bindings:
                target = self._target(name, spec.connector, spec.config, binding)
                target.collection = binding.source
                self.targets.append(target)

    def _target(self, name: str, connector: str, config: Any, binding: Any) -> Target:
        from pipeline.runtime.registry import load_connector

        describe = load_connector(connector).describe
        described = describe(config, binding.parsed, binding.source) if describe is not None else None
        if described is None:
            return Target(name, connector, f"{binding.source} (documents applied)", lambda: _applied(name))
        return Target(name, connector, described.label, described.count, unit=described.unit, close=described.close,
                      query=described.query)

    async def counts(self) -> dict[tuple[str, str], int | None]:
        """Every target's count (None where it cannot be counted now); one at a time, as they share connections."""
        return {(t.materialization, t.label): await self._safe(t) for t in self.targets}

    async def _safe(self, target: Target) -> int | None:
        try:
            return await asyncio.wait_for(target.count(), PROBE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a count we cannot take is shown as unknown, never fatal
            if target.label not in self._failed:
                self._failed.add(target.label)
                log.info("cannot count %s yet: %s: %s", target.label, type(e).__name__, e)
            await self.close()  # a connection cut mid-request is unusable: reconnect on the next count
            return None

    async def close(self) -> None:
        for target in self.targets:
            if target.close is not None:
                with contextlib.suppress(Exception):
                    await target.close()


def unfed(catalog: Catalog) -> list[str]:
    """Materializations with a binding that has not read a single document in this run."""
    read = {(labels.get("task"), labels.get("collection")) for labels, value in _samples(metrics.DOCS_IN) if value > 0}
    return [name for name, m in catalog.materializations.items()
            if any((name, b.source) not in read for b in m.bindings)]


async def _applied(task: str) -> int:
    from pipeline.runtime.task import STATUS

    status = STATUS.get(task)
    return status.documents if status else 0


# --------------------------------------------------------------------------------------------
# The live view
# --------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Everything the view shows at one moment."""

    at: float
    documents: dict[str, float] = field(default_factory=dict)
    """Documents written into each collection by this run (captures and derivations)."""
    dead: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[tuple[str, str], int | None] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)


def _samples(metric: Any) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each series of a counter or gauge of `pipeline.telemetry.metrics`."""
    out = []
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out.append((sample.labels, sample.value))
    return out


def take_snapshot(catalog: Catalog, endpoints: dict[tuple[str, str], int | None],
                  sources: dict[str, int]) -> Snapshot:
    from pipeline.runtime.task import STATUS

    writers = set(catalog.captures) | set(catalog.derivations)
    snap = Snapshot(time.monotonic(), endpoints=endpoints, sources=sources)
    for collection in catalog.collections:
        snap.documents[collection] = 0
    for labels, value in _samples(metrics.DOCS_OUT):
        if labels.get("task") in writers and labels.get("collection") in snap.documents:
            snap.documents[labels["collection"]] += value
    for labels, value in _samples(metrics.DEAD_LETTERS):
        snap.dead[labels["collection"]] = snap.dead.get(labels["collection"], 0) + value
    lag: dict[str, float] = {}
    for labels, value in _samples(metrics.CONSUMER_LAG):
        lag[labels["task"]] = lag.get(labels["task"], 0) + value
    for name in catalog.task_names():
        status = STATUS.get(name)
        snap.tasks[name] = {
            "state": ("running" if status.running else "restarting" if status.last_error else "stopped")
            if status else "starting",
            "documents": status.documents if status else 0,
            "restarts": status.restarts if status else 0,
            "error": status.last_error if status else None,
            "lag": f"{lag[name]:,.0f}" if name in lag else "",  # documents behind; captures read no collection
        }
    return snap


def _rate(now: Snapshot, before: Snapshot, value: Callable[[Snapshot], float]) -> str:
    if now.at - before.at < 0.5:
        return ""
    return f"{max(0.0, value(now) - value(before)) / (now.at - before.at):.1f}/s"


"""What a materialization's count is, by connector (else documents applied)."""
MAX_ERROR_LINES = 3


def _namespace(names: list[str]) -> str:
    """The ``prefix/`` every name shares (``sophia/``), which the view shows once, in its title."""
    heads = {n.split("/", 1)[0] for n in names}
    return f"{heads.pop()}/" if len(heads) == 1 and all("/" in n for n in names) else ""


def render(catalog: Catalog, snap: Snapshot, before: Snapshot, title: str, targets: list[Target] | None = None,
           width: int = 80) -> Group:
    """The live view, within 80 columns and 24 lines for the Sophia catalog: one row per collection
    with what each materialization wrote from it (rows, keys, objects), one row per task, the sources."""
    ns = _namespace(list(catalog.collections) + catalog.task_names())

    def short(name: str) -> str:
        return name.removeprefix(ns)

    units = {t.materialization: t.unit for t in targets or []}
    where = {(t.materialization, t.label): t.collection for t in targets or []}
    grid = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    grid.add_column("collection", overflow="ellipsis", no_wrap=True, max_width=28)
    for col in ("documents", "rate", "dead"):
        grid.add_column(col, justify="right", no_wrap=True)
    for mat, unit in units.items():
        grid.add_column(f"{short(mat)}\n{unit}", justify="right", no_wrap=True, overflow="ellipsis", max_width=12)
    written: dict[tuple[str, str], int | None] = {}
    for (mat, label), n in snap.endpoints.items():
        key = (where.get((mat, label), ""), mat)
        written[key] = None if n is None and written.get(key) is None else (written.get(key) or 0) + (n or 0)
    for name, n in snap.documents.items():
        cells = [written.get((name, mat), "") for mat in units]
        grid.add_row(escape(short(name)), f"{n:,.0f}", _rate(snap, before, lambda s, c=name: s.documents.get(c, 0)),
                     f"{snap.dead.get(name, 0):,.0f}", *("-" if c is None else f"{c:,}" if c != "" else "" for c in cells))
    tasks = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    tasks.add_column("task", overflow="ellipsis", no_wrap=True, max_width=28)
    for col in ("state", "documents", "rate", "lag (docs)", "restarts"):
        tasks.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
    errors = []
    for name, t in snap.tasks.items():
        style = {"running": "green", "restarting": "red"}.get(t["state"], "yellow")
        tasks.add_row(escape(short(name)), f"[{style}]{t['state']}[/]", f"{t['documents']:,}",
                      _rate(snap, before, lambda s, n=name: s.tasks[n]["documents"]), t["lag"],
                      str(t["restarts"] or ""))
        if t["error"] and len(errors) < MAX_ERROR_LINES:
            text = f"{short(name)}: {' '.join(t['error'].split())}"
            errors.append(Text(text if len(text) <= width else text[:width - 1] + "…", style="red"))
    src = snap.sources
    sources = (f"sources: API {src.get('api_records', 0):,} records, {src.get('api_requests', 0)} requests "
               f"({src.get('api_unauthorized', 0)} refused) · logs {src.get('log_lines', 0):,} lines, "
               f"{src.get('log_rotations', 0)} rotations")
    return Group(Text(title, style="bold", overflow="ellipsis", no_wrap=True), grid, "", tasks, *errors,
                 Text(sources, overflow="ellipsis", no_wrap=True))


def plain_line(snap: Snapshot, elapsed: float) -> str:
    """One progress line for logs and CI (no terminal)."""
    docs = " ".join(f"{name.rsplit('/', 1)[-1]}={n:.0f}" for name, n in snap.documents.items())
    wrote: dict[str, list[str]] = {}
    for (mat, label), n in snap.endpoints.items():
        short = label.rstrip("/*:").rsplit("/", 1)[-1]  # estuary.t, sophia:processed, <collection>
        wrote.setdefault(mat, []).append(f"{short}={'-' if n is None else n}")
    ends = " ".join(f"{mat}[{' '.join(parts)}]" for mat, parts in wrote.items())
    failing = [n for n, t in snap.tasks.items() if t["state"] == "restarting"]
    return (f"[{elapsed:5.0f}s] documents: {docs} | wrote: {ends}"
            + (f" | restarting: {', '.join(failing)}" if failing else ""))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class DemoOptions:
    catalog: Path
    duration: float
    interval: float
    rate: float
    log_dir: Path | None
    verbose: bool
    keep_services: bool = False
    metrics_port: int | None = 0


def demo_env(services: Services, sources: DemoSources, token: str) -> dict[str, str]:
    """The variables the Sophia catalog reads, pointed at the demo's services and sources."""
    env = services.env()
    pg, rd = urlsplit(services.postgres.url), urlsplit(services.redis.url)
    env |= {
        "POSTGRES_DB": pg.path.lstrip("/") or "postgres",
        "REDIS_PASSWORD": unquote(rd.password or ""),
        "S3_CREATE_BUCKET": "true",
        "SOPHIA_API_URL": sources.api_url,
        "SOPHIA_API_TOKEN": token,
        "SOPHIA_METRICS_URL": sources.metrics_url,
        "SOPHIA_AGENT_LOG_DIR": str(sources.log_dir),
        "LOCALFLOW_MASK_KEY": os.environ.get("LOCALFLOW_MASK_KEY") or DEFAULT_MASK_KEY,
    }
    return env


async def run_demo(opts: DemoOptions, services: Services) -> int:
    """Sources up, tasks running until the duration or a signal, then everything down; the exit code."""
    from pipeline.embedded.demo_sources import DemoSources
    from pipeline.runtime.catalog import load_catalog
    from pipeline.runtime.task import kind_of, run_tasks
    from pipeline.sdk.errors import ConfigError
    from pipeline.telemetry.logs import setup_logging
    from pipeline.telemetry.server import Telemetry

    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    own_log_dir = opts.log_dir is None
    log_dir = (opts.log_dir or Path(tempfile.mkdtemp(prefix="localflow-demo-agents-"))).resolve()
    token = os.environ.get("SOPHIA_API_TOKEN") or secrets.token_urlsafe(16)
    sources = DemoSources(log_dir=log_dir, token=token, rate=opts.rate, rotate_bytes=DEMO_ROTATE_BYTES)
    endpoints: Endpoints | None = None
    telemetry: Telemetry | None = None
    tty = console.is_terminal
    try:
        await sources.start()
        os.environ.update(demo_env(services, sources, token))
        try:
            catalog = load_catalog(opts.catalog)
        except ConfigError as e:
            err_console.print(f"[bold red]error:[/] catalog {escape(str(opts.catalog))} is not valid:", highlight=False)
            for place, message in e.problems:
                err_console.print(f"  {place}: {message}" if place else f"  {message}", markup=False)
            return 2
        if opts.interval > 0:
            for capture in catalog.captures.values():
                capture.interval = min(capture.interval, opts.interval)
        if opts.metrics_port is not None:
            telemetry = Telemetry({n: kind_of(catalog, n) for n in catalog.task_names()}, kafka=catalog.kafka)
            try:
                await telemetry.start("127.0.0.1", opts.metrics_port)
            except OSError as e:
                err_console.print(f"[bold red]error:[/] cannot serve metrics on 127.0.0.1:{opts.metrics_port}: "
                                  f"{escape(e.strerror or str(e))}", highlight=False)
                return 2
        print_exports(services, opts.catalog, catalog, telemetry)
        endpoints = Endpoints(catalog, services)
        baseline = await endpoints.counts()
        first = take_snapshot(catalog, baseline, sources.stats())
        stopping = asyncio.Event()
        started = time.monotonic()
        title = f"localflow demo: {opts.catalog}"
        live = Live(console=console, refresh_per_second=4, transient=True) if tty else None
        with live or contextlib.nullcontext():
            # Logging set up inside Live (on its stderr proxy) so log lines print above the view.
            setup_logging("text", "INFO" if opts.verbose else "WARNING", stream=sys.stderr)
            runner = asyncio.create_task(run_tasks(catalog, None, stopping), name="localflow-demo-tasks")
            window: deque[Snapshot] = deque([first], maxlen=RATE_WINDOW)  # rates over the last ~10 s
            last_plain = last_wait = -PLAIN_EVERY_S
            while True:
                elapsed = time.monotonic() - started
                if stop.is_set() or runner.done():
                    break
                if opts.duration and elapsed >= opts.duration:
                    waiting = unfed(catalog)
                    if not waiting or elapsed >= opts.duration + FIRST_INPUT_GRACE_S:
                        break
                    if elapsed - last_wait >= PLAIN_EVERY_S:
                        last_wait = elapsed
                        message = (f"{opts.duration:.0f}s are up, but {', '.join(waiting)} has read nothing yet "
                                   f"(a slow group join): waiting up to {FIRST_INPUT_GRACE_S:.0f}s more")
                        (live.console if live is not None else console).print(message, highlight=False)
                snap = take_snapshot(catalog, await endpoints.counts(), sources.stats())
                if live is not None:
                    left = f", {opts.duration - elapsed:.0f}s left" if opts.duration else ""
                    live.update(render(catalog, snap, window[0], f"{title}: {elapsed:.0f}s{left} (Ctrl-C stops)",
                                       endpoints.targets))
                elif elapsed - last_plain >= PLAIN_EVERY_S:
                    print(plain_line(snap, elapsed), flush=True)
                    last_plain = elapsed
                window.append(snap)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            stopping.set()
            if live is not None:
                live.update(f"[bold]{escape(title)}:[/] stopping: tasks flush and commit (Ctrl-C again to abandon)")
            else:
                print("stopping: tasks flush and commit", flush=True)
            await _finish(runner, force)
        final = await endpoints.counts()
        snap = take_snapshot(catalog, final, sources.stats())
        console.print(render(catalog, snap, first, f"{title}: ran {time.monotonic() - started:.0f}s "
                                                   "(rates are averages)", endpoints.targets))
        _print_how_to_query(services, endpoints, opts.keep_services)
        return _verdict(catalog, baseline, final, snap)
    finally:
        if telemetry is not None:
            await telemetry.stop()
        if endpoints is not None:
            await endpoints.close()
        await sources.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if own_log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)


async def _finish(runner: asyncio.Task[None], force: asyncio.Event) -> None:
    """Wait for the tasks to flush and stop; abandon them after STOP_TIMEOUT_S or a second signal."""
    forced = asyncio.create_task(force.wait())
    try:
        done, _ = await asyncio.wait({runner, forced}, timeout=STOP_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        forced.cancel()
    if runner not in done:
        err_console.print("[yellow]warning:[/] tasks did not stop in time; abandoning them (open batches "
                          "are re-read from their checkpoints on the next run)")
        runner.cancel()
    try:
        await runner
    except asyncio.CancelledError:
        pass
    except Exception:  # noqa: BLE001 - reported; the verdict then names what was not written
        log.exception("the tasks ended with an error")


def _verdict(catalog: Catalog, baseline: dict[tuple[str, str], int | None],
             final: dict[tuple[str, str], int | None], snap: Snapshot) -> int:
    """0 when every binding of every materialization grew; else 1, saying which did not and why."""
    problems = []
    for (mat, label), n in final.items():
        before = baseline.get((mat, label)) or 0
        if (n or 0) <= before:
            task = snap.tasks.get(mat, {})
            why = f" (last error: {task['error']})" if task.get("error") else ""
            problems.append(f"{mat} wrote nothing to {label}: {before} before, {n or 0} after{why}")
    if not catalog.materializations:
        problems.append("the catalog has no materialization: nothing to show")
    for line in problems:
        err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False)
    if problems:
        err_console.print("The demo did not work end to end. Run it again with --verbose to see each task's log.")
        return 1
    console.print("[bold green]ok:[/] every materialization wrote documents.")
    return 0


def export_lines(services: Services) -> list[str]:
    """``export`` lines that point a shell (preview, status, psql...) at the demo's embedded servers.

    External servers are left out: the shell that started the demo already names them.
    """
    env = services.env()
    groups = {"kafka": ["KAFKA_BOOTSTRAP_SERVERS"], "postgres": ["POSTGRES_URL"], "redis": ["REDIS_URL"],
              "s3": ["S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"]}
    return ["export " + " ".join(f"{k}={shlex.quote(env[k])}" for k in groups[s.name])
            for s in services if not s.external]


def print_exports(services: Services, path: Path, catalog: Catalog, telemetry: Telemetry | None) -> None:
    """Where the demo's servers and metrics are, as lines to paste in another shell."""
    lines = export_lines(services)
    if telemetry is not None:
        console.print(f"metrics on {telemetry.url}/metrics (and /status: `localflow status` finds this demo)",
                      highlight=False, markup=False, soft_wrap=True)
    if not lines:
        return
    first = next(iter(catalog.collections), "COLLECTION")
    console.print("To use its servers from another shell:", highlight=False)
    for line in lines:
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    uses = [f"localflow status {path}", f"localflow preview {first} --catalog {path} --from-beginning -n 5"]
    if not services.postgres.external:
        uses.append('psql "$POSTGRES_URL"')
    console.print("then: " + " · ".join(uses), highlight=False, markup=False, soft_wrap=True)


def _print_how_to_query(services: Services, endpoints: Endpoints, kept: bool) -> None:
    """Command lines that read what the run wrote, as each connector's ``describe`` says (the first
    binding of each materialization; real hosts and ports, never a password)."""
    first: dict[str, str] = {}
    for t in endpoints.targets:
        if t.query:
            first.setdefault(t.materialization, t.query)
    lines = list(first.items())
    if not lines:
        return
    width = max(len(name) for name, _ in lines) + 2
    console.print("\n[bold]Query what it wrote:[/]")
    for name, line in lines:
        console.print(f"  {name + ':':{width}}{line}", markup=False, highlight=False, soft_wrap=True)
    embedded = [s.name for s in services if not s.external]
    if embedded and not kept:
        console.print(f"  (the embedded {', '.join(embedded)} stop when the demo ends: add --keep-services to "
                      "query them, or point the demo at your own servers with KAFKA_BOOTSTRAP_SERVERS, "
                      "POSTGRES_URL, REDIS_URL, S3_ENDPOINT_URL)", highlight=False)
    elif embedded:
        console.print("\n[bold]Its servers stay up:[/]", highlight=False)
        for line in export_lines(services):
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _duration(value: str) -> float:
    """Seconds from `60`, `90s`, `5m` (a bare number is seconds)."""
    try:
        return parse_duration(float(value) if value.replace(".", "", 1).isdigit() else value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


class _Terminated(Exception):
    """SIGTERM outside the event loop: unwinds so the servers we started are stopped."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def demo_command(
    catalog: Path = typer.Argument(Path("examples/sophia/flow.yaml"), help="The catalog to run (flow.yaml).",
                                   dir_okay=False),
    duration: str = typer.Option("60s", "--duration", "-d", help="How long to run: 60, 90s, 5m; 0 runs until "
                                 "Ctrl-C."),
    interval: str = typer.Option("5s", help="Poll and scrape every capture at least this often, so the view "
                                 "moves (the Sophia API is polled every 5m in the catalog); 0 keeps the "
                                 "catalog's intervals."),
    rate: float = typer.Option(5.0, min=0.1, help="Records per second the simulated Sophia API creates."),
    log_dir: Path | None = typer.Option(None, file_okay=False, help="Where the simulated agents write their "
                                        "logs (default: a temporary directory, removed at the end)."),
    keep_services: bool | None = typer.Option(
        None, "--keep-services/--no-keep-services",
        help="After the run, keep the embedded servers up (until Enter on a terminal, else until Ctrl-C or "
             "SIGTERM), so `localflow preview`, `status` and the printed psql / redis-cli / aws commands work "
             "against them. Default: on a terminal, keep them."),
    metrics_port: int = typer.Option(
        0, "--metrics-port", min=0, max=65535, help="Serve /metrics and /status on this port of 127.0.0.1 while the tasks run "
                                  "(0: any free port, printed)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the tasks' INFO logs, not only warnings."),
) -> None:
    """Run a catalog end to end on embedded services and simulated sources, with a live view.

    Starts Kafka (Tansu), PostgreSQL, Redis and an S3 server on 127.0.0.1, or uses those named by
    KAFKA_BOOTSTRAP_SERVERS, POSTGRES_URL, REDIS_URL and S3_ENDPOINT_URL (never deleting
    anything there); starts a simulated Sophia AI API, agent log writer and /metrics endpoint;
    points SOPHIA_API_URL, SOPHIA_API_TOKEN, SOPHIA_METRICS_URL, SOPHIA_AGENT_LOG_DIR,
    POSTGRES_*, REDIS_*, S3_* and AWS_* at them; and runs every task of the catalog in this
    process. Prints the `export ...` lines that point another shell (localflow preview, status,
    psql) at its servers and serves /metrics. Shows documents per collection, rows, keys and
    objects written, lag (documents) and rates, within 80x24; ends after --duration or Ctrl-C /
    SIGTERM (tasks flush first), then prints how to query the results. On a terminal the
    servers then stay up until Enter. Exits 1, naming it, if a materialization wrote nothing.

    Example: localflow demo examples/sophia/flow.yaml --duration 2m
    """
    interactive = sys.stdin.isatty() and console.is_terminal
    keep = interactive if keep_services is None else keep_services
    opts = DemoOptions(catalog, _duration(duration), _duration(interval), rate, log_dir, verbose, keep, metrics_port)
    if not catalog.is_file():
        err_console.print(f"[bold red]error:[/] catalog {escape(str(catalog))} not found (run from the repository root, or "
                          "pass the path of a flow.yaml)")
        raise typer.Exit(2)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    services = Services.from_env()
    code = 1
    try:
        names = ", ".join(f"{s.name} ({'external' if s.external else 'embedded'})" for s in services)
        with console.status(f"starting services: {names}"):
            services.start()
        console.print("services: " + ", ".join(s.label for s in services), highlight=False)
        _warn_mixed(services)
        code = asyncio.run(run_demo(opts, services))
        signal.signal(signal.SIGTERM, _raise_terminated)  # the event loop reset it on exit
        if keep and code != 2 and any(not s.external for s in services):
            with contextlib.suppress(KeyboardInterrupt, _Terminated, EOFError):
                if interactive:
                    input("Press Enter to stop them. ")
                else:
                    console.print("Ctrl-C or SIGTERM stops them.", highlight=False)
                    signal.pause()
    except ServiceError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
    except (KeyboardInterrupt, _Terminated):
        err_console.print("interrupted")
        code = 130
    finally:
        with console.status("stopping the embedded services"):
            services.stop()
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


def _warn_mixed(services: Services) -> None:
    """External endpoints hold offsets of the broker they were fed from; a fresh broker restarts at 0."""
    if not services.kafka.external and any(s.external for s in (services.postgres, services.redis, services.s3)):
        err_console.print("[yellow]warning:[/] Kafka is embedded (empty) but other endpoints are external: "
                          "offsets they stored from an earlier broker may make them skip this run's first "
                          "documents. Set KAFKA_BOOTSTRAP_SERVERS too, or use fresh endpoints.")


def demo_sources_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 in a container)."),
    api_port: int = typer.Option(8700, min=0, max=65535, help="Port of the Sophia API (GET /v1/records)."),
    metrics_port: int = typer.Option(8701, min=0, max=65535, help="Port of the Prometheus endpoint (/metrics)."),
    log_dir: Path = typer.Option(Path("/var/log/sophia/agents"), envvar="SOPHIA_AGENT_LOG_DIR", file_okay=False,
                                 help="Directory the simulated agents write their logs to."),
    token: str = typer.Option("demo-token", envvar="SOPHIA_API_TOKEN", help="Bearer token the API requires."),
    rate: float = typer.Option(5.0, min=0.1, help="API records created per second."),
    log_rate: float = typer.Option(5.0, min=0.1, help="Agent log lines written per second."),
    rotate_bytes: int = typer.Option(64 * 1024, min=1024, help="Rotate a log file (rename to .1) at this size."),
    seed: int | None = typer.Option(None, help="Seed of the generators, for reproducible records."),
) -> None:
    """Serve the simulated Sophia sources until Ctrl-C / SIGTERM (what `localflow demo` runs inside).

    A Sophia AI API with records of every data.type (GET /v1/records, bearer token, pages with a
    `next` link, a Link header and a `next_cursor`, `since=<timestamp>` for new records only),
    agent logs (JSON lines and plain text, rotated by rename) and a Prometheus /metrics.
    docker-compose.yml runs it as the `demo-sources` service.

    Example: localflow demo-sources --log-dir /tmp/agents --api-port 8700 --metrics-port 8701
    """
    from pipeline.embedded.demo_sources import DemoSources

    sources = DemoSources(log_dir=log_dir, token=token, host=host, api_port=api_port, metrics_port=metrics_port,
                          rate=rate, log_rate=log_rate, rotate_bytes=rotate_bytes, seed=seed)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await sources.start()
        try:
            console.print(f"Sophia API  {sources.api_url}  (Authorization: Bearer <SOPHIA_API_TOKEN>)\n"
                          f"metrics     {sources.metrics_url}\nagent logs  {log_dir}/*.log, *.jsonl\n"
                          "Ctrl-C stops.", highlight=False)
            await stop.wait()
        finally:
            await sources.stop()

    try:
        asyncio.run(serve())
    except OSError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
