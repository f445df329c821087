"""PostgreSQL materialization: one table per collection, exactly once (rows and offsets in one transaction).

Only the configuration models are imported here; the implementation loads in ``build``.
"""

from __future__ import annotations

from pipeline.sdk.connector import Connector

from .config import PostgresConfig, TableResource

CONNECTOR = Connector(
    name="postgres",
    kind="materialization",
    config=PostgresConfig,
    resource=TableResource,
    build="connectors.postgres.materialization:PostgresMaterialization",
    check="connectors.postgres.checks:check",
    doctor="connectors.postgres.checks:doctor",
)
