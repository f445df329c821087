"""Fault trial of the broker under the Sophia pipeline: Tansu restarted mid-stream, its topics and
group offsets on S3 storage; nothing lost, nothing doubled (test_faults.py says how a trial judges).

In `make chaos`, not `make test`: Tansu on S3 storage (moto) was seen to stop serving fetches of a
partition below its high watermark for minutes on a loaded 2-core machine, in the census's reads as
much as the pipeline's, which says nothing about localflow and would make the suite flaky.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.faults_support import Sophia, bad_input, open_sophia


@pytest.fixture(scope="module")
async def sophia(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> AsyncIterator[Sophia]:
    """This module's own pipeline, its broker durable (on S3 storage): the trial restarts it."""
    async with open_sophia(tmp_path_factory, request, durable_broker=True) as running:
        yield running


@pytest.mark.chaos
async def test_broker_restarted_mid_stream(sophia: Sophia) -> None:
    fed = sophia.fed
    with sophia.feeding():
        bad_input(sophia)
        await asyncio.sleep(1.0)  # mid-stream: documents are flowing through every stage
        sophia.infra.kafka.restart()
    await sophia.trial("broker", "Tansu restarted (topics and group offsets on S3)", fed)


