"""One log line -> the `data` of a raw document, and the line's own timestamp when it has one.

A line that is a JSON object becomes `data` as it is. Any other line becomes
``{"message": <the line>}`` plus ``"level"`` when the line names one (``ERROR``, ``[warn]``,
``level=info``), normalized to lowercase syslog names (``warn`` -> ``warning``).
Invalid UTF-8 never fails a line: it is decoded with U+FFFD replacement characters, so the
line is kept (a dead letter would hide a whole line for one bad byte).
Timestamps without a zone are read as UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson

_JSON_TIME_FIELDS = ("timestamp", "@timestamp", "time", "ts")

_LEADING_TS = re.compile(
    rb"\s*[\[(]?(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s?(?:Z|z|[+-]\d{2}(?::?\d{2})?)?)")

_LEVEL = re.compile(
    r"\b(?:level|lvl|severity|loglevel)\s*[=:]\s*[\"']?(?P<kv>[A-Za-z]+)"
    r"|[\[<(](?P<br>[A-Za-z]+)[\]>)]"
    r"|\b(?P<word>TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|ERR|CRITICAL|CRIT|FATAL|PANIC|ALERT|EMERG)\b")

_LEVELS = {
    "trace": "trace", "debug": "debug", "info": "info", "notice": "notice",
    "warn": "warning", "warning": "warning", "error": "error", "err": "error",
    "critical": "critical", "crit": "critical", "fatal": "fatal", "panic": "panic",
    "alert": "alert", "emerg": "emergency", "emergency": "emergency",
}
_LEVEL_SCAN_CHARS = 200
"""Only the head of a line names its level; a word deep in the message does not."""


def parse_line(line: bytes) -> tuple[dict[str, Any], str | None]:
    """``(data, timestamp)`` of one line (no newline); timestamp is RFC 3339 UTC or None."""
    if line[:1] == b"{":
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is dict:
            value = obj.get("timestamp")  # the common line, without the calls of the general path
            if type(value) is str and value[-1:] == "Z":
                ts = _utc_z(value)
                if ts is not None:
                    return obj, ts
            return obj, _json_timestamp(obj)
    text = line.decode("utf-8", "replace")
    data: dict[str, Any] = {"message": text}
    level = _level(text)
    if level:
        data["level"] = level
    m = _LEADING_TS.match(line)
    return data, (rfc3339(m.group(1).decode("ascii")) if m else None)


def _level(text: str) -> str | None:
    for m in _LEVEL.finditer(text, 0, _LEVEL_SCAN_CHARS):
        level = _LEVELS.get((m.group("kv") or m.group("br") or m.group("word")).lower())
        if level:
            return level
    return None


def _json_timestamp(obj: dict[str, Any]) -> str | None:
    for name in _JSON_TIME_FIELDS:
        value = obj.get(name)
        if value is None:
            continue
        ts = rfc3339(value)
        if ts:
            return ts
    return None


_SECONDS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}", re.ASCII)
_VALID_SECONDS: dict[str, bool] = {}
"""Whether a ``YYYY-MM-DDTHH:MM:SS`` is a real time, for the lines of the last few thousand seconds."""


def _utc_z(value: str) -> str | None:
    """``rfc3339`` of a ``...Z`` timestamp (most JSON log lines) without parsing it per line: the
    date and time are checked once per second seen, and a value already in the form ``format_utc``
    writes is returned as it is. None when it is not ``YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z``."""
    if value[-1:] != "Z":
        return None
    seconds = value[:19]
    valid = _VALID_SECONDS.get(seconds)
    if valid is None:
        if len(_VALID_SECONDS) > 4096:
            _VALID_SECONDS.clear()
        valid = _SECONDS.fullmatch(seconds) is not None
        if valid:
            try:
                datetime.fromisoformat(seconds)
            except ValueError:
                valid = False
        _VALID_SECONDS[seconds] = valid
    if not valid:
        return None
    if len(value) == 20:  # the Z right after the seconds
        return value
    fraction = value[20:-1]
    if value[19] != "." or not 0 < len(fraction) <= 6 or not (fraction.isascii() and fraction.isdigit()):
        return None
    if not fraction.strip("0"):
        return seconds + "Z"
    return value if len(fraction) == 6 else f"{seconds}.{fraction.ljust(6, '0')}Z"


def rfc3339(value: Any) -> str | None:
    """An ISO 8601 string or a Unix time (s, ms, us or ns) as RFC 3339 UTC; None if neither."""
    if type(value) is str and value[-1:] == "Z":
        fast = _utc_z(value)
        if fast is not None:
            return fast
    try:
        if isinstance(value, str):
            dt = datetime.fromisoformat(value.strip())
            dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
            while abs(seconds) >= 1e11:  # milliseconds, microseconds or nanoseconds
                seconds /= 1000.0
            dt = datetime.fromtimestamp(seconds, UTC)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return format_utc(dt)


def format_utc(dt: datetime) -> str:
    """RFC 3339 with a ``Z`` zone, as every raw document carries it."""
    return dt.isoformat().replace("+00:00", "Z")
