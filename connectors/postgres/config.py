"""Configuration of the `postgres` materialization: the endpoint and each binding (a table).

Example (the Sophia catalog)::

    endpoint:
      postgres:
        url: ${POSTGRES_URL:-}                # a DSN wins over the parts below when set
        host: ${POSTGRES_HOST:-127.0.0.1}
        user: ${POSTGRES_USER:-postgres}
        password: ${POSTGRES_PASSWORD:-}
        database: ${POSTGRES_DB:-postgres}
        schema: estuary
    bindings:
      - source: sophia/sophia_agent_logs
        resource:
          table: sophia_agent_logs
          indexes: [timestamp]                # or {columns: [source, timestamp], method: btree}
          partition_by: {column: timestamp, interval: month}
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, field_validator

from pipeline.sdk.config import Duration, Model
from pipeline.sdk.retry import Retry


class PostgresAdvanced(Model):
    """Rarely changed settings."""

    connect_timeout: Duration = Field(default=10.0, gt=0, description="Timeout to open one connection.")
    idle_in_transaction_timeout: Duration = Field(default=60.0, gt=0, description=(
        "Postgres ends a session of this task that stays idle inside a transaction this long (a worker "
        "paused or cut off mid-batch), releasing its locks so the worker that took over is not blocked. "
        "The ended batch is rolled back and re-applied from the checkpoint."))
    retry: Retry = Field(default_factory=lambda: Retry(initial_backoff=0.2, max_backoff=10.0), description=(
        "Retries while Postgres is unreachable or restarting (default here: from 200ms up to 10s, until the "
        "task is stopped); nothing is lost meanwhile."))
    work_mem: str = Field(default="64MB", pattern=r"^[1-9][0-9]*(kB|MB|GB)$", description=(
        "Postgres work_mem of this task's sessions: the batch is sorted by key in memory instead of "
        "spilling to disk (10,000 documents of 500 bytes need about 8MB)."))
    overlap: bool = Field(default=True, description=(
        "Load the next batch on a second connection while Postgres merges the previous one, committing "
        "them in order: `apply` then reports a batch durable on the next call (or at close), not at once. "
        "Off: each batch is committed before `apply` returns, one connection at a time."))
    sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        default=None, description="TLS mode as libpq names it; default: the DSN's, else prefer.")


class PostgresConfig(Model):
    """Where the database is, and the schema that holds the tables and `localflow_checkpoints`."""

    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// DSN, e.g. ${POSTGRES_URL:-}. When set it wins over host, port, user and database; a "
        "password in it wins over `password`. A secret: it may hold the password."))
    host: str = Field(default="127.0.0.1", description="Server host, e.g. ${POSTGRES_HOST:-127.0.0.1}.")
    port: int = Field(default=5432, ge=1, le=65535, description="Server port, e.g. ${POSTGRES_PORT:-5432}.")
    user: str = Field(default="postgres", description="Role to connect as, e.g. ${POSTGRES_USER:-postgres}.")
    password: SecretStr | None = Field(default=None, description="Secret, from ${POSTGRES_PASSWORD:-} only.")
    database: str = Field(default="postgres", description="Database name, e.g. ${POSTGRES_DB:-postgres}.")
    schema_: str = Field(default="public", alias="schema", description=(
        "Schema of the tables and of `localflow_checkpoints` (created if missing). Sophia: estuary."))
    pool_size: int = Field(default=4, ge=2, le=64, description=(
        "Connections per worker: batches use two (one loading while the other merges, see "
        "advanced.overlap); fencing on a rebalance and partition creation use others, so they never "
        "wait behind a batch."))
    advanced: PostgresAdvanced = Field(default_factory=PostgresAdvanced, description="Rarely changed settings.")

    @field_validator("url", "password", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and urlsplit(v.get_secret_value()).scheme not in ("postgres", "postgresql"):
            raise ValueError("url must start with postgresql:// or postgres:// (the value is not shown: "
                             "it may hold a password)")
        return v

    def where(self) -> str:
        """The server for messages and logs, never with its password."""
        if self.url is None:
            return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"
        parts = urlsplit(self.url.get_secret_value())
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"

    def secrets(self) -> list[str]:
        """Secret strings to scrub from any error text before it is shown."""
        out = [s.get_secret_value() for s in (self.url, self.password) if s is not None]
        return [s for s in [*out, *self._url_password()] if s]

    def _url_password(self) -> list[str]:
        """Passwords written in the DSN (user:password@ or ?password=)."""
        if self.url is None:
            return []
        parts = urlsplit(self.url.get_secret_value())
        return [p for p in [parts.password, *parse_qs(parts.query).get("password", [])] if p]

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments of asyncpg.connect / create_pool (they hold the password: never log them)."""
        opts: dict[str, Any] = {"timeout": self.advanced.connect_timeout}
        if self.url is not None:
            opts["dsn"] = self.url.get_secret_value()
        else:
            opts.update(host=self.host, port=self.port, user=self.user, database=self.database)
        if self.password is not None and not self._url_password():
            opts["password"] = self.password.get_secret_value()
        if self.advanced.sslmode is not None:
            opts["ssl"] = self.advanced.sslmode
        return opts


class Index(Model):
    """A secondary index on columns of the table (created if missing when the task opens)."""

    columns: list[str] = Field(min_length=1, description="Column names (top-level properties, or flow_published_at).",
                               examples=[["source", "timestamp"]])
    method: Literal["btree", "hash", "gin", "brin"] = Field(default="btree", description=(
        "Index method: btree for ranges and equality, gin for jsonb containment, brin for huge "
        "append-mostly time columns."))
    name: str | None = Field(default=None, description="Index name; default <table>_<columns>_idx.")


class Partitioning(Model):
    """Range partitions of the table by a date-time column, one per month or per day."""

    column: str = Field(description="A required, top-level `format: date-time` property of the collection.",
                        examples=["timestamp"])
    interval: Literal["month", "day"] = Field(default="month", description="Period of one partition.")
    ahead: int = Field(default=3, ge=0, le=400, description=(
        "Periods created ahead of the current one, so writes do not wait on DDL at a period's start. "
        "Periods of older or later data are created when such data arrives."))


class TableResource(Model):
    """The table one collection is materialized into."""

    table: str = Field(description="Table name in the endpoint's schema (quoted: case and characters are kept).",
                       examples=["sophia_agent_logs"])
    delta_updates: bool = Field(default=False, description=(
        "Append every document as a row (no primary key) instead of keeping the last one per key."))
    indexes: list[Index] = Field(default_factory=list, description=(
        "Secondary indexes; a bare column name is short for {columns: [name]}."))
    partition_by: Partitioning | None = Field(default=None, description=(
        "Range-partition the table by a date-time column. With upserts the primary key becomes "
        "(key, column), and a document whose column value changes moves its row."))

    @field_validator("indexes", mode="before", json_schema_input_type=list[Index | str])
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"columns": [i]} if isinstance(i, str) else i for i in v]
        return v
