"""S3 archive materialization: collections batched into compressed JSON-lines objects.

Only the config models are imported here (the registry imports every connector to list them);
the implementation is imported inside ``build`` and ``doctor``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connectors.s3.config import S3Config, S3Resource
from pipeline.connector import Check, Connector

if TYPE_CHECKING:
    from pipeline.task import TaskContext


def _build(ctx: TaskContext) -> Any:
    from connectors.s3.materialization import S3Materialization

    return S3Materialization(ctx)


async def _doctor(config: S3Config) -> list[Check]:
    from connectors.s3.client import doctor

    return await doctor(config)


CONNECTOR = Connector(
    name="s3",
    kind="materialization",
    config=S3Config,
    resource=S3Resource,
    build=_build,
    doctor=_doctor,
)
