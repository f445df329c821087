"""What the demo's live view shows of a Redis binding: the keys its key template makes."""

from __future__ import annotations

import shlex
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline.sdk.connector import Described

from .config import RedisBinding, RedisConfig


def describe(config: RedisConfig, resource: RedisBinding, collection: str) -> Described:
    pattern = key_pattern(resource.key or collection + ":")
    stream = (resource.stream or "").encode()
    held: dict[str, Any] = {}

    async def count() -> int:
        from connectors.redis.materialization import client

        if "client" not in held:
            held["client"] = client(config)
        n = 0
        async for key in held["client"].scan_iter(match=pattern, count=1000):
            n += key != stream
        return n

    async def close() -> None:
        redis = held.pop("client", None)
        if redis is not None:
            await redis.aclose()

    return Described(pattern, "keys", count, close, query=_redis_cli(config, pattern))


def _redis_cli(config: RedisConfig, pattern: str) -> str:
    where = urlsplit(config.where())
    url = urlsplit(config.url.get_secret_value()) if config.url is not None else None
    user = config.username or (url.username if url is not None else None)
    db = where.path.lstrip("/") or str(config.db)
    args = ["redis-cli", "-h", where.hostname or "127.0.0.1", "-p", str(where.port or 6379), "-n", db,
            *(["--user", unquote(user)] if user else []), *(["--tls"] if where.scheme == "rediss" else [])]
    cmd = shlex.join([*args, "--scan", "--pattern", pattern])
    password = config.password is not None or (url is not None and url.password)
    return cmd + ("   # add -a $REDIS_PASSWORD" if password else "")


def key_pattern(head: str) -> str:
    """A SCAN pattern for the keys of a key template (`sophia:processed:{/id}`): its literal head, then `*`."""
    literal, i = [], 0
    while i < len(head):
        if head[i] in "{}" and head[i + 1:i + 2] == head[i]:
            literal.append(head[i])
            i += 2
        elif head[i] == "{":
            break
        else:
            literal.append(head[i])
            i += 1
    return "".join("[" + c + "]" if c in "*?[]\\" else c for c in literal) + "*"
