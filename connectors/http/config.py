"""Configuration of the `http` capture: one JSON API per task, one API resource per binding.

Example (the Sophia catalog)::

    sophia/sophia_ai_data:
      interval: 5m
      endpoint:
        http:
          url: ${SOPHIA_API_URL:-http://127.0.0.1:8700/v1/records}
          token: ${SOPHIA_API_TOKEN:-}
          timeout: 30s
      bindings:
        - target: sophia/sophia_raw_data
          resource:
            records: /records
            id: /id
            timestamp: /timestamp
            pagination: {type: next_link, pointer: /next}
            incremental: {field: /updated_at, param: since, lookback: 5m}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import httpx
from pydantic import AfterValidator, Field, SecretStr

from pipeline.sdk.config import Duration, Model

if TYPE_CHECKING:
    from pipeline.runtime.catalog import CaptureSpec, Catalog
    from pipeline.sdk.connector import Problems


def _pointer(value: str) -> str:
    if value and not value.startswith("/"):
        raise ValueError(f"{value!r} is not a JSON pointer (write e.g. /records, or '' for the whole body)")
    return value


Pointer = Annotated[str, AfterValidator(_pointer)]
"""An RFC 6901 JSON pointer; '' is the whole value."""


def check_url(value: str) -> str:
    """Accept absolute http(s) URLs without credentials (those belong in `token`, from the env)."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as e:
        raise ValueError(f"{value!r} is not a URL: {e}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value!r} is not an absolute http:// or https:// URL")
    if url.userinfo:
        raise ValueError("the URL carries credentials; put the token in `token` (from the environment) instead")
    return value


class HttpAdvanced(Model):
    """Rarely changed retry settings and the limits that keep a misbehaving API from hurting the worker."""

    max_retries: int = Field(
        default=5, ge=0, le=100,
        description="Retries of one request after connection errors, timeouts, 5xx and 429; "
                    "then the poll gives up (logged, counted) until the next interval.")
    initial_backoff: Duration = Field(default=1.0, description="First retry delay; doubles each retry, with jitter.")
    max_backoff: Duration = Field(default=300.0, description="Longest wait before a retry, Retry-After included.")
    max_pages: int = Field(
        default=100, ge=1,
        description="Pages fetched per poll and binding; a longer chain goes on at the next poll.")
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024,
        description="A larger (decoded) response body is refused, logged and counted, so a huge page "
                    "cannot exhaust the worker's memory.")
    verify_tls: bool = Field(default=True, description="Verify the API's TLS certificate.")
    unreadable_attempts: int = Field(
        default=3, ge=1, le=100,
        description="Times the next page of a chain may come back unreadable (not JSON, no records array), "
                    "each a dead letter, before the chain is abandoned like a refused page: the next poll "
                    "starts again from the cursor.")


class HttpConfig(Model):
    """Where the JSON API is and how to reach it (shared by every binding of the task)."""

    url: Annotated[str, AfterValidator(check_url)] = Field(
        description="Base URL; a binding's `path` is appended to it.",
        examples=["${SOPHIA_API_URL:-http://127.0.0.1:8700/v1/records}"])
    method: Literal["GET", "POST"] = Field(default="GET", description="HTTP method of every request.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers (no secrets here).")
    token: SecretStr | None = Field(
        default=None,
        description="Secret: bearer token sent as `Authorization: Bearer ...`; write ${SOPHIA_API_TOKEN} so it "
                    "comes from the environment. Empty means none. Never logged.")
    timeout: Duration = Field(default=30.0, gt=0, description="Limit of one whole request, body included.")
    advanced: HttpAdvanced = Field(default_factory=HttpAdvanced)

    def bearer(self) -> str:
        """The token, or '' when none is configured."""
        return self.token.get_secret_value() if self.token else ""


class NextLink(Model):
    """The body holds the next page's URL (absolute or relative) at `pointer`; null or absent ends the chain."""

    type: Literal["next_link"] = Field(description="Selects this kind of pagination.", examples=["next_link"])
    pointer: Pointer = Field(description="JSON pointer to the next page's URL in the response body.",
                             examples=["/next"])


class LinkHeader(Model):
    """The next page is the `Link` response header's rel="next" URL (RFC 8288), as GitHub-style APIs do."""

    type: Literal["link_header"] = Field(description="Selects this kind of pagination.", examples=["link_header"])


class CursorParam(Model):
    """The body holds an opaque page cursor at `pointer`; the next page repeats the request with `param`."""

    type: Literal["cursor"] = Field(description="Selects this kind of pagination.", examples=["cursor"])
    pointer: Pointer = Field(description="JSON pointer to the next page's cursor in the response body.",
                             examples=["/next_cursor"])
    param: str = Field(min_length=1, description="Query parameter that carries the cursor.", examples=["cursor"])


Pagination = Annotated[NextLink | LinkHeader | CursorParam, Field(discriminator="type")]


class Incremental(Model):
    """Ask only for what is new since the last poll.

    The largest value of `field` among captured records is kept in the checkpoint and sent as
    `param` on the first page of the next poll (next-link pages carry their own query). It
    moves only when a page chain ends, so an API that lists newest first loses nothing when
    the capture stops mid-chain. Numbers compare as numbers, anything else as strings: use
    ISO 8601 timestamps written in one zone and format, or ids that grow.

    Which field: one the API sets when it *stores or changes* a record (``updated_at``, a
    sequence number), never the event time a client reports (``timestamp``, ``created_at``
    from the device): a record stored late with an old event time sorts below the cursor and
    is never asked for again.

    Records that share the largest value but are stored after the poll: an API whose
    parameter means "after" (exclusive, the default) never returns them. Say ``inclusive:
    true`` when the parameter means "at or after" (the records at the cursor then come back on
    every poll, under the same keys: harmless), or set ``lookback`` to ask again for a margin
    below the cursor (re-read records keep their keys too).
    """

    field: Pointer = Field(description="JSON pointer into each record, e.g. /updated_at (not an event time).",
                           examples=["/updated_at"])
    param: str = Field(min_length=1, description="Query parameter that carries the cursor, e.g. since.",
                       examples=["since"])
    initial: str | int | float | None = Field(default=None, description="Cursor of the very first poll.")
    inclusive: bool = Field(
        default=False,
        description="The API's parameter means 'at or after' the value: the cursor (the largest value "
                    "captured) is sent as it is, and records that share it are asked for again. False: it "
                    "means 'after'; records stored later with the same value are missed unless `lookback` is set.")
    lookback: Duration | None = Field(
        default=None,
        description="Subtracted from the cursor before it is sent: seconds (5m, 1h) for a date-time cursor, "
                    "an amount for a numeric one. Covers records stored late under a value at or below the "
                    "cursor; the stored cursor itself never moves back.")


class HttpResource(Model):
    """What one binding reads from the API and how its records become documents.

    Each record becomes ``{"timestamp", "source", "data": <record>, "metadata": {"id", "url"}}``.
    ``metadata.id`` (the key) is the record's `id` when configured, else the SHA-256 of the
    record serialized canonically (sorted keys), so capturing a record again yields the same
    key. ``timestamp`` is the record's `timestamp` when it holds an ISO 8601 date-time (no zone
    means UTC) or epoch seconds; otherwise the capture time, which differs between re-captures
    of the same record (the key does not).
    """

    path: str = Field(default="", description="Appended to the endpoint's url (e.g. /events).")
    params: dict[str, str | int | float | bool] = Field(default_factory=dict, description="Query parameters.")
    body: dict[str, Any] | None = Field(default=None, description="JSON request body (method POST).")
    records: Pointer = Field(default="", description="JSON pointer to the array of records; '' = the body is one.")
    id: Pointer | None = Field(default=None, description="JSON pointer to each record's id (the document key).")
    timestamp: Pointer | None = Field(default=None, description="JSON pointer to each record's date-time.")
    pagination: Pagination | None = Field(default=None, description="How to reach the next page; a page without "
                                                                     "records also ends the chain.")
    incremental: Incremental | None = Field(default=None, description="Incremental cursor kept in the checkpoint.")
    source: str | None = Field(default=None, description="Each document's `source`; the capture's name if unset.")


def binding_key(target: str, resource: HttpResource) -> str:
    """Names a binding's state in the checkpoint (stable when bindings are reordered)."""
    return f"{target}|{resource.path}"


def check(catalog: Catalog, task: CaptureSpec, place: str) -> Problems:
    """Each binding must read a distinct (collection, path): their cursors are stored under it."""
    problems: Problems = []
    seen: set[str] = set()
    for i, binding in enumerate(task.bindings):
        if binding.parsed is None:
            continue
        key = binding_key(binding.target, binding.parsed)
        if key in seen:
            problems.append((f"{place}.bindings[{i}]", f"another binding already reads path "
                             f"{binding.parsed.path!r} into {binding.target}; give each a distinct path"))
        seen.add(key)
    return problems
