"""Fault trials of the servers under the Sophia pipeline: Postgres, Redis and S3 go away
mid-stream and come back; nothing lost, nothing doubled (test_faults.py says how a trial judges).
"""

from __future__ import annotations

from tests.support.faults import Sophia, _wait_rows, bad_input, pipeline_fixture
from tests.support.pipeline import POSTGRES, REDIS, S3

sophia = pipeline_fixture()


async def test_postgres_killed_and_restarted_mid_stream(sophia: Sophia) -> None:
    fed = sophia.fed
    with sophia.feeding():
        bad_input(sophia)
        await _wait_rows(sophia, lambda n: n > 0, "Postgres to hold rows")
        await sophia.noticed(POSTGRES, "retrying in", sophia.ends.postgres.kill)
        sophia.ends.postgres.start()
    await sophia.trial("postgres", "kill -9 of the server, start again once the task saw it", fed)


async def test_redis_restarted_empty_mid_stream_is_rebuilt_from_the_collections(sophia: Sophia) -> None:
    fed = sophia.fed
    with sophia.feeding():
        bad_input(sophia)
        await sophia.noticed(REDIS, "retrying with backoff", sophia.ends.redis.kill)
        sophia.ends.redis.start()  # no persistence: it comes back empty
    await sophia.trial("redis", "kill -9 of the server; it restarts empty", fed)


async def test_s3_server_down_and_back_mid_stream(sophia: Sophia) -> None:
    fed = sophia.fed
    with sophia.feeding():
        bad_input(sophia)
        await sophia.noticed(S3, "unavailable while", sophia.proxy.down)
        sophia.proxy.up()
    await sophia.trial("s3", "server unreachable (refused, open connections reset), then back", fed)
