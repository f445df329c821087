"""The `files` capture on real files (written while it runs) and the real broker.

Each test runs the capture task as production does (`supervise`, or a separate process for
kill -9), writes, renames and truncates files in a temp directory, and reads the collection
back: every line lands once under a key made of the file's fingerprint and the line's offset.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from connectors.files.parse import parse_line
from tests.support.files import Flow, write_lines
from tests.support.tasks import running
from tests.support.waiting import wait_for_async
from tests.support.workers import task_worker

ROOT = Path(__file__).resolve().parent.parent
ID = re.compile(r"^[0-9a-f]{16}(\.\d+)?:\d+$")


@pytest.fixture
def flow(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> Flow:
    f = Flow(tmp_path, kafka_bootstrap, f"files/{unique_name('cap')}", f"files/{unique_name()}")
    f.logs.mkdir()
    return f


async def wait_for_messages(flow: Flow, count: int, within: float = 60) -> list[str]:
    return await wait_for_async(lambda: _at_least(flow, count), timeout=within, interval=0.2,
                                message=f"{count} documents in {flow.collection}")


async def _at_least(flow: Flow, count: int) -> list[str] | None:
    messages = await flow.messages()
    return messages if len(messages) >= count else None


async def wait_for_checkpoint(flow: Flow, predicate: Callable[[dict], bool] = bool) -> dict:
    async def saved() -> dict | None:
        state = await flow.checkpoint()
        return state if state is not None and predicate(state) else None

    return await wait_for_async(saved, timeout=60, interval=0.2, message=f"a checkpoint of {flow.task}")


async def test_json_and_plain_lines_become_raw_documents(flow: Flow) -> None:
    log = flow.logs / "agent.log"
    write_lines(log, [
        '{"timestamp": "2026-11-28T10:00:00+01:00", "level": "info", "msg": "json line", "agent": "a1"}',
        "2026-11-28 10:00:01,250 ERROR agent a2 crashed",
        "[WARN] disk almost full",
        "ts=now level=debug msg=probe",
        "no level here",
    ])
    async with running(flow.catalog(), flow.task, check_errors=True):
        await wait_for_messages(flow, 5)
    docs = await flow.documents()

    assert [d["data"] for d in docs] == [
        {"timestamp": "2026-11-28T10:00:00+01:00", "level": "info", "msg": "json line", "agent": "a1"},
        {"message": "2026-11-28 10:00:01,250 ERROR agent a2 crashed", "level": "error"},
        {"message": "[WARN] disk almost full", "level": "warning"},
        {"message": "ts=now level=debug msg=probe", "level": "debug"},
        {"message": "no level here"},
    ]
    assert [d["timestamp"] for d in docs[:3]] == [
        "2026-11-28T09:00:00Z", "2026-11-28T10:00:01.250000Z", "2026-11-28T10:00:01.250000Z"]
    offsets = [0]
    for line in log.read_bytes().splitlines(keepends=True)[:-1]:
        offsets.append(offsets[-1] + len(line))
    assert [d["metadata"]["offset"] for d in docs] == offsets
    assert all(d["metadata"]["path"] == str(log) and d["source"] == "file:agent.log" for d in docs)
    assert all(ID.match(d["metadata"]["id"]) and d["metadata"]["id"].endswith(f":{d['metadata']['offset']}")
               for d in docs)


async def test_partial_last_line_is_held_until_its_newline(flow: Flow) -> None:
    log = flow.logs / "agent.log"
    log.write_text("first\nsecond, still being writ")
    async with running(flow.catalog(), flow.task, check_errors=True):
        await wait_for_checkpoint(flow, lambda s: any(e["offset"] == 6 for e in s["files"].values()))
        with log.open("a") as f:
            f.write("ten\nthird\n")
        messages = await wait_for_messages(flow, 3)
    assert messages == ["first", "second, still being written", "third"]


async def test_periodic_rescan_finds_lines_without_file_events(flow: Flow) -> None:
    catalog = flow.catalog(globs=["**/*.log"], interval="300ms", advanced={"watch": False})
    async with running(catalog, flow.task, check_errors=True):
        await wait_for_checkpoint(flow)
        write_lines(flow.logs / "agent.log", ["found by the rescan"])
        (flow.logs / "sub").mkdir()
        write_lines(flow.logs / "sub" / "deeper.log", ["also found"])
        messages = await wait_for_messages(flow, 2)
    assert sorted(messages) == ["also found", "found by the rescan"]


async def test_rename_rotation_finishes_the_old_file_then_reads_the_new_one(flow: Flow) -> None:
    log = flow.logs / "agent.log"
    async with running(flow.catalog(globs=["*.log"]), flow.task, check_errors=True):
        with log.open("a") as writer:  # the agent's open file, kept across the rotation
            writer.write("old 1\nold 2\n")
            writer.flush()
            await wait_for_messages(flow, 2)
            log.rename(flow.logs / "agent.log.1")  # out of the glob, as logrotate names it
            writer.write("old 3, written after the rename\n")
            writer.flush()
        write_lines(log, ["new 1", "new 2"])
        messages = await wait_for_messages(flow, 5)
    assert messages == ["old 1", "old 2", "old 3, written after the rename", "new 1", "new 2"]
    assert len({d["metadata"]["id"] for d in await flow.documents()}) == 5


async def test_fast_rename_rotation_with_deletion_loses_no_line(flow: Flow) -> None:
    log, total, per_file, keep = flow.logs / "agent.log", 8000, 1600, 2

    def rotate() -> None:  # agent.log -> agent.log.1 -> agent.log.2; the oldest is deleted
        (flow.logs / f"agent.log.{keep}").unlink(missing_ok=True)
        for n in range(keep - 1, 0, -1):
            if (flow.logs / f"agent.log.{n}").exists():
                (flow.logs / f"agent.log.{n}").rename(flow.logs / f"agent.log.{n + 1}")
        log.rename(flow.logs / "agent.log.1")

    async with running(flow.catalog(globs=["*.log"]), flow.task, check_errors=True):
        for start in range(0, total, 80):  # about 800 lines a second, a new file every 2 seconds
            if start and start % per_file == 0:
                rotate()
            write_lines(log, [f"line {i:05d} " + "x" * 80 for i in range(start, start + 80)])
            await asyncio.sleep(0.1)
        messages = await wait_for_messages(flow, total)
    assert sorted(m[:10] for m in messages) == [f"line {i:05d}" for i in range(total)]


async def test_copytruncate_reads_the_file_again_from_zero_under_new_keys(flow: Flow) -> None:
    log = flow.logs / "agent.log"
    header = "# sophia agent log"  # same first line after the truncation: same fingerprint
    write_lines(log, [header, "before 1", "before 2", "before 3"])
    async with running(flow.catalog(), flow.task, check_errors=True):
        await wait_for_messages(flow, 4)
        shutil.copy(log, flow.logs / "agent.log.1")
        with log.open("r+") as f:
            f.truncate(0)
        write_lines(log, [header, "after 1"])
        messages = await wait_for_messages(flow, 6)
    assert messages == [header, "before 1", "before 2", "before 3", header, "after 1"]
    assert len({d["metadata"]["id"] for d in await flow.documents()}) == 6


async def test_file_that_vanishes_and_reappears_resumes_at_its_offset(flow: Flow, tmp_path: Path) -> None:
    log = flow.logs / "agent.log"
    write_lines(log, ["line 1", "line 2"])
    async with running(flow.catalog(), flow.task, check_errors=True):
        await wait_for_messages(flow, 2)
        away = tmp_path / "elsewhere.log"
        log.rename(away)
        await wait_for_checkpoint(flow, lambda s: all("retired" in e for e in s["files"].values()))
        write_lines(away, ["line 3, written while away"])
        away.rename(log)
        write_lines(log, ["line 4"])
        messages = await wait_for_messages(flow, 4)
    assert messages == ["line 1", "line 2", "line 3, written while away", "line 4"]


async def test_start_at_end_skips_history_but_not_new_lines_or_new_files(flow: Flow) -> None:
    write_lines(flow.logs / "old.log", ["history 1", "history 2"])
    async with running(flow.catalog(start_at="end"), flow.task, check_errors=True):
        await wait_for_checkpoint(flow)
        write_lines(flow.logs / "old.log", ["appended"])
        write_lines(flow.logs / "new.log", ["new file 1", "new file 2"])
        messages = await wait_for_messages(flow, 3)
    assert sorted(messages) == ["appended", "new file 1", "new file 2"]


async def test_line_over_max_line_bytes_is_a_dead_letter_and_reading_goes_on(flow: Flow) -> None:
    log = flow.logs / "agent.log"
    write_lines(log, ["before", "x" * 5000, "after"])
    async with running(flow.catalog(max_line_bytes=1000), flow.task, check_errors=True):
        messages = await wait_for_messages(flow, 2)
        dead = await wait_for_async(flow.dead_letters, timeout=30, message="a dead letter")
    assert messages == ["before", "after"]
    assert len(dead) == 1
    assert f"{log}:7: line of 5000 bytes is longer than max_line_bytes (1000)" in dead[0]["error"]
    assert dead[0]["original"].startswith("xxx")


async def test_invalid_utf8_is_kept_with_replacement_characters(flow: Flow) -> None:
    (flow.logs / "agent.log").write_bytes(b"caf\xe9 ERROR\nok\n")
    async with running(flow.catalog(), flow.task, check_errors=True):
        messages = await wait_for_messages(flow, 2)
    assert messages == ["caf\ufffd ERROR", "ok"]


async def test_symlink_out_of_the_directory_is_not_read(flow: Flow, tmp_path: Path) -> None:
    secret = tmp_path / "secret.log"
    write_lines(secret, ["outside the directory"])
    (flow.logs / "escape.log").symlink_to(secret)
    (flow.logs / "sub").mkdir()
    (tmp_path / "outside_dir").mkdir()
    write_lines(tmp_path / "outside_dir" / "deep.log", ["behind a directory link"])
    (flow.logs / "sub" / "linked").symlink_to(tmp_path / "outside_dir")
    write_lines(flow.logs / "inside.log", ["inside 1"])
    async with running(flow.catalog(globs=["**/*.log"]), flow.task, check_errors=True):
        await wait_for_messages(flow, 1)
        write_lines(secret, ["more outside"])
        write_lines(tmp_path / "outside_dir" / "deep.log", ["more behind the link"])  # an event, via the link
        write_lines(flow.logs / "inside.log", ["inside 2"])  # its event comes after those
        await wait_for_messages(flow, 2)
    assert await flow.messages() == ["inside 1", "inside 2"]


async def test_thousand_files_are_all_read_with_few_open_files(flow: Flow) -> None:
    names = [f"agent-{i:04d}.log" for i in range(1000)]
    for name in names[:500]:
        write_lines(flow.logs / name, [f"{name} a", f"{name} b"])
    open_fds: list[int] = []

    async def sample() -> None:
        while True:
            open_fds.append(len(os.listdir("/proc/self/fd")))
            await asyncio.sleep(0.01)

    before = len(os.listdir("/proc/self/fd"))
    sampler = asyncio.create_task(sample())
    try:
        async with running(flow.catalog(advanced={"max_open_files": 32}), flow.task, check_errors=True):
            for name in names[500:]:
                write_lines(flow.logs / name, [f"{name} a"])
            for name in names:
                write_lines(flow.logs / name, [f"{name} c"])
            messages = await wait_for_messages(flow, 2500, within=120)
    finally:
        sampler.cancel()
    assert Counter(m.split()[0] for m in messages) == {n: 3 if n in names[:500] else 2 for n in names}
    assert len(messages) == 2500
    assert max(open_fds) - before < 200  # a bounded set of descriptors, not one per file


async def test_restart_resumes_from_the_checkpoint_without_duplicates(flow: Flow) -> None:
    log = flow.logs / "agent.log"
    write_lines(log, [f"first run {i}" for i in range(10)])
    async with running(flow.catalog(), flow.task, check_errors=True):
        await wait_for_messages(flow, 10)
    write_lines(log, [f"while stopped {i}" for i in range(10)])
    async with running(flow.catalog(), flow.task, check_errors=True):
        write_lines(log, [f"second run {i}" for i in range(10)])
        messages = await wait_for_messages(flow, 30)
    assert messages == ([f"first run {i}" for i in range(10)] + [f"while stopped {i}" for i in range(10)]
                        + [f"second run {i}" for i in range(10)])


async def test_kill_9_mid_stream_resends_at_most_the_last_batch_with_the_same_keys(flow: Flow) -> None:
    batch, total = 200, 20_000
    catalog = flow.catalog(advanced={"batch_lines": batch})
    log = flow.logs / "agent.log"
    with task_worker(flow.root / "flow.yaml", flow.task, flow.root / "worker.log") as proc:
        written = 0
        while written < total:
            write_lines(log, [f"line {i:06d} " + "x" * 40 for i in range(written, written + 500)])
            written += 500
            if written == 5000:
                await wait_for_messages(flow, 2000)
                proc.kill()  # mid-stream: lines are still being read and written
            await asyncio.sleep(0.005)  # a steady writer, not one burst
    before_restart = len(await flow.messages())
    assert before_restart < total, "the kill should have come mid-stream"

    async with running(catalog, flow.task, check_errors=True):
        await wait_for_async(lambda: _distinct_keys(flow, total), timeout=120, interval=0.3,
                             message=f"{total} distinct keys")
    docs = await flow.documents()
    by_key: dict[str, list[dict]] = defaultdict(list)
    for d in docs:
        by_key[d["metadata"]["id"]].append(d)
    assert sorted(d[0]["data"]["message"][:11] for d in by_key.values()) == [f"line {i:06d}" for i in range(total)]
    duplicated = sorted(k for k, ds in by_key.items() if len(ds) > 1)
    assert len(docs) - len(by_key) == len(duplicated) <= batch
    assert all(len({(d["data"]["message"], d["metadata"]["offset"]) for d in by_key[k]}) == 1 for k in duplicated)
    if duplicated:  # one contiguous run of lines: the batch whose checkpoint the kill prevented
        offsets = sorted(by_key[k][0]["metadata"]["offset"] for k in duplicated)
        between = [k for k, ds in by_key.items() if offsets[0] <= ds[0]["metadata"]["offset"] <= offsets[-1]]
        assert len(between) == len(duplicated)


async def _distinct_keys(flow: Flow, count: int) -> bool:
    return len({d["metadata"]["id"] for d in await flow.documents()}) >= count


@pytest.mark.parametrize(("written", "kept"), [
    ("2026-11-28T10:00:00Z", "2026-11-28T10:00:00Z"),
    ("2026-11-28T10:00:00.123456Z", "2026-11-28T10:00:00.123456Z"),  # already as localflow writes it
    ("2026-11-28T10:00:00.25Z", "2026-11-28T10:00:00.250000Z"),
    ("2026-11-28T10:00:00.000Z", "2026-11-28T10:00:00Z"),
    ("2026-11-28T10:00:00.1234567Z", "2026-11-28T10:00:00.123456Z"),  # the general path: to microseconds
    ("2026-11-28T11:00:00+01:00", "2026-11-28T10:00:00Z"),
    ("2026-02-30T10:00:00Z", None),  # no such day: not a timestamp
    ("2026-11-28T10:00:00.12a4Z", None),
])
def test_a_json_lines_timestamp_becomes_rfc3339_utc_or_is_not_one(written: str, kept: str | None) -> None:
    data, ts = parse_line(b'{"timestamp": "%s", "msg": "m"}' % written.encode())
    assert ts == kept
    assert data["timestamp"] == written
