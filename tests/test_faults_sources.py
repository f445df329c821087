"""Fault trials of the Sophia pipeline's sources: the API and /metrics hang, reset connections and
answer slowly; nothing lost, nothing doubled (test_faults.py says how a trial judges).
"""

from __future__ import annotations

from tests.support.faults import Sophia, bad_input, pipeline_fixture
from tests.support.pipeline import CAPTURES
from tests.support.waiting import wait_for_async

sophia = pipeline_fixture()


async def test_source_that_hangs_delays_but_loses_nothing(sophia: Sophia) -> None:
    fed = sophia.fed
    with sophia.feeding():
        bad_input(sophia)
        await sophia.noticed(CAPTURES[0], "TimeoutError", lambda: sophia.sources.set_fault("hang"))
        sophia.sources.set_fault("")
    await sophia.trial("source", "API and /metrics hang (no answer) past the timeout", fed)


async def test_source_that_resets_connections_loses_nothing(sophia: Sophia) -> None:
    fed = sophia.fed
    sophia.sources.set_fault("reset")
    try:
        with sophia.feeding():
            bad_input(sophia)
            await wait_for_async(lambda: sophia.sources.faulted["reset"] >= 10, timeout=60,
                                 message="ten connections reset")
        await sophia.trial("source", "2 of 3 connections reset (RST) while feeding", fed)
    finally:
        sophia.sources.set_fault("")


async def test_source_that_answers_slowly_loses_nothing(sophia: Sophia) -> None:
    fed = sophia.fed
    sophia.sources.set_fault("slow")
    try:
        sophia.feed(60, 20)
        bad_input(sophia)
        await sophia.trial("source", f"every answer trickles in over {sophia.sources.slow_seconds}s", fed)
    finally:
        sophia.sources.set_fault("")


