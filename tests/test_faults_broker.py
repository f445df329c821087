"""Fault trial of the broker under the Sophia pipeline: Tansu restarted mid-stream, its topics and
group offsets on S3 storage; nothing lost, nothing doubled (test_faults.py says how a trial judges).

In `make chaos`, not `make test`: Tansu on S3 storage (moto) was seen to stop serving fetches of a
partition below its high watermark for minutes on a loaded 2-core machine, in the census's reads as
much as the pipeline's, which says nothing about localflow and would make the suite flaky.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.faults import Sophia, bad_input, pipeline_fixture

sophia = pipeline_fixture(durable_broker=True)  # the trial restarts the broker: its log on S3 storage


@pytest.mark.chaos
async def test_broker_restarted_mid_stream(sophia: Sophia) -> None:
    fed = sophia.fed
    with sophia.feeding():
        bad_input(sophia)
        await asyncio.sleep(1.0)  # mid-stream: documents are flowing through every stage
        sophia.infra.kafka.restart()
    await sophia.trial("broker", "Tansu restarted (topics and group offsets on S3)", fed)


