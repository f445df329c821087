"""What the demo's live view shows of a Postgres binding: the rows of its table."""

from __future__ import annotations

import shlex
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline.sdk.connector import Described

from .config import PostgresConfig, TableResource


def describe(config: PostgresConfig, resource: TableResource, collection: str) -> Described:
    schema, table = config.schema_, resource.table
    held: dict[str, Any] = {}

    async def count() -> int | None:
        import asyncpg

        if "conn" not in held:
            held["conn"] = await asyncpg.connect(**config.connect_options())
        try:
            return int(await held["conn"].fetchval(f"SELECT count(*) FROM {_ident(schema)}.{_ident(table)}"))
        except asyncpg.UndefinedTableError:
            return None

    async def close() -> None:
        conn = held.pop("conn", None)
        if conn is not None:
            await conn.close(timeout=5)

    return Described(f"{schema}.{table}", "rows", count, close, query=_psql(config, f"{_ident(schema)}.{_ident(table)}"))


def _psql(config: PostgresConfig, table: str) -> str:
    where = urlsplit(config.where())
    cmd = shlex.join(["psql", "-h", where.hostname or "127.0.0.1", "-p", str(where.port or 5432),
                      "-U", unquote(where.username or "postgres"), "-d", where.path.lstrip("/") or "postgres",
                      "-c", f"SELECT * FROM {table} LIMIT 5"])
    return cmd + ("   # password: $POSTGRES_PASSWORD" if config.password or config._url_password() else "")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
