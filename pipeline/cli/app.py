"""The `localflow` application: the typer app, shared options and helpers. Each command is a module of
``pipeline.cli`` (``run.py``, ``validate.py``...), registered on ``app`` when ``pipeline.cli`` is imported."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from enum import StrEnum
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperOption

from pipeline.runtime.catalog import Catalog, Problem, load_catalog
from pipeline.sdk.errors import ConfigError, LocalflowError
from pipeline.telemetry.logs import describe, no_broker, setup_logging


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
        print_problems(path, e)
        raise typer.Exit(2) from None


def print_problems(path: Path, e: ConfigError) -> None:
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


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def log_options(default_level: str = "info") -> tuple[Any, Any]:
    return (typer.Option(LogFormat.text, "--log-format",
                         help="`text` (readable; rich on a terminal) or `json` (one object per line)."),
            typer.Option(default_level, "--log-level", help="debug, info, warning or error."))


RUN_LOG_FORMAT, RUN_LOG_LEVEL = log_options()
CONFIG_TOPIC = typer.Option(
    "localflow.config", "--config-topic", envvar="LOCALFLOW_CONFIG_TOPIC",
    help="The compacted Kafka topic holding tasks created through the API (one per deployment; '' for none).")
QUIET_LOG_FORMAT, QUIET_LOG_LEVEL = log_options("warning")


OUTPUT = typer.Option(Output.text, "--output", "-o", help="`text` (for people) or `json` (one object, for scripts).")


def setup(log_format: LogFormat, log_level: str, *, quiet_clients: bool = False) -> None:
    setup_logging(log_format.value, log_level, quiet_clients=quiet_clients)


def exit_now(sig: signal.Signals) -> None:
    """The second signal: exit at once, without flushing (the first one asked for that)."""
    logging.getLogger("localflow").warning("received %s again: exiting at once, without flushing", sig.name)
    sys.stderr.flush()
    os._exit(128 + sig)


def run_async(make: Callable[[], Awaitable[int]]) -> int:
    """Run a command's coroutine; its exit code, or 2 for a ConfigError and 1 for another error."""
    try:
        return asyncio.run(make())
    except LocalflowError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return 2 if isinstance(e, ConfigError) else 1


def run_command(make: Callable[[], Awaitable[int]]) -> int:
    """`run_async` for doctor, preview, status and test: the error in plain words, and where to
    find a broker when none answered."""
    from pipeline.cli.doctor import NO_BROKER_HINT

    try:
        return asyncio.run(make())
    except LocalflowError as e:
        err_console.print(f"[bold red]error:[/] {escape(describe(e))}", highlight=False)
        if no_broker(e) is not None:
            err_console.print(NO_BROKER_HINT, highlight=False, markup=False)
        return 2 if isinstance(e, ConfigError) else 1


def workers_of(given: list[str] | None) -> list[str] | None:
    """--worker, else LOCALFLOW_WORKERS, else None: the workers of the registry."""
    if given:
        return given
    return [w for w in re.split(r"[,\s]+", os.environ.get("LOCALFLOW_WORKERS", "")) if w] or None


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except ConfigError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)

