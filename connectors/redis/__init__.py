"""`redis`: keep the latest document per key in Redis, with an optional live stream per binding.

Last write wins per key, and replaying never makes a key older: each key remembers the Kafka
position of its value and a server-side script refuses an older one. Checkpoints and fences
live in Redis next to the data, written in the same atomic step (see ``materialization.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connectors.redis.config import RedisBinding, RedisConfig, check
from pipeline.connector import Check, Connector

if TYPE_CHECKING:
    from pipeline.task import TaskContext


def _build(ctx: TaskContext) -> Any:
    from connectors.redis.materialization import RedisMaterialization

    return RedisMaterialization(ctx)


async def _doctor(config: RedisConfig) -> list[Check]:
    from connectors.redis.materialization import doctor

    return await doctor(config)


CONNECTOR = Connector(
    name="redis",
    kind="materialization",
    config=RedisConfig,
    resource=RedisBinding,
    build=_build,
    check=check,
    doctor=_doctor,
)
