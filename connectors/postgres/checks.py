"""What `localflow validate` and `localflow doctor` check for the postgres materialization."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.sdk.connector import Check
from pipeline.sdk.errors import scrub

from . import sql
from .config import PostgresConfig, TableResource

if TYPE_CHECKING:
    from pipeline.runtime.catalog import Catalog, MaterializationSpec
    from pipeline.sdk.connector import Problems


def check(catalog: Catalog, task: MaterializationSpec, place: str) -> Problems:
    """Names Postgres cannot hold, clashing tables and columns, impossible partitions and indexes."""
    config: PostgresConfig = task.config
    problems: Problems = []
    why = sql.identifier_problem(config.schema_)
    if why:
        problems.append((f"{place}.endpoint.postgres.schema", why))
    tables: dict[str, int] = {sql.CHECKPOINTS: -1}
    sources: dict[str, int] = {}
    for i, binding in enumerate(task.bindings):
        resource: TableResource | None = binding.parsed
        if resource is None or binding.source not in catalog.collections:
            continue
        bplace = f"{place}.bindings[{i}]"
        if binding.source in sources:
            problems.append((f"{bplace}.source", f"{binding.source!r} is already materialized by "
                                                 f"bindings[{sources[binding.source]}] of this task; one binding "
                                                 "per collection (use another materialization for a second table)"))
        sources.setdefault(binding.source, i)
        if resource.table in tables:
            other = "localflow's checkpoint table" if tables[resource.table] < 0 else f"bindings[{tables[resource.table]}]"
            problems.append((f"{bplace}.resource.table", f"table {resource.table!r} is also used by {other}"))
        tables.setdefault(resource.table, i)
        schema = catalog.schema(binding.source)
        table = sql.table_of(schema, catalog.collections[binding.source].key, resource, config.schema_)
        problems += [(f"{bplace}.resource.{field}", why) for field, why in sql.table_problems(table, schema)]
    return problems


async def doctor(config: PostgresConfig) -> list[Check]:
    """Connect, then check the privileges the task needs in its schema; never shows the password."""
    import asyncpg

    where = config.where()
    name = f"postgres {where}"
    try:
        conn = await asyncpg.connect(**config.connect_options())
    except Exception as e:  # noqa: BLE001 - every failure is a doctor line, not a crash
        return [Check(name, False, f"cannot connect: {type(e).__name__}: {scrub(str(e), config.secrets())}")]
    try:
        version = await conn.fetchval("SHOW server_version")
        checks = [Check(name, True, f"PostgreSQL {version}, connected as {await conn.fetchval('SELECT current_user')}")]
        schema = config.schema_
        exists = await conn.fetchval("SELECT to_regnamespace($1) IS NOT NULL", sql.ident(schema))
        if exists:
            ok = await conn.fetchval("SELECT has_schema_privilege(n, 'USAGE') AND has_schema_privilege(n, 'CREATE') "
                                     "FROM to_regnamespace($1) AS n", sql.ident(schema))
            detail = "" if ok else "needs USAGE and CREATE on the schema (GRANT USAGE, CREATE ON SCHEMA ...)"
            checks.append(Check(f"postgres schema {schema}", ok, detail))
        else:
            ok = await conn.fetchval("SELECT has_database_privilege(current_database(), 'CREATE')")
            detail = ("missing; the task will create it" if ok else
                      "missing, and this role may not create it (GRANT CREATE ON DATABASE ..., or create it)")
            checks.append(Check(f"postgres schema {schema}", ok, detail))
        ok = await conn.fetchval("SELECT has_database_privilege(current_database(), 'TEMPORARY')")
        checks.append(Check("postgres temporary tables", ok, "" if ok else
                            "needs TEMPORARY on the database: batches are loaded through a temporary table"))
        return checks
    except Exception as e:  # noqa: BLE001
        return [Check(name, False, f"{type(e).__name__}: {scrub(str(e), config.secrets())}")]
    finally:
        await conn.close()
