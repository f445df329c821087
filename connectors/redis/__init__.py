"""`redis`: keep the latest document per key in Redis, with an optional live stream per binding.

Last write wins per key, and replaying never makes a key older: each key remembers the Kafka
position of its value and a server-side script refuses an older one. Checkpoints and fences
live in Redis next to the data, written in the same atomic step (see ``materialization.py``).
"""

from __future__ import annotations

from connectors.redis.config import RedisBinding, RedisConfig, check
from pipeline.sdk.connector import Connector

CONNECTOR = Connector(
    name="redis",
    kind="materialization",
    config=RedisConfig,
    resource=RedisBinding,
    build="connectors.redis.materialization:RedisMaterialization",
    check=check,
    doctor="connectors.redis.materialization:doctor",
)
