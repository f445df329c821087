"""Logs: every line names its task, JSON lines on request, and secrets never appear."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from pipeline.telemetry.logs import Redactor, current_task, setup_logging

SECRET = "tok-3f9c1e7a55d2"
PASSWORD = "hunter2-long"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave the root logger as the test found it (setup_logging configures the whole process)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    monkeypatch.setenv("SOPHIA_API_TOKEN", SECRET)
    stream = io.StringIO()
    setup_logging("json", "INFO", stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


async def test_json_lines_name_the_task_of_adapter_library_and_main_lines(logged: io.StringIO) -> None:
    adapter = logging.LoggerAdapter(logging.getLogger("localflow.capture"), {"task": "sophia/metrics"})
    adapter.info("scraped %d samples", 12)

    async def library_line_inside_a_task() -> None:
        current_task.set("sophia/postgres")
        logging.getLogger("aiokafka.consumer").warning("heartbeat failed")

    await asyncio.create_task(library_line_inside_a_task())
    logging.getLogger("localflow.run").info("started")

    out = lines(logged)
    assert [(line["task"], line["message"]) for line in out] == [
        ("sophia/metrics", "scraped 12 samples"),
        ("sophia/postgres", "heartbeat failed"),
        ("main", "started"),
    ]
    assert {"time", "level", "logger"} <= set(out[0])


def test_tokens_passwords_and_dsn_credentials_are_redacted_in_messages_and_tracebacks(logged: io.StringIO) -> None:
    log = logging.getLogger("localflow.test")
    log.warning("calling the API with token %s", SECRET)
    log.warning("connecting to postgresql://sophia:%s@db:5432/sophia", PASSWORD)
    log.warning("libpq says host=db password=%s user=sophia", PASSWORD)
    log.warning("sent Authorization: Bearer %s", "eyJhbGciOi.abc.def")
    try:
        raise ConnectionError(f"redis://:{PASSWORD}@cache:6379/0 refused")
    except ConnectionError:
        log.exception("redis failed")

    text = logged.getvalue()
    for secret in (SECRET, PASSWORD, "eyJhbGciOi.abc.def"):
        assert secret not in text
    out = lines(logged)
    assert out[0]["message"] == "calling the API with token ***"
    assert out[1]["message"] == "connecting to postgresql://sophia:***@db:5432/sophia"
    assert out[2]["message"] == "libpq says host=db password=*** user=sophia"
    assert out[3]["message"] == "sent Authorization: Bearer ***"
    assert "redis://:***@cache:6379/0 refused" in out[4]["error"]


def test_secret_environment_values_are_redacted_by_variable_name() -> None:
    redact = Redactor({"ESTUARY_REFRESH_TOKEN": "refresh-abcdef", "POSTGRES_PASSWORD": "pgpass-123",
                       "AWS_SECRET_ACCESS_KEY": "aws/secret+key", "MY_SECRET": "s3cr3t-value",
                       "REDIS_HOST": "cache-host-1", "AWS_ACCESS_KEY_ID": "test"})
    text = redact("refresh-abcdef pgpass-123 aws/secret+key s3cr3t-value cache-host-1 test")
    assert text == "*** *** *** *** cache-host-1 test", "host names stay; values too short to be secrets stay"


def test_text_lines_on_a_pipe_name_their_task() -> None:
    stream = io.StringIO()
    setup_logging("text", "INFO", stream=stream)
    logging.LoggerAdapter(logging.getLogger("localflow.materialization"), {"task": "sophia/redis"}).info("ok")
    line = stream.getvalue().strip()
    assert line.endswith("INFO  [sophia/redis] ok"), line
