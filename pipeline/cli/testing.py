"""`localflow test`: run the catalog's tests on a broker (pipeline/runtime/scenarios.py)."""

from __future__ import annotations

import os
from enum import StrEnum
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
    run_command,
    setup,
)


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
    log_format: LogFormat = QUIET_LOG_FORMAT,
    log_level: str = QUIET_LOG_LEVEL,
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
    from pipeline.embedded.services import Kafka, ServiceError
    from pipeline.runtime.catalog import KafkaConfig
    from pipeline.runtime.scenarios import report_lines, run_tests

    setup(log_format, log_level, quiet_clients=True)
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
        code = run_command(go)
    finally:
        if embedded is not None:
            embedded.stop()
    raise typer.Exit(code)
