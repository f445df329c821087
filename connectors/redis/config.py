"""Configuration of the `redis` materialization: the endpoint, each binding, and catalog checks.

Example (the Sophia catalog)::

    endpoint:
      redis:
        host: ${REDIS_HOST:-127.0.0.1}
        password: ${REDIS_PASSWORD:-}
        url: ${REDIS_URL:-}          # wins over host/port when set
    bindings:
      - source: sophia/sophia_processed_data
        resource: {key: "sophia:processed:{/id}", value: hash, stream: "sophia:processed:stream"}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from pipeline.sdk.config import Duration, Model
from pipeline.sdk.pointers import pointer_tokens
from pipeline.sdk.retry import Retry

if TYPE_CHECKING:
    from pipeline.sdk.connector import Catalog, Problems, TaskSpec

# ---------------------------------------------------------------------------- key templates

Template = list[str | list[str]]
"""A parsed key template: literal text, and JSON pointers as their RFC 6901 tokens."""


def parse_template(text: str) -> Template:
    """Parse ``sophia:processed:{/id}``: ``{/json/pointer}`` placeholders, ``{{``/``}}`` literal braces.

    Raises ValueError saying where the template is malformed.
    """
    parts: Template = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "{}" and text[i + 1:i + 2] == ch:
            literal.append(ch)
            i += 2
        elif ch == "{":
            end = text.find("}", i)
            pointer = text[i + 1:end] if end >= 0 else ""
            if end < 0 or not pointer.startswith("/") or pointer == "/" or "{" in pointer:
                raise ValueError(f"key template {text!r}: at character {i + 1}, expected a placeholder "
                                 "like {/id} (a JSON pointer in braces; write {{ for a literal brace)")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(pointer_tokens(pointer))
            i = end + 1
        elif ch == "}":
            raise ValueError(f"key template {text!r}: unmatched '}}' at character {i + 1} (write }}}} for a literal)")
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    if not any(isinstance(p, list) for p in parts):
        raise ValueError(f"key template {text!r} has no placeholder: every document would overwrite one key "
                         "(add e.g. {/id})")
    return parts


def default_template(collection: str, key: list[str]) -> str:
    """``<collection>:<key values joined by ':'>``, e.g. ``sophia/sophia_raw_data:{/metadata/id}``."""
    escaped = collection.replace("{", "{{").replace("}", "}}")
    return escaped + ":" + ":".join("{" + p + "}" for p in key)


# ---------------------------------------------------------------------------- models


class RedisAdvanced(Model):
    """Rarely changed settings."""

    chunk_size: int = Field(default=500, ge=1, le=10_000, description=(
        "Documents per atomic server-side script call. Larger is faster; smaller keeps each call "
        "short, so readers of the cache never wait long behind a batch."))
    overlap: bool = Field(default=True, description=(
        "Build the next batch's script calls while Redis runs the last ones: apply sends a batch and "
        "returns once the one before it is applied, reporting that one (the next call reports the "
        "last). Calls still reach Redis in order, each atomic with its checkpoint; off: each batch "
        "is applied before apply returns."))
    state_prefix: str = Field(default="localflow:", min_length=1, description=(
        "Prefix of localflow's own keys: <prefix>checkpoint:<task>, <prefix>fence:<task> (hashes "
        "per partition) and <prefix>pos:<key> (the Kafka position each key came from)."))
    connect_timeout: Duration = Field(default=5.0, gt=0, description="Timeout to open a connection.")
    socket_timeout: Duration = Field(default=30.0, gt=0, description="Timeout of one reply (a batch call).")
    retry: Retry = Field(
        default_factory=lambda: Retry(initial_backoff=0.1, max_backoff=5.0, give_up_after=300.0), description=(
            "Retries of a batch while Redis is unreachable (default here: from 100ms up to 5s, for 300s); then "
            "the task fails and is restarted by its supervisor (nothing is lost either way)."))


class RedisConfig(Model):
    """Where the Redis server is. Standalone Redis (or a primary): not Redis Cluster."""

    url: SecretStr | None = Field(default=None, description=(
        "redis:// or rediss:// URL, e.g. ${REDIS_URL:-}. When set it wins over host, port and TLS, "
        "and over db and password when it names them. A secret: it may hold the password."))
    host: str = Field(default="127.0.0.1", description="Server host, e.g. ${REDIS_HOST:-127.0.0.1}.")
    port: int = Field(default=6379, ge=1, le=65535, description="Server port.")
    db: int = Field(default=0, ge=0, description="Database number (the Sophia cache uses 0).")
    username: str | None = Field(default=None, description="ACL user name (Redis 6+); none for the default user.")
    password: SecretStr | None = Field(default=None, description="Secret, from ${REDIS_PASSWORD:-} only.")
    tls: bool = Field(default=False, description="Connect with TLS (rediss).")
    advanced: RedisAdvanced = Field(default_factory=RedisAdvanced, description="Rarely changed settings.")

    @field_validator("url", "password", "username", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and urlsplit(v.get_secret_value()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("url must start with redis://, rediss:// or unix:// (the value is not shown: "
                             "it may hold a password)")
        return v

    def where(self) -> str:
        """The server for messages and logs, never with its password."""
        if self.url is None:
            return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"
        parts = urlsplit(self.url.get_secret_value())
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        path = parts.path if parts.path not in ("", "/") else f"/{self.db}"
        return f"{parts.scheme}://{host}{port}{path}"

    def secrets(self) -> list[str]:
        """Secret strings to scrub from any error text before it is shown."""
        out = [s.get_secret_value() for s in (self.url, self.password) if s is not None]
        if self.url is not None:
            out.append(urlsplit(self.url.get_secret_value()).password or "")
        return [s for s in out if s]


class RedisBinding(Model):
    """How one collection is kept in Redis: a key per document key, and optionally a stream."""

    key: str | None = Field(default=None, description=(
        "Key template with JSON pointers in braces, e.g. 'sophia:processed:{/id}'. Default: "
        "'<collection>:<key values joined by :>'. Let it name the whole collection key: documents "
        "of different keys that land on one Redis key overwrite each other in arrival order."))
    value: Literal["json", "hash"] = Field(default="json", description=(
        "json: the document as a JSON string (GET); hash: one field per top-level property, "
        "objects and arrays as JSON strings (HGETALL)."))
    ttl: Duration | None = Field(default=None, gt=0, description="Expire keys this long after their last update.")
    stream: str | None = Field(default=None, min_length=1, description=(
        "Stream key that receives one entry (fields `key`, `doc`) per applied document: a live feed."))
    stream_maxlen: int = Field(default=100_000, ge=1, description="Approximate MAXLEN of the stream.")

    @field_validator("key")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            parse_template(v)
        return v


# ---------------------------------------------------------------------------- catalog checks


def check(catalog: Catalog, task: TaskSpec, place: str) -> Problems:
    """Template pointers must be able to exist in the collection's documents; keys must not clash."""
    problems: Problems = []
    seen: dict[str, int] = {}
    for i, binding in enumerate(task.bindings):
        resource: RedisBinding | None = binding.parsed
        if resource is None or binding.source not in catalog.collections:
            continue
        spec = catalog.collections[binding.source]
        template = resource.key or default_template(binding.source, spec.key)
        bplace = f"{place}.bindings[{i}].resource.key"
        if template in seen:
            problems.append((bplace, f"same key template as bindings[{seen[template]}]: both would write the "
                                     "same keys; give each binding its own prefix"))
        seen.setdefault(template, i)
        schema = catalog.schema(binding.source)
        for part in parse_template(template):
            if isinstance(part, list):
                why = _impossible(schema, part)
                if why:
                    problems.append((bplace, f"{template!r}: {why}"))
    return problems


def _impossible(schema: dict[str, Any], tokens: list[str]) -> str:
    """Why documents of ``schema`` can never have a value at ``tokens`` ('' when they can)."""
    node: Any = schema
    for depth, token in enumerate(tokens):
        pointer = "/" + "/".join(tokens[:depth + 1])
        if not isinstance(node, dict):
            return ""
        types = node.get("type")
        types = {types} if isinstance(types, str) else set(types or [])
        if types and not types & {"object", "array"}:
            return f"{pointer} looks inside a value of type {'/'.join(sorted(types))}, which has no properties"
        props = node.get("properties") or {}
        if token in props:
            node = props[token]
        elif node.get("additionalProperties") is False:
            return f"{pointer}: the schema declares no property {token!r} and allows no others"
        else:
            return ""  # an open object: documents may carry it
    return ""
