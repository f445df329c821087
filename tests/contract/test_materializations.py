"""Every registered materialization against its contract (pipeline/sdk/materialization.py), driven
in-process on the session's real servers: fencing, resume after a crash, replay, dead letters,
the flush on close, and secrets kept out of the doctor's and the live view's output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from pipeline.runtime.collection import read_to_end
from pipeline.runtime.registry import load_connector
from pipeline.sdk.errors import Fenced
from tests.contract.conftest import SECRET, TASK, Endpoint
from tests.support.waiting import wait_for_async
from tests.support.workers import READER, task_worker
from tests.support.writing import produce


def doc(id_: str, v: int) -> dict[str, object]:
    return {"id": id_, "v": v}


async def test_a_replaced_worker_is_fenced_and_writes_nothing(materialization: Callable[..., Endpoint]) -> None:
    e = materialization()
    old, new = await e.started(), await e.started()
    try:
        assert await old.assigned({e.tp}) == {e.tp: None}
        await old.apply(e.batch((0, doc("k", 1)), (1, doc("k", 2))))
        assert await new.assigned({e.tp}) == {e.tp: 2}  # the new owner resumes where the old one stopped

        with pytest.raises(Fenced):
            await old.apply(e.batch((2, doc("k", 3)), (3, doc("zombie", 1))))
        assert await e.held() == {"k": doc("k", 2)}
    finally:
        await old.close(failed=True)
        await new.close(failed=True)


async def test_resume_after_a_crash_loses_nothing(materialization: Callable[..., Endpoint]) -> None:
    e = materialization()
    first = await e.started()
    await first.assigned({e.tp})
    await first.apply(e.batch(*[(i, doc(f"d{i}", i)) for i in range(5)]))
    await first.close(failed=True)  # kill -9: what was buffered is gone, the stored offset says so

    second = await e.started()
    start = (await second.assigned({e.tp}))[e.tp] or 0
    assert start <= 5
    await second.apply(e.batch(*[(i, doc(f"d{i}", i)) for i in range(start, 8)]))
    await second.close(failed=False)
    assert await e.held() == {f"d{i}": doc(f"d{i}", i) for i in range(8)}
    third = await e.started()
    assert await third.assigned({e.tp}) == {e.tp: 8}
    await third.close(failed=True)


async def test_replay_from_an_earlier_offset_never_makes_a_key_older(materialization: Callable[..., Endpoint]) -> None:
    e = materialization()
    m = await e.started()
    await m.assigned({e.tp})
    await m.apply(e.batch((0, doc("k", 1))))
    await m.apply(e.batch((1, doc("k", 2))))
    await m.close(failed=False)

    replaying = await e.started()
    await replaying.assigned({e.tp})
    # offset 1 again, now with a key the endpoint never had (the topic was refilled): a replay applies it
    await replaying.apply(e.batch((0, doc("k", 1)), (1, doc("j", 1)), reapply=True))
    await replaying.close(failed=False)
    held = await e.held()
    assert held["k"] == doc("k", 2)
    if e.profile.reapplies:
        assert held.get("j") == doc("j", 1), "a replay re-applies records below the stored offset (Batch.reapply)"


@pytest.mark.parametrize("poison", ["not JSON", "refused by the endpoint"])
async def test_a_poison_document_is_dead_lettered_and_the_batch_goes_on(
        materialization: Callable[..., Endpoint], poison: str) -> None:
    e = materialization()
    bad: bytes | dict[str, object] | None = b"not json" if poison == "not JSON" else e.profile.refused
    if bad is None:
        pytest.skip(f"{e.connector} holds every valid document (its profile names none it refuses)")
    ctx = e.context()
    m = await e.started(ctx)
    try:
        await m.assigned({e.tp})
        applied = await m.apply(e.batch((0, doc("a", 1)), (1, bad), (2, doc("b", 1))))
        applied.dead += (await m.close(failed=False)).dead
    finally:
        await ctx.aclose()
    assert applied.dead == 1
    assert await e.held() == {"a": doc("a", 1), "b": doc("b", 1)}
    [letter] = await read_to_end(e.catalog.kafka, ctx.collection(e.collection).dead_topic, timeout=60)
    original = orjson.loads(letter.value)["original"]
    assert original == "not json" if isinstance(bad, bytes) else orjson.loads(original) == bad


async def test_close_flushes_what_is_buffered(materialization: Callable[..., Endpoint]) -> None:
    e = materialization(buffered=True)
    m = await e.started()
    await m.assigned({e.tp})
    await m.apply(e.batch(*[(i, doc(f"d{i}", i)) for i in range(3)]))
    closed = await m.close(failed=False)
    assert await e.held() == {f"d{i}": doc(f"d{i}", i) for i in range(3)}
    again = await e.started()
    assert await again.assigned({e.tp}) == {e.tp: 3}, f"close returned {closed}"
    await again.close(failed=True)


async def test_doctor_and_live_view_and_query_hint_never_show_the_secret(materialization: Callable[..., Endpoint],
                                                         unique_name: Callable[..., str]) -> None:
    e = materialization()
    connector = load_connector(e.connector)
    config = connector.config.model_validate(e.profile.secret(e.servers, unique_name("c", sep="-")))
    shown: list[str] = []
    if connector.doctor is not None:
        shown += [f"{c.name} {c.detail}" for c in await connector.doctor(config)]
    if connector.describe is not None:
        resource = connector.resource.model_validate(e.resource)
        described = connector.describe(config, resource, e.collection)
        shown += [described.label, described.query or ""]
        try:
            shown.append(str(await described.count()))
        except Exception as error:  # noqa: BLE001 - the wrong password fails; its message must not show it
            shown.append(f"{error!r} {error}")
        if described.close is not None:
            await described.close()
    assert shown, f"{e.connector} has neither doctor nor describe"
    assert not [line for line in shown if SECRET in line], TASK


async def test_a_worker_killed_with_sigkill_resumes_with_nothing_lost(
        materialization: Callable[..., Endpoint], tmp_path: Path) -> None:
    """The real thing behind the crash test above: the task as its own process, a record per batch,
    SIGKILLed between the batches it has made durable and those it has not, then started again; the
    endpoint ends up holding every document, each at its last value."""
    e = materialization()
    # 200 batches before the kill: a fast endpoint applies one in about a millisecond, so fewer (60 were)
    # could all be durable before the first poll sees any.
    first, second = [doc(f"d{i}", i) for i in range(200)], [doc(f"d{i}", 1000 + i) for i in range(170, 230)]
    await produce(e.catalog, e.collection, first)
    options = {"reader": {**READER, "max_records": 1}}
    with task_worker(e.catalog.path, TASK, tmp_path / "killed.log", options=options) as w:
        at_kill = await wait_for_async(e.held, timeout=120, interval=0.01,
                                       message="the first worker to write something")
        w.kill()
    assert 0 < len(at_kill) < len(first), f"killed after {len(at_kill)} of {len(first)}: not mid-stream"
    await produce(e.catalog, e.collection, second)
    expected = {d["id"]: d for d in first + second}
    with task_worker(e.catalog.path, TASK, tmp_path / "resumed.log", options=options) as w:
        async def complete() -> bool:
            return await e.held() == expected

        await wait_for_async(complete, timeout=180, message=f"all {len(expected)} documents at their last value")
        w.assert_exit(w.stop())
