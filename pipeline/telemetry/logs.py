"""Logging: readable on a terminal, JSON lines for machines; every line names its task; no secrets.

Tasks log through ``ctx.log`` (a LoggerAdapter with ``extra={"task": name}``). Lines from
libraries (aiokafka, asyncpg...) are attributed to the task whose asyncio context emitted them
through ``current_task``, which the supervisor sets; anything else is ``main``.

Redaction runs on every handler, whatever the logger: values of environment variables whose
name contains TOKEN, PASSWORD, SECRET or KEY, the credentials of ``scheme://user:pass@host``
URLs, ``password=...`` style pairs and ``Bearer`` tokens are replaced by ``***``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal, TextIO

import orjson

from pipeline.sdk.errors import MASK, URL_CREDENTIALS

LogFormat = Literal["text", "json"]

current_task: ContextVar[str | None] = ContextVar("localflow_task", default=None)
"""The task whose coroutine is running (set by ``pipeline.runtime.task.supervise``)."""

MAIN = "main"
SECRET_ENV = re.compile(r"TOKEN|PASSWORD|SECRET|KEY")
MIN_SECRET_LENGTH = 6
"""Shorter values are not redacted: replacing every ``test`` or ``true`` would garble logs."""

_SECRET_NAMES = r"password|passwd|pwd|secret|token|access_token|refresh_token|api_key|apikey"
_PAIRS = re.compile(rf"(?i)\b(?P<k>{_SECRET_NAMES})=(?P<v>[^\s'\"&;,]+)")
_QUOTED_PAIRS = re.compile(rf"(?i)(?P<k>(?P<q>['\"])(?:{_SECRET_NAMES})(?P=q)\s*:\s*)(?P<vq>['\"])[^'\"]*(?P=vq)")
_BEARER = re.compile(r"(?i)\b(?P<k>bearer\s+)[A-Za-z0-9._~+/=\-]+")


class Redactor:
    """Replaces secrets in text; built from an environment snapshot (values are not re-read)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        values = {v for k, v in env.items() if SECRET_ENV.search(k.upper()) and len(v) >= MIN_SECRET_LENGTH}
        self._values = re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))) \
            if values else None

    def __call__(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub(MASK, text)
        if "://" in text:
            text = URL_CREDENTIALS.sub(rf"\g<scheme>\g<user>:{MASK}@", text)
        if "=" in text:
            text = _PAIRS.sub(rf"\g<k>={MASK}", text)
        if ":" in text:
            text = _QUOTED_PAIRS.sub(rf"\g<k>\g<vq>{MASK}\g<vq>", text)
        return _BEARER.sub(rf"\g<k>{MASK}", text)


_redactor = Redactor()


def redact(text: str) -> str:
    """``text`` with every known kind of secret replaced by ``***`` (for anything printed)."""
    return _redactor(text)


class _ContextFilter(logging.Filter):
    """Names the task of each record and redacts its message and traceback, in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "task", None):
            record.task = current_task.get() or MAIN
        if not getattr(record, "_localflow_redacted", False):
            record.msg = redact(record.getMessage())
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
            record._localflow_redacted = True
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, task, logger, message (and error, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "task": getattr(record, "task", MAIN),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            line["error"] = record.exc_text
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    """``2026-11-28T10:00:00.123Z INFO  [task] message`` for files and pipes."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s [%(task)s] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def setup_logging(fmt: LogFormat = "text", level: str | int = "INFO", stream: TextIO | None = None,
                  *, quiet_clients: bool = False) -> None:
    """Route every logger through one redacting handler on ``stream`` (stderr by default).

    Text on a terminal is rendered by rich; text to a pipe or file and JSON are one line each.
    Call again to switch format (e.g. in tests); the environment is re-read for secrets.
    ``quiet_clients``: the Kafka client logs nothing; for one-shot commands (doctor, preview,
    status, test) that report each failure once, in their own words (``describe``).
    """
    global _redactor
    _redactor = Redactor()
    stream = stream or sys.stderr
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    elif stream.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(file=stream), rich_tracebacks=False, markup=False,
                              show_path=False, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("[%(task)s] %(message)s"))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_localflow", False)]:
        root.removeHandler(old)
    handler._localflow = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # aiokafka reports every retried connection at WARNING/ERROR; the task's own error says enough.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL + 1 if quiet_clients else max(root.level, logging.WARNING))


_ADDRESS = re.compile(r"\('([^']*)', (\d+)")
"""``('127.0.0.1', 9092`` in aiokafka's "Unable to bootstrap from [('127.0.0.1', 9092, <AddressFamily...>)]"."""


def no_broker(error: BaseException) -> BaseException | None:
    """The Kafka client's "no broker answered" error in ``error``'s chain of causes, if any."""
    from aiokafka.errors import KafkaConnectionError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, KafkaConnectionError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def describe(error: BaseException) -> str:
    """One line a user reads for ``error``: what failed, where, without Python reprs.

    A Kafka client that found no broker becomes ``no Kafka broker answers at HOST:PORT`` (from
    whichever error of the chain is aiokafka's); other errors keep their message, redacted, or
    show their type's name when they have none.
    """
    unreachable = no_broker(error)
    if unreachable is not None:
        where = ", ".join(f"{h}:{p}" for h, p in _ADDRESS.findall(str(unreachable)))
        return f"no Kafka broker answers at {where}" if where else "no Kafka broker answers"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    text = redact(str(error).strip())
    return text or type(error).__name__
