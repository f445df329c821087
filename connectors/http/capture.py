"""The `http` capture: poll a JSON API every interval, follow its pages, keep an incremental cursor.

Each page is one ``Captured``: its documents and the state after it, so a crash re-sends at
most one page, with the same keys. Checkpoint state, version 1::

    {"version": 1, "bindings": {"<target>|<path>": {
        "cursor": <largest incremental value captured, when configured>,
        "pending": {"next": {"url": ...} | {"cursor": ...}, "max": <largest value so far>}}}}

``pending`` is a page chain under way: a restart resumes at its next page, and ``cursor``
takes ``max`` only once the chain ends. A page the API refuses (4xx) abandons the chain: the
next poll starts again from ``cursor``. So does a next page that comes back unreadable (not
JSON, no records array) ``advanced.unreadable_attempts`` times in a row: each time it is a dead
letter, and ``pending.unreadable`` counts them, so that one broken page cannot hold the binding.

Failures never stop the task: a request is retried (connection errors, timeouts, 5xx, 429
honouring Retry-After) with exponential backoff and jitter; what still fails, and any other
4xx, is logged with the URL and status, counted in ``localflow_errors`` (kind ``auth`` for
401/403, else ``source``), and the poll ends until the next interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from connectors.http.config import HttpConfig, HttpResource, binding_key
from pipeline.sdk import httpclient
from pipeline.sdk.capture import Captured
from pipeline.sdk.connector import Check
from pipeline.sdk.errors import CheckpointError, ConfigError, describe
from pipeline.sdk.pointers import MISSING, pointer_tokens, resolve
from pipeline.telemetry import metrics

if TYPE_CHECKING:
    from pipeline.runtime.catalog import CaptureBinding

STATE_VERSION = 1


class PollFailed(Exception):
    """A request failed for good in this poll; ``kind`` labels localflow_errors."""

    def __init__(self, message: str, kind: str = "source", refused: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.refused = refused
        """The API answered a 4xx other than 429: repeating the same request will not help."""


class Unreadable(ValueError):
    """A page or record that cannot become documents; it becomes a dead letter."""


class HttpCapture(httpclient.PollingCapture):
    """Polls each binding's resource in turn, every ``interval``."""

    config: HttpConfig

    def new_client(self) -> httpx.AsyncClient:
        return _client(self.config)

    async def run(self, state: dict[str, Any] | None) -> AsyncIterator[Captured]:
        states = _load_state(state, self.ctx.name)
        while True:
            started = time.monotonic()
            for index, binding in enumerate(self.spec.bindings):
                async for item in self._poll(index, binding, states):
                    yield item
                if self.ctx.stopping.is_set():
                    return
            if not await self.ctx.sleep(max(0.0, self.spec.interval - (time.monotonic() - started))):
                return

    async def _poll(self, index: int, binding: CaptureBinding,
                    states: dict[str, dict[str, Any]]) -> AsyncIterator[Captured]:
        """One poll of one binding: a chain of at most ``max_pages`` pages."""
        res: HttpResource = binding.parsed
        key = binding_key(binding.target, res)
        saved = states.get(key, {})
        committed = saved.get("cursor", res.incremental.initial if res.incremental else None)
        pending = saved.get("pending")
        page: dict[str, Any] = pending["next"] if pending else {}
        newest = pending.get("max", committed) if pending else committed
        base = _base_url(self.config, res, committed)
        shaper = Shaper(res, res.source or self.ctx.name)
        for _ in range(self.config.advanced.max_pages):
            url = _page_url(base, page, res)
            try:
                fetched = await self._fetch(url, res)
            except PollFailed as e:
                self._failed(e)
                if e.refused and page:
                    self.ctx.log.warning("abandoning the page chain of %s; the next poll starts again "
                                         "from the cursor", key)
                    states[key] = _drop_none({"cursor": committed})
                return
            if fetched is None:  # stopping
                return
            response, body = fetched
            try:
                records, nxt = _parse_page(response, body, res)
            except Unreadable as e:
                self.ctx.log.error("%s", e)
                yield Captured(dead=[(index, str(e), body)], source_bytes=len(body),
                               state=self._unreadable(key, states, committed) if page else None)
                return
            now = _rfc3339(datetime.now(UTC))
            meta_url = str(response.url.copy_with(query=None))
            docs: list[tuple[int, dict[str, Any]]] = []
            dead: list[tuple[int, str, bytes]] = []
            for record in records:
                try:
                    docs.append((index, shaper.document(record, meta_url, now)))
                except Unreadable as e:
                    dead.append((index, f"{url}: {e}", orjson.dumps(record)))
                    continue
                value = shaper.cursor(record)
                if value is not None and _newer(value, newest):
                    newest = value
            if nxt == page:
                self.ctx.log.warning("%s links to itself as its next page; ending the chain", url)
                nxt = None
            if not records:
                nxt = None
            if nxt:
                states[key] = _drop_none({"cursor": committed, "pending": _drop_none({"next": nxt, "max": newest})})
            else:
                states[key] = _drop_none({"cursor": newest})
            yield Captured(documents=docs, dead=dead, source_bytes=len(body),
                           state={"version": STATE_VERSION, "bindings": dict(states)})
            if not nxt or self.ctx.stopping.is_set():
                return
            page = nxt
        self.ctx.log.warning("the page chain of %s is longer than advanced.max_pages=%d; it goes on at the "
                             "next poll", key, self.config.advanced.max_pages)

    async def _fetch(self, url: httpx.URL, res: HttpResource) -> tuple[httpx.Response, bytes] | None:
        """The response and body of one request, after retries; None when stopping.

        Raises PollFailed when retries are exhausted or the API refuses the request (4xx).
        """
        adv = self.config.advanced
        method = self.config.method
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                async with asyncio.timeout(self.config.timeout):
                    response, body = await _send(self.client, method, url, res.body, adv.max_body_bytes)
            except (httpx.TransportError, TimeoutError) as e:
                why = describe(e)
            else:
                status = response.status_code
                if status < 400:
                    return response, body
                if status != 429 and status < 500:
                    snippet = body[:200].decode("utf-8", "replace")
                    raise PollFailed(f"{method} {url} answered HTTP {status} {response.reason_phrase}: {snippet}",
                                     kind="auth" if status in (401, 403) else "source", refused=True)
                why = f"HTTP {status} {response.reason_phrase}"
                retry_after = _retry_after(response.headers.get("retry-after"))
            if attempt >= adv.max_retries:
                raise PollFailed(f"{method} {url} failed {attempt + 1} times (last: {why}); giving up until "
                                 f"the next poll")
            delay = retry_after if retry_after is not None else _backoff(adv.initial_backoff, attempt)
            delay = min(delay, adv.max_backoff)
            attempt += 1
            self.ctx.log.warning("%s %s: %s; retry %d/%d in %.1fs", method, url, why, attempt, adv.max_retries, delay)
            if not await self.ctx.sleep(delay):
                return None

    def _unreadable(self, key: str, states: dict[str, dict[str, Any]], committed: Any) -> dict[str, Any]:
        """The state after the chain's next page came back unreadable once more: counted in
        ``pending``, or, at ``advanced.unreadable_attempts``, the chain abandoned."""
        pending = states.get(key, {}).get("pending") or {}
        attempts = int(pending.get("unreadable", 0)) + 1
        limit = self.config.advanced.unreadable_attempts
        if attempts >= limit:
            self._failed(PollFailed(f"{key}: the next page of the chain was unreadable {attempts} times "
                                    f"(advanced.unreadable_attempts={limit}); abandoning the chain, the next "
                                    f"poll starts again from the cursor"))
            states[key] = _drop_none({"cursor": committed})
        else:
            states[key] = {**states[key], "pending": {**pending, "unreadable": attempts}}
        return {"version": STATE_VERSION, "bindings": dict(states)}

    def _failed(self, e: PollFailed) -> None:
        self.ctx.log.error("%s", e)
        metrics.ERRORS.labels(self.ctx.name, e.kind).inc()
        self.ctx.status.last_error, self.ctx.status.last_error_at = str(e), time.time()


def _client(config: HttpConfig) -> httpx.AsyncClient:
    return httpclient.client({"Accept": "application/json", **config.headers}, config.bearer(), config.timeout,
                             config.advanced.verify_tls)


async def _send(client: httpx.AsyncClient, method: str, url: httpx.URL, body: dict[str, Any] | None,
                limit: int) -> tuple[httpx.Response, bytes]:
    """Send one request and read its body, refusing one larger than ``limit`` bytes."""
    request = client.build_request(method, url, json=body if method == "POST" else None)
    response = await client.send(request, stream=True)
    try:
        return response, await httpclient.read_limited(response, limit, "advanced.max_body_bytes")
    except httpclient.BodyTooLarge as e:
        raise PollFailed(f"{e}; ask the API for smaller pages (a page-size parameter) or raise the limit") from e
    finally:
        await response.aclose()


def _load_state(state: dict[str, Any] | None, task: str) -> dict[str, dict[str, Any]]:
    if not state:
        return {}
    if state.get("version") != STATE_VERSION or not isinstance(state.get("bindings"), dict):
        raise CheckpointError(f"checkpoint of http capture {task!r} is not version {STATE_VERSION} "
                              f"({str(state)[:200]}); delete it deliberately to start over")
    return dict(state["bindings"])


def _base_url(config: HttpConfig, res: HttpResource, cursor: Any) -> httpx.URL:
    url = httpx.URL(config.url)
    if res.path:
        url = url.copy_with(path=url.path.rstrip("/") + "/" + res.path.lstrip("/"))
    params: dict[str, Any] = dict(res.params)
    if res.incremental is not None and cursor is not None:
        params[res.incremental.param] = _param(looked_back(cursor, res.incremental.lookback))
    return url.copy_merge_params(params) if params else url


def looked_back(cursor: Any, lookback: float | None) -> Any:
    """The cursor to send: ``lookback`` below the stored one (seconds for a date-time, an amount
    for a number), written as the API wrote it (same zone notation); other values as they are."""
    if not lookback:
        return cursor
    if _number(cursor):
        back = cursor - lookback
        return int(back) if isinstance(cursor, int) and float(lookback).is_integer() else back
    if isinstance(cursor, str):
        try:
            moment = datetime.fromisoformat(cursor)
        except ValueError:
            raise ConfigError(f"incremental.lookback needs a numeric or ISO 8601 date-time cursor, and the cursor "
                              f"is {cursor[:100]!r}; remove lookback or point `field` at such a value") from None
        text = (moment - timedelta(seconds=lookback)).isoformat()
        return text.replace("+00:00", "Z") if cursor.endswith(("Z", "z")) else text
    return cursor


def _page_url(base: httpx.URL, page: dict[str, Any], res: HttpResource) -> httpx.URL:
    if "url" in page:
        return httpx.URL(page["url"])
    if "cursor" in page and res.pagination is not None and res.pagination.type == "cursor":
        return base.copy_merge_params({res.pagination.param: _param(page["cursor"])})
    return base


def _parse_page(response: httpx.Response, body: bytes, res: HttpResource) -> tuple[list[Any], dict[str, Any] | None]:
    """The page's records and its next page (None at the end); Unreadable says why not."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Unreadable(f"{response.request.method} {response.url}: the response body is not JSON ({e})") from e
    records = resolve(doc, pointer_tokens(res.records))
    if not isinstance(records, list):
        raise Unreadable(f"{response.request.method} {response.url}: no array of records at "
                         f"{res.records or 'the top'} of the response (check the binding's `records` pointer)")
    nxt: dict[str, Any] | None = None
    p = res.pagination
    if p is not None and p.type == "next_link":
        link = resolve(doc, pointer_tokens(p.pointer))
        if isinstance(link, str) and link:
            nxt = {"url": str(response.url.join(link))}
    elif p is not None and p.type == "link_header":
        link = response.links.get("next", {}).get("url")
        if link:
            nxt = {"url": str(response.url.join(link))}
    elif p is not None and p.type == "cursor":
        cursor = resolve(doc, pointer_tokens(p.pointer))
        if cursor not in (MISSING, None, ""):
            nxt = {"cursor": cursor}
    return records, nxt


class Shaper:
    """Turns one binding's records into raw documents (its pointers parsed once, not per record)."""

    def __init__(self, res: HttpResource, source: str) -> None:
        self.source = source
        self.id = pointer_tokens(res.id) if res.id is not None else None
        self.id_pointer = res.id
        self.timestamp = pointer_tokens(res.timestamp) if res.timestamp is not None else None
        self.incremental = pointer_tokens(res.incremental.field) if res.incremental is not None else None

    def document(self, record: Any, url: str, now: str) -> dict[str, Any]:
        """The raw document of ``record``; Unreadable when it cannot be one."""
        if not isinstance(record, dict):
            raise Unreadable(f"a record is not a JSON object: {orjson.dumps(record)[:100].decode()}")
        if self.id is not None:
            value = resolve(record, self.id)
            if value is MISSING or value is None or value == "":
                raise Unreadable(f"a record has no id at {self.id_pointer}")
            ident = value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        else:
            ident = hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()
        stamp = _timestamp(resolve(record, self.timestamp)) if self.timestamp is not None else None
        return {"timestamp": stamp or now, "source": self.source, "data": record,
                "metadata": {"id": ident, "url": url}}

    def cursor(self, record: dict[str, Any]) -> Any:
        """The record's incremental cursor value, or None."""
        if self.incremental is None:
            return None
        value = resolve(record, self.incremental)
        return None if value is MISSING else value


def _timestamp(value: Any) -> str | None:
    """RFC 3339 UTC of an ISO 8601 string (no zone = UTC) or epoch seconds; None if neither."""
    try:
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return _rfc3339(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return _rfc3339(datetime.fromtimestamp(value, UTC))
    except (ValueError, OverflowError, OSError):
        pass
    return None


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _newer(value: Any, than: Any) -> bool:
    """Whether an incremental cursor value is past ``than`` (numbers as numbers, else as strings)."""
    if than is None:
        return True
    if _number(value) and _number(than):
        return value > than
    return str(value) > str(than)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _param(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _backoff(initial: float, attempt: int) -> float:
    delay = initial * 2 ** min(attempt, 30)
    return random.uniform(delay / 2, delay)


async def doctor(config: HttpConfig) -> list[Check]:
    """Is the API reachable, and does it accept the token? (The token itself is never shown.)"""
    checks = [Check("http token", bool(config.bearer()),
                    "set" if config.bearer() else "not set: requests go without Authorization", required=False)]
    name = f"http {config.url}"
    try:
        async with _client(config) as client:
            response = await client.request(config.method, config.url)
    except httpx.HTTPError as e:
        return [*checks, Check(name, False, f"unreachable: {describe(e)}")]
    status = response.status_code
    if status in (401, 403):
        return [*checks, Check(name, False, f"HTTP {status}: the API refuses the token (set SOPHIA_API_TOKEN)")]
    return [*checks, Check(name, status < 500, f"{config.method} answered HTTP {status}")]
