"""The ``sqlite`` engine: each transform's ``lambda`` is SQL that SQLite runs over a batch.

What a lambda author can rely on:

* Input. Each source collection is an in-memory table named after the last segment of its name
  (``sophia/sophia_raw_data`` -> ``sophia_raw_data``), with one column per top-level property of
  its schema: objects and arrays as JSON text (so ``data->>'type'`` works), other values as they
  are, NULL where absent. Properties the schema does not declare are not loaded. The table
  holds one batch at a time, and a last column ``flow_seq``: the row's place in the batch.
* Output. The lambda is one statement; every row it returns is a document. Each column becomes
  a top-level property (the last of two equal names wins), or, when the only column is named
  ``json``, its JSON text is the whole document (a NULL ``json`` yields no document).
* Order and lineage. Each output row must be traced to the input it came from: the output
  carries that input's source position, by which endpoints refuse an older version of a key.
  A lambda whose rows have a ``flow_seq`` column (``SELECT *`` has it; with GROUP BY, select
  ``max(flow_seq) AS flow_seq``) runs once per batch; its rows are put back in input order
  (``flow_seq``, then the lambda's order), so ORDER BY, GROUP BY or DISTINCT never let an
  older version of a key come out after a newer one, unless ``order: lambda`` says to keep the
  lambda's order. ``flow_seq`` is not part of the document. A lambda without ``flow_seq`` runs
  once per input document (about half the speed): lineage and order are then given.
* Shaping, by the derived collection's schema, at any depth of ``properties``/``items``:
  JSON text where the schema expects an object or array is parsed; ``YYYY-MM-DD HH:MM:SS[.f]``
  (SQLite's CURRENT_TIMESTAMP, which is UTC) becomes RFC 3339 UTC where it says
  ``format: date-time``; 0/1 become false/true where it expects a boolean. A NULL column is left
  out of the document unless the schema allows null there (no ``type``, or one that includes
  "null"): an optional property is absent rather than null, so NULL never fails validation of an
  optional property.
* ``migrations`` (SQL scripts) run once per worker before the first batch. Tables they create
  may hold state across batches, in that worker's memory only: it is lost on restart and not
  shared between workers, so outputs must not depend on it for exactly-once results.
* Errors. A lambda SQLite cannot compile is a catalog error (`localflow validate`). A runtime
  error fails the batch, which is bisected to find the inputs that fail alone: those become
  dead letters; the outputs of the others are kept. Each batch runs in one transaction, rolled
  back on error, so state tables never see a failed attempt.
* Which SQLite. 3.51 (the ``pysqlite3-binary`` wheel, a dependency on Linux x86_64), else the one
  Python was built with; a worker logs the version when the engine opens. Results of some SQL
  differ between versions (``round(2.675, 2)`` is 2.68 on 3.40, 2.67 on 3.51; 3.45+ JSON functions
  accept JSON5 text), so a derivation run on another platform should be checked with ``localflow test``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import Field, ValidationError

from pipeline.sdk.config import Model
from pipeline.sdk.connector import Catalog
from pipeline.sdk.engine import Document, Engine, Transformed
from pipeline.sdk.errors import ConfigError
from pipeline.sdk.problems import pydantic_problems

try:  # pysqlite3-binary: a recent SQLite (3.51), where the platform has its wheel
    import pysqlite3.dbapi2 as sqlite3
except ImportError:  # pragma: no cover - Python's own, whatever SQLite it was built with
    import sqlite3

log = logging.getLogger(__name__)
Problems = list[tuple[str, str]]
Shape = Callable[[Any], Any]

_RUNTIME_ERRORS = (sqlite3.Error, ValueError, OverflowError)  # orjson.JSONDecodeError is a ValueError
SEQ = "flow_seq"
"""The column of each source table holding the row's index in the batch (the lineage of outputs)."""
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
"""A property name SQLite's JSON paths take as it is (``$.name``)."""
_JSONB = sqlite3.sqlite_version_info >= (3, 45, 0)
_SQLITE_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d+)?")


class SqliteOptions(Model):
    """``derive.using.sqlite``."""

    migrations: list[str] = Field(
        default_factory=list,
        description="SQL scripts run once per worker before the first batch (e.g. CREATE TABLE of state).",
    )
    order: Literal["input", "lambda"] = Field(
        default="input",
        description="Order of a batch's output rows: `input` (by flow_seq, so a key's versions keep the "
                    "order of their inputs) or `lambda` (as the lambda's ORDER BY returns them).",
    )


@dataclass(frozen=True, slots=True)
class Table:
    """The in-memory table of one source collection."""

    name: str
    source: str
    columns: tuple[str, ...]

    def create_sql(self) -> str:
        return f"CREATE TABLE {_quote(self.name)} ({', '.join(_quote(c) for c in (*self.columns, SEQ))})"

    def insert_sql(self) -> str:
        return f"INSERT INTO {_quote(self.name)} VALUES ({', '.join('?' * (len(self.columns) + 1))})"

    def insert_json_sql(self) -> str | None:
        """The insert of one document given as JSON text (and its ``flow_seq``); None when a column
        name is not a plain JSON path key."""
        if not all(_PLAIN_KEY.fullmatch(c) for c in self.columns):
            return None
        values = ", ".join(f"j ->> '$.{c}'" for c in self.columns)
        # SQLite 3.45+: the text parsed once into JSONB, every column read from it (older: once per column).
        j = "jsonb(?)" if _JSONB else "?"
        return f"INSERT INTO {_quote(self.name)} SELECT {values}, s FROM (SELECT {j} AS j, ? AS s)"

    def describe(self) -> str:
        return f"{self.name}({', '.join((*self.columns, SEQ))})"


# ------------------------------------------------------------------------------------- catalog


def check(catalog: Catalog, collection: str, place: str) -> Problems:
    """Options, table names, migrations and lambdas of a derivation, compiled by SQLite."""
    derive = catalog.collections[collection].derive
    assert derive is not None
    try:
        options = SqliteOptions.model_validate(derive.options)
    except ValidationError as e:
        return pydantic_problems(e, f"{place}.using.sqlite")
    problems: Problems = []
    tables = _tables(catalog, collection, place, problems)
    if problems:
        return problems
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        problems.extend(_prepare(conn, options.migrations, tables.values(), place))
        if problems:
            return problems
        hint = "; its tables: " + ", ".join(t.describe() for t in tables.values())
        required = catalog.schema(collection).get("required", [])
        for i, t in enumerate(derive.transforms):
            where = f"{place}.transforms[{i}].lambda"
            if not t.lambda_.strip():
                problems.append((where, "is empty: write one SQL statement whose rows are the output documents"))
                continue
            try:
                # Run on empty tables: compiles the statement and tells its columns.
                cursor = conn.execute(t.lambda_)
            except sqlite3.Error as e:
                problems.append((where, f"SQLite rejects it: {e}{hint}"))
                continue
            names = [d[0] for d in cursor.description or ()]
            missing = [p for p in required if p not in names]
            if names and names != ["json"] and missing:
                problems.append((where, f"its rows have columns {names} but {collection} requires "
                                        f"{missing}: add columns named so (or one column `json` "
                                        f"holding the whole document)"))
    finally:
        conn.close()
    return problems


def build(catalog: Catalog, collection: str) -> SqliteEngine:
    """The engine of ``collection`` (the catalog was checked by ``check`` when loaded)."""
    derive = catalog.collections[collection].derive
    assert derive is not None
    place = f"collections.{collection}.derive"
    problems: Problems = []
    tables = _tables(catalog, collection, place, problems)
    if problems:
        raise ConfigError(problems)
    return SqliteEngine(
        lambdas=[t.lambda_ for t in derive.transforms],
        tables=[tables[t.source] for t in derive.transforms],
        options=SqliteOptions.model_validate(derive.options),
        schema=catalog.schema(collection),
        place=place,
    )


def _tables(catalog: Catalog, collection: str, place: str, problems: Problems) -> dict[str, Table]:
    """One table per source collection, named after its last path segment."""
    derive = catalog.collections[collection].derive
    assert derive is not None
    tables: dict[str, Table] = {}
    by_name: dict[str, str] = {}
    for i, t in enumerate(derive.transforms):
        if t.source in tables:
            continue
        name = t.source.rsplit("/", 1)[-1]
        if name in by_name:
            problems.append((f"{place}.transforms[{i}].source",
                             f"its table would be {name!r}, already the table of {by_name[name]}; "
                             f"a derivation cannot read two sources whose names end the same"))
            continue
        by_name[name] = t.source
        columns = tuple(catalog.schema(t.source).get("properties", {}))
        if not columns:
            problems.append((f"{place}.transforms[{i}].source",
                             f"the schema of {t.source} declares no properties, so its table has no columns"))
            continue
        if SEQ in columns:
            problems.append((f"{place}.transforms[{i}].source",
                             f"the schema of {t.source} declares a property {SEQ!r}, the name of the column "
                             f"that holds each row's place in the batch: rename the property"))
            continue
        tables[t.source] = Table(name, t.source, columns)
    return tables


def _prepare(conn: sqlite3.Connection, migrations: list[str], tables: Iterable[Table], place: str) -> Problems:
    """Run the migrations, then create the source tables; the first problem, if any."""
    for i, script in enumerate(migrations):
        try:
            conn.executescript(script)
        except sqlite3.Error as e:
            return [(f"{place}.using.sqlite.migrations[{i}]", f"SQLite rejects it: {e}")]
    for table in tables:
        try:
            conn.execute(table.create_sql())
        except sqlite3.Error as e:
            return [(f"{place}.using.sqlite.migrations",
                     f"cannot create the table of {table.source} ({table.describe()}): {e}")]
    return []


# ------------------------------------------------------------------------------------- runtime


class SqliteEngine(Engine):
    """One in-memory SQLite database per worker; transform ``i`` runs ``lambdas[i]`` over ``tables[i]``."""

    def __init__(self, *, lambdas: list[str], tables: list[Table], options: SqliteOptions,
                 schema: dict[str, Any], place: str) -> None:
        self._lambdas = lambdas
        self._tables = tables
        self._migrations = options.migrations
        self._input_order = options.order == "input"
        self._place = place
        self._properties = schema.get("properties", {})
        self._document_shape = _shape(schema) or (lambda doc: doc)
        self._plans: dict[tuple[str, ...], tuple[int | None, Callable[[tuple[Any, ...]], Document | None]]] = {}
        self._inserts = [t.insert_sql() for t in tables]
        self._json_inserts = [t.insert_json_sql() for t in tables]
        self._traced: list[bool] = []
        """Per transform: whether its rows have ``flow_seq`` (else it runs once per input)."""
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        log.info("sql engine: SQLite %s (%s)", sqlite3.sqlite_version, sqlite3.__name__)
        self._conn = sqlite3.connect(":memory:", isolation_level=None)
        problems = _prepare(self._conn, self._migrations, set(self._tables), self._place)
        if problems:
            raise ConfigError(problems)
        self._traced = [SEQ in self._columns(i) for i in range(len(self._lambdas))]

    def _columns(self, transform: int) -> list[str]:
        """The lambda's column names, from a run on the empty tables that leaves no trace."""
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN")
        try:
            return [d[0] for d in conn.execute(self._lambdas[transform]).description or ()]
        finally:
            conn.execute("ROLLBACK")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def apply(self, transform: int, documents: Sequence[Document]) -> Transformed:
        return self._apply(transform, documents, False)

    def apply_json(self, transform: int, texts: Sequence[str]) -> Transformed | None:
        """``apply`` to documents given as their JSON text: SQLite reads the columns out of the
        text itself (``->>`` gives what the table would hold: objects and arrays as JSON text,
        other values as they are), so Python neither decodes the documents nor re-serializes
        their objects. None when the table's column names cannot be written as JSON paths."""
        if self._json_inserts[transform] is None:
            return None
        return self._apply(transform, texts, True)

    def _apply(self, transform: int, inputs: Sequence[Any], as_json: bool) -> Transformed:
        if not inputs:
            return Transformed()
        if len(inputs) > 1 and not self._traced[transform]:
            return self._each(transform, [orjson.loads(t) for t in inputs] if as_json else inputs)
        try:
            return self._run(transform, inputs, as_json)
        except _RUNTIME_ERRORS as e:
            if len(inputs) == 1:
                return Transformed(failed=[(0, f"{type(e).__name__}: {e}")])
        # Bisect: the inputs that fail alone are dead letters, the rest still produce outputs.
        mid = len(inputs) // 2
        out = self._apply(transform, inputs[:mid], as_json)
        out.extend(self._apply(transform, inputs[mid:], as_json), mid)
        return out

    def _each(self, transform: int, documents: Sequence[Document]) -> Transformed:
        """A lambda without ``flow_seq``, once per document: the outputs of a run are its input's.

        Without migrations there is no state a failed run could leave behind, so the runs share
        one transaction (a run is then three statements, not five).
        """
        if self._migrations:
            out = Transformed()
            for i, doc in enumerate(documents):
                out.extend(self.apply(transform, (doc,)), i)
            return out
        out = Transformed()
        with self._transaction():
            for i, doc in enumerate(documents):
                try:
                    one = self._select(transform, (doc,))
                except _RUNTIME_ERRORS as e:
                    out.failed.append((i, f"{type(e).__name__}: {e}"))
                    continue
                out.documents += one.documents
                out.sources += [i] * len(one.documents)
        return out

    def _run(self, transform: int, inputs: Sequence[Any], as_json: bool = False) -> Transformed:
        with self._transaction():
            return self._select(transform, inputs, as_json)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction, rolled back on error: state tables never see a failed attempt."""
        conn = self._conn
        assert conn is not None, "open() first"
        conn.execute("BEGIN")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _select(self, transform: int, documents: Sequence[Any], as_json: bool = False) -> Transformed:
        """Load ``documents`` (dicts, or JSON texts when ``as_json``) into the transform's table and
        run its lambda (inside a transaction)."""
        conn = self._conn
        assert conn is not None
        table = self._tables[transform]
        columns = table.columns
        conn.execute(f"DELETE FROM {_quote(table.name)}")
        if as_json:
            conn.executemany(self._json_inserts[transform], [(text, i) for i, text in enumerate(documents)])
        else:
            conn.executemany(self._inserts[transform],
                             [(*[_sql_value(d.get(c)) for c in columns], i) for i, d in enumerate(documents)])
        cursor = conn.execute(self._lambdas[transform])
        rows = cursor.fetchall()
        return self._outputs(cursor.description, rows, len(documents)) if cursor.description else Transformed()

    def _outputs(self, description: Sequence[Sequence[Any]], rows: list[tuple[Any, ...]], inputs: int) -> Transformed:
        """The documents of the lambda's rows and the input each came from, in input order."""
        names = tuple(d[0] for d in description)
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plans[names] = self._plan(names)
        seq, make = plan
        if seq is None or inputs == 1:
            sources = [0] * len(rows)
        else:
            sources = [r[seq] for r in rows]
            if not all(type(i) is int and 0 <= i < inputs for i in sources):
                bad = next(i for i in sources if not (type(i) is int and 0 <= i < inputs))
                raise ValueError(f"a row's {SEQ} is {bad!r}, not the {SEQ} of an input row (select it from "
                                 f"the source table, or max({SEQ}) with GROUP BY)")
            if self._input_order:
                order = sorted(range(len(rows)), key=sources.__getitem__)  # stable: the lambda's order within an input
                rows = [rows[j] for j in order]
                sources = [sources[j] for j in order]
        out = Transformed()
        for row, source in zip(rows, sources, strict=True):
            doc = make(row)
            if doc is not None:
                out.documents.append(doc)
                out.sources.append(source)
        return out

    def _plan(self, names: tuple[str, ...]) -> tuple[int | None, Callable[[tuple[Any, ...]], Document | None]]:
        """(index of ``flow_seq`` or None, how to make a document of a row)."""
        seq = names.index(SEQ) if SEQ in names else None
        data = [(i, n) for i, n in enumerate(names) if n != SEQ]
        if [n for _, n in data] == ["json"]:
            shape = self._document_shape
            loads = orjson.loads
            j = data[0][0]
            return seq, lambda row: None if row[j] is None else shape(loads(row[j]))
        # Per column: (index, property, how to shape its values, whether NULL is kept as null).
        columns = []
        for i, name in data:
            schema = self._properties.get(name, {})
            types = _types(schema)
            columns.append((i, name, _shape(schema), not types or "null" in types))

        def make(row: tuple[Any, ...]) -> Document:
            doc: Document = {}
            for i, name, shape, keep_null in columns:
                v = row[i]
                if v is None:
                    if keep_null:
                        doc[name] = None
                elif shape is None:
                    doc[name] = v
                else:
                    doc[name] = shape(v)
            return doc

        return seq, make


def _sql_value(v: Any) -> Any:
    """A JSON value as SQLite stores it: objects and arrays as JSON text."""
    t = type(v)
    if t is dict or t is list:
        return orjson.dumps(v).decode()
    return v


def _types(schema: dict[str, Any]) -> set[str]:
    t = schema.get("type")
    if t is None:
        return set()
    return {t} if isinstance(t, str) else set(t)


def _shape(schema: dict[str, Any]) -> Shape | None:
    """How to turn an SQLite value into what ``schema`` expects there (None: leave it as is)."""
    if not isinstance(schema, dict):
        return None
    types = _types(schema)
    parse = bool(types & {"object", "array"})
    date_time = schema.get("format") == "date-time"
    boolean = "boolean" in types and not types & {"integer", "number"}
    properties = {k: s for k, s in ((k, _shape(v)) for k, v in schema.get("properties", {}).items()) if s}
    items = _shape(schema["items"]) if "items" in schema else None
    if not (parse or date_time or boolean or properties or items):
        return None
    if not (date_time or boolean or properties or items):
        return _parse  # the common object/array column: one call, no branches per row

    def shape(v: Any) -> Any:
        if type(v) is str:
            if date_time and v[10:11] == " " and _SQLITE_DATETIME.fullmatch(v):
                return f"{v[:10]}T{v[11:]}Z"
            if not (parse and v[:1] in "{["):
                return v
            try:
                v = orjson.loads(v)
            except orjson.JSONDecodeError:
                return v  # left as text: validation says why it is not an object
        elif boolean and type(v) is int and v in (0, 1):
            return v == 1
        if properties and type(v) is dict:
            for k, sub in properties.items():
                if v.get(k) is not None:
                    v[k] = sub(v[k])
        elif items and type(v) is list:
            v = [x if x is None else items(x) for x in v]
        return v

    return shape


def _parse(v: Any) -> Any:
    """``_shape`` of a schema that only expects an object or array: JSON text is parsed."""
    if type(v) is str and v[:1] in "{[":
        try:
            return orjson.loads(v)
        except orjson.JSONDecodeError:
            return v  # left as text: validation says why it is not an object
    return v


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
