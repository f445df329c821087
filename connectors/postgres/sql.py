"""SQL text of the postgres materialization: tables from collection schemas, DDL, merges, checkpoints.

Pure functions, no I/O (``localflow validate`` uses them without a database). Every identifier
goes through ``ident`` (always quoted, so names keep their case and characters); every string
constant through ``literal``. Documents are loaded into a per-session temporary table
``localflow_load(_binding, _seq, _ms, doc jsonb, _src, _off)`` and Postgres extracts the columns
from ``doc`` itself, so Python never converts values one by one. ``_src``/``_off`` are the
document's source position (``Record.source``): upserts refuse a document whose position is not
newer than the row's (``flow_source``, ``flow_source_offset``) in the same clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from pipeline.sdk.pointers import pointer_tokens, resolve_pointer

from .config import Index, Partitioning, TableResource

MAX_IDENTIFIER_BYTES = 63
"""Postgres truncates longer names silently (NAMEDATALEN - 1): such names are rejected instead."""

TEXT, BIGINT, DOUBLE, BOOLEAN, TIMESTAMPTZ, JSONB = (
    "text", "bigint", "double precision", "boolean", "timestamp with time zone", "jsonb")
"""Column types, spelled as Postgres's ``format_type`` reports them (so they compare as strings)."""

PUBLISHED_AT, DOCUMENT = "flow_published_at", "flow_document"
SOURCE, SOURCE_OFFSET = "flow_source", "flow_source_offset"
"""The row's source position: ``<topic>:<partition>`` and offset of the record it came from (a
derived document's source record). Nullable: rows written before they existed compare as older."""
CHECKPOINTS = "localflow_checkpoints"
LOAD = "localflow_load"
LOAD_COLUMNS = ("_binding", "_seq", "_ms", "doc", "_src", "_off")

# ---------------------------------------------------------------------------- names


def ident(name: str) -> str:
    """The name as a quoted identifier, inner double quotes doubled: case and characters are kept."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A string constant (standard_conforming_strings, on since Postgres 9.1)."""
    return "'" + text.replace("'", "''") + "'"


def identifier_problem(name: str) -> str:
    """Why Postgres cannot hold ``name`` as an identifier ('' when it can)."""
    if not name:
        return "an empty name cannot be a Postgres identifier"
    if "\x00" in name:
        return f"{name!r} contains a NUL character, which Postgres identifiers cannot hold"
    size = len(name.encode())
    if size > MAX_IDENTIFIER_BYTES:
        return (f"{name!r} is {size} bytes long; Postgres identifiers hold at most {MAX_IDENTIFIER_BYTES} bytes "
                "(it would silently cut it): choose a shorter name")
    return ""


def derived_name(base: str, suffix: str) -> str:
    """``<base>_<suffix>``, shortened with a hash of ``base`` when longer than a Postgres identifier."""
    name = f"{base}_{suffix}"
    if len(name.encode()) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    room = MAX_IDENTIFIER_BYTES - len(f"_{digest}_{suffix}".encode())
    head = base.encode()[:room].decode(errors="ignore")
    return f"{head}_{digest}_{suffix}"


# ---------------------------------------------------------------------------- tables from schemas


def column_type(schema: dict[str, Any]) -> str:
    """The column type of a JSON Schema: scalars map to their type, the rest to jsonb."""
    types = schema.get("type")
    types = {types} if isinstance(types, str) else set(types or [])
    types.discard("null")
    if types == {"string"}:
        return TIMESTAMPTZ if schema.get("format") == "date-time" else TEXT
    if types == {"integer"}:
        return BIGINT
    if types and types <= {"integer", "number"}:
        return DOUBLE
    if types == {"boolean"}:
        return BOOLEAN
    return JSONB


@dataclass(frozen=True)
class Column:
    """One column and where its value is in a document (``path`` empty for flow_* columns)."""

    name: str
    type: str
    path: tuple[str, ...] = ()
    key: bool = False
    not_null: bool = False

    def expr(self) -> str:
        """SQL computing this column from a ``localflow_load`` row."""
        if not self.path:
            return {PUBLISHED_AT: "to_timestamp(_ms / 1000.0)", DOCUMENT: "doc", SOURCE: "_src",
                    SOURCE_OFFSET: "_off"}[self.name]
        parent = "doc" + "".join(f"->{literal(t)}" for t in self.path[:-1])
        last = literal(self.path[-1])
        if self.type == JSONB:
            return f"{parent}->{last}"
        text = f"{parent}->>{last}"
        if self.type == TEXT:
            return text
        if self.type == BIGINT:
            return f"({text})::numeric::bigint"  # JSON allows 1.0 for an integer
        return f"({text})::{self.type}"


@dataclass(frozen=True)
class Table:
    """A binding's table: columns derived from the collection schema, plus the resource's options."""

    schema: str
    name: str
    columns: tuple[Column, ...]
    delta: bool = False
    partition: Partitioning | None = None
    indexes: tuple[Index, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{ident(self.schema)}.{ident(self.name)}"

    @property
    def key(self) -> list[Column]:
        return [c for c in self.columns if c.key]

    @property
    def primary_key(self) -> list[str]:
        """Primary key columns: none for delta tables; the key (plus the partition column) otherwise."""
        if self.delta:
            return []
        names = [c.name for c in self.key]
        if self.partition is not None and self.partition.column not in names:
            names.append(self.partition.column)
        return names

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


def table_of(collection_schema: dict[str, Any], key: list[str], resource: TableResource, schema: str) -> Table:
    """The table of a binding: key columns first, one column per top-level property, then flow_*.

    A key pointer into a nested property (``/metadata/id``) becomes its own column named by the
    pointer without its leading slash (``metadata/id``), as Estuary names such projections.
    """
    required = set(collection_schema.get("required") or [])
    properties: dict[str, Any] = collection_schema.get("properties") or {}
    columns: list[Column] = []
    for pointer in key:
        tokens = pointer_tokens(pointer)
        sub, _ = resolve_pointer(collection_schema, pointer)
        columns.append(Column("/".join(tokens), column_type(sub or {}), tuple(tokens), key=True, not_null=True))
    key_paths = {c.path for c in columns}
    partition_column = resource.partition_by.column if resource.partition_by else None
    for name, sub in properties.items():
        if (name,) in key_paths:  # a top-level key is its property's column
            continue
        not_null = name == partition_column and name in required
        columns.append(Column(name, column_type(sub if isinstance(sub, dict) else {}), (name,), not_null=not_null))
    columns.append(Column(PUBLISHED_AT, TIMESTAMPTZ, not_null=True))
    columns.append(Column(DOCUMENT, JSONB, not_null=True))
    columns.append(Column(SOURCE, TEXT))
    columns.append(Column(SOURCE_OFFSET, BIGINT))
    return Table(schema, resource.table, tuple(columns), resource.delta_updates, resource.partition_by,
                 tuple(resource.indexes))


def table_problems(table: Table, collection_schema: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, why)`` for everything Postgres could not hold or that cannot work; [] when fine."""
    out: list[tuple[str, str]] = []
    why = identifier_problem(table.name)
    if why:
        out.append(("table", why))
    seen: set[str] = set()
    for c in table.columns:
        why = identifier_problem(c.name)
        if why:
            out.append(("table", f"column of property /{'/'.join(c.path)}: {why}"))
        elif c.name in seen:
            origin = f"property /{'/'.join(c.path)}" if c.path else "localflow's own column"
            out.append(("table", f"column {c.name!r} ({origin}) clashes with another column of the same name"))
        seen.add(c.name)
    if table.partition is not None:
        col = table.column(table.partition.column)
        required = set(collection_schema.get("required") or [])
        if col is None or col.type != TIMESTAMPTZ or not col.path or table.partition.column not in required:
            out.append(("partition_by.column", f"{table.partition.column!r} must be a required top-level property "
                                               "of the collection with `format: date-time`"))
    for i, index in enumerate(table.indexes):
        for name in index.columns:
            if table.column(name) is None:
                out.append((f"indexes[{i}].columns", f"{name!r} is not a column of the table; columns: "
                                                     + ", ".join(c.name for c in table.columns)))
        if index.name is not None and identifier_problem(index.name):
            out.append((f"indexes[{i}].name", identifier_problem(index.name)))
    return out


# ---------------------------------------------------------------------------- DDL


def create_table(table: Table) -> str:
    """The table with its primary key and partitioning."""
    lines = [f"{ident(c.name)} {c.type}{' NOT NULL' if c.not_null else ''}" for c in table.columns]
    if table.primary_key:
        lines.append(f"PRIMARY KEY ({', '.join(map(ident, table.primary_key))})")
    partition = f" PARTITION BY RANGE ({ident(table.partition.column)})" if table.partition else ""
    body = ",\n  ".join(lines)
    return f"CREATE TABLE {table.qualified} (\n  {body}\n){partition}"


def create_indexes(table: Table) -> list[str]:
    """The binding's indexes, each created if missing."""
    out = []
    if table.partition is not None and not table.delta:
        # Finds the row of a key in any partition when a document's partition column changes.
        out.append(_index_sql(table, [c.name for c in table.key], "btree", derived_name(table.name, "key_idx")))
    for index in table.indexes:
        name = index.name or derived_name(table.name, "_".join(index.columns) + "_idx")
        out.append(_index_sql(table, index.columns, index.method, name))
    return out


def _index_sql(table: Table, columns: list[str], method: str, name: str) -> str:
    return (f"CREATE INDEX IF NOT EXISTS {ident(name)} ON {table.qualified} "
            f"USING {method} ({', '.join(map(ident, columns))})")


@dataclass(frozen=True)
class Existing:
    """What the database already has for a table."""

    columns: dict[str, str]
    """Column name -> type as ``format_type`` spells it."""
    primary_key: list[str]
    partition_column: str | None
    partitioned: bool


def migrate(table: Table, existing: Existing) -> tuple[list[str], list[str]]:
    """(statements that bring the table in line with the schema, changes that cannot be applied).

    Applied: added properties become nullable columns; an integer property that became a number
    widens bigint to double precision. Anything else is reported, never guessed.
    """
    statements: list[str] = []
    conflicts: list[str] = []
    where = f"table {table.qualified}"
    for c in table.columns:
        have = existing.columns.get(c.name)
        if have is None:
            if c.key or c.not_null:
                conflicts.append(f"{where}: column {ident(c.name)} ({c.type}) is new in the collection key or "
                                 "partitioning, and existing rows have no value for it")
            else:
                statements.append(f"ALTER TABLE {table.qualified} ADD COLUMN IF NOT EXISTS {ident(c.name)} {c.type}")
        elif have != c.type:
            if have == BIGINT and c.type == DOUBLE:
                statements.append(f"ALTER TABLE {table.qualified} ALTER COLUMN {ident(c.name)} TYPE {DOUBLE}")
            else:
                conflicts.append(f"{where}: column {ident(c.name)} is {have} in Postgres but the collection schema "
                                 f"now makes it {c.type}; this change cannot be applied automatically")
    if existing.primary_key != table.primary_key:
        have = ", ".join(existing.primary_key) or "none"
        want = ", ".join(table.primary_key) or "none (delta_updates)"
        conflicts.append(f"{where}: primary key is ({have}) in Postgres but the binding needs ({want})")
    want_partition = table.partition.column if table.partition else None
    if existing.partition_column != want_partition or existing.partitioned != (want_partition is not None):
        conflicts.append(f"{where}: partitioned by {existing.partition_column or 'nothing'} in Postgres but the "
                         f"binding says {want_partition or 'nothing'}")
    return statements, conflicts


# ---------------------------------------------------------------------------- partitions


def period_start(value: str, interval: str) -> date | None:
    """The UTC period of an RFC 3339 date-time by its date part (None when it has none)."""
    try:
        day = date(int(value[0:4]), int(value[5:7]), int(value[8:10]))
    except (ValueError, IndexError):
        return None
    return day.replace(day=1) if interval == "month" else day


def next_period(start: date, interval: str) -> date:
    if interval == "day":
        return start + timedelta(days=1)
    return date(start.year + (start.month == 12), start.month % 12 + 1, 1)


def periods_for(values: Iterable[str], interval: str) -> set[date]:
    """Periods that rows with these date-times may fall in: the written date and its neighbours.

    The date part of ``2024-01-31T23:00:00-05:00`` is January, but in UTC it is February: taking
    the neighbours too covers every UTC offset without parsing each timestamp.
    """
    out: set[date] = set()
    width = 7 if interval == "month" else 10
    for prefix in {v[:width] for v in values if isinstance(v, str)}:
        start = period_start(prefix + "-01" if interval == "month" else prefix, interval)
        if start is None:
            continue
        before = (start.replace(day=1) - timedelta(days=1)).replace(day=1) if interval == "month" \
            else start - timedelta(days=1)
        out |= {before, start, next_period(start, interval)}
    return out


def periods_ahead(today: date, interval: str, ahead: int) -> set[date]:
    """The current period and ``ahead`` following ones."""
    start = today.replace(day=1) if interval == "month" else today
    out = {start}
    for _ in range(ahead):
        start = next_period(start, interval)
        out.add(start)
    return out


def partition_name(table: Table, start: date, interval: str) -> str:
    return derived_name(table.name, start.strftime("%Y_%m" if interval == "month" else "%Y_%m_%d"))


def create_partition(table: Table, start: date) -> str:
    assert table.partition is not None
    interval = table.partition.interval
    end = next_period(start, interval)
    name = ident(table.schema) + "." + ident(partition_name(table, start, interval))
    return (f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table.qualified} "
            f"FOR VALUES FROM ('{start.isoformat()} 00:00:00+00') TO ('{end.isoformat()} 00:00:00+00')")


# ---------------------------------------------------------------------------- loading and merging


def create_load_table() -> str:
    """The per-session staging table that COPY fills; emptied by every commit."""
    return (f"CREATE TEMPORARY TABLE IF NOT EXISTS {LOAD} "
            "(_binding integer NOT NULL, _seq integer NOT NULL, _ms bigint NOT NULL, doc jsonb NOT NULL, "
            "_src text NOT NULL, _off bigint NOT NULL) ON COMMIT DELETE ROWS")


def merge(table: Table, binding: int, unique: bool = False) -> list[str]:
    """Statements moving binding ``binding``'s rows with ``$1 <= _seq < $2`` from the load table.

    ``unique``: the caller knows the rows' keys are distinct (one per Kafka key), so the upsert
    skips the sort that picks each key's last row (about 15% of a merge); should two Kafka keys
    still give one table key, Postgres refuses the statement (cardinality violation) and the
    caller runs the sorting one instead.

    Upserts keep the last document per key of the batch (``DISTINCT ON ... ORDER BY _seq DESC``;
    the materialization already dropped versions older at their source than another of the batch),
    then ``ON CONFLICT DO UPDATE ... WHERE`` the document is newer at its source than the row; delta
    tables append every document in order. Where a document may move its row to another partition,
    the rows it would not replace are first removed from the load table, so neither the move's
    DELETE nor the INSERT in the new partition acts for an older document.
    """
    cols = ", ".join(ident(c.name) for c in table.columns)
    exprs = ", ".join(c.expr() for c in table.columns)
    source = f"FROM {LOAD} WHERE _binding = {binding} AND _seq >= $1 AND _seq < $2"
    if table.delta:
        return [f"INSERT INTO {table.qualified} ({cols}) SELECT {exprs} {source} ORDER BY _seq"]
    keys = ", ".join(c.expr() for c in table.key)
    last = f"{source} ORDER BY {keys}, _seq DESC"
    conflict = table.primary_key
    updates = ", ".join(f"{ident(c.name)} = EXCLUDED.{ident(c.name)}" for c in table.columns if c.name not in conflict)
    src, off = ident(SOURCE), ident(SOURCE_OFFSET)
    newer = f"(t.{src} IS DISTINCT FROM {{new}}{src} OR t.{off} < {{new}}{off})"
    out = []
    if table.partition is not None and table.partition.column not in [c.name for c in table.key]:
        names = [f"k{i}" for i in range(len(table.key))]
        selected = ", ".join(f"{c.expr()} AS {n}" for c, n in zip(table.key, names, strict=True))
        matches = " AND ".join(f"t.{ident(c.name)} = s.{n}" for c, n in zip(table.key, names, strict=True))
        out.append(f"DELETE FROM {LOAD} AS l USING (SELECT _seq AS q, {selected}, _src AS {src}, _off AS {off} "
                   f"{source}) AS s, {table.qualified} AS t WHERE l._binding = {binding} AND l._seq = s.q "
                   f"AND {matches} AND NOT {newer.format(new='s.')}")
        part = table.column(table.partition.column)
        assert part is not None
        out.append(f"DELETE FROM {table.qualified} AS t USING (SELECT DISTINCT ON ({keys}) {selected}, "
                   f"{part.expr()} AS p {last}) AS s WHERE {matches} AND t.{ident(part.name)} <> s.p")
    rows = f"{exprs} {source}" if unique else f"DISTINCT ON ({keys}) {exprs} {last}"
    out.append(f"INSERT INTO {table.qualified} AS t ({cols}) SELECT {rows} "
               f"ON CONFLICT ({', '.join(map(ident, conflict))}) DO UPDATE SET {updates} "
               f"WHERE {newer.format(new='EXCLUDED.')}")
    return out


# ---------------------------------------------------------------------------- checkpoints


def create_checkpoints(schema: str) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {ident(schema)}.{CHECKPOINTS} (\n"
            "  materialization text NOT NULL,\n  topic text NOT NULL,\n  partition integer NOT NULL,\n"
            "  next_offset bigint,\n  fence bigint NOT NULL,\n  holder text,\n"
            "  PRIMARY KEY (materialization, topic, partition)\n)")


def fence(schema: str) -> str:
    """Take partitions over: bump each fence; answer the stored next offsets and the new fences.

    ``$1`` materialization, ``$2`` topics, ``$3`` partitions, ``$4`` holder (host and pid, for
    operators). Rows are locked in a fixed order so two workers fencing overlapping sets never
    deadlock.
    """
    table = f"{ident(schema)}.{CHECKPOINTS}"
    return (f"INSERT INTO {table} AS c (materialization, topic, partition, next_offset, fence, holder) "
            "SELECT $1, t, p, NULL, 1, $4 FROM unnest($2::text[], $3::integer[]) AS u(t, p) ORDER BY t, p "
            "ON CONFLICT (materialization, topic, partition) "
            "DO UPDATE SET fence = c.fence + 1, holder = EXCLUDED.holder "
            "RETURNING topic, partition, next_offset, fence")


def read_checkpoints(schema: str) -> str:
    """``$1`` materialization, ``$2`` topics, ``$3`` partitions -> next_offset and fence of each."""
    return (f"SELECT c.topic, c.partition, c.next_offset, c.fence FROM {ident(schema)}.{CHECKPOINTS} AS c "
            "JOIN unnest($2::text[], $3::integer[]) AS u(t, p) ON c.topic = u.t AND c.partition = u.p "
            "WHERE c.materialization = $1")


def commit_checkpoints(schema: str) -> str:
    """Advance next offsets, only where the fence is still ours (``$4``): the zombie guard."""
    return (f"UPDATE {ident(schema)}.{CHECKPOINTS} AS c SET next_offset = u.n "
            "FROM unnest($2::text[], $3::integer[], $4::bigint[], $5::bigint[]) AS u(t, p, f, n) "
            "WHERE c.materialization = $1 AND c.topic = u.t AND c.partition = u.p AND c.fence = u.f "
            "RETURNING c.topic, c.partition")
