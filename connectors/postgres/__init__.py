"""PostgreSQL materialization: one table per collection, exactly once (rows and offsets in one transaction).

Only the configuration models are imported here; the implementation loads in ``build``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.connector import Check, Connector, Problems

from .config import PostgresConfig, TableResource

if TYPE_CHECKING:
    from pipeline.catalog import Catalog
    from pipeline.task import TaskContext


def _build(ctx: TaskContext) -> Any:
    from .materialization import PostgresMaterialization

    return PostgresMaterialization(ctx)


def _check(catalog: Catalog, task: Any, place: str) -> Problems:
    from .checks import check

    return check(catalog, task, place)


async def _doctor(config: PostgresConfig) -> list[Check]:
    from .checks import doctor

    return await doctor(config)


CONNECTOR = Connector(name="postgres", kind="materialization", config=PostgresConfig, resource=TableResource,
                      build=_build, check=_check, doctor=_doctor)
