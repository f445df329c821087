"""A log file is known by its content: inode reuse, another device, rotated copies (Python only).

The capture runs as production runs it, on the real broker; files are written, deleted,
copied and compressed between its runs. Every line must be in the collection under exactly
one key.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.files import Flow, write_lines
from tests.support.tasks import running
from tests.support.waiting import wait_for_async

HEADER = "# sophia agent log v1"  # every file starts with it: the same head, told apart by content


@pytest.fixture
def flow(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> Flow:
    f = Flow(tmp_path, kafka_bootstrap, f"identity/{unique_name('cap')}", f"identity/{unique_name()}")
    f.logs.mkdir()
    return f


async def keys_by_message(flow: Flow) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = defaultdict(set)
    for d in await flow.documents():
        keys[d["data"]["message"]].add(d["metadata"]["id"])
    return keys


async def capture_until(flow: Flow, expected: list[str], **catalog: object) -> dict[str, set[str]]:
    """Run the capture until every expected line is in; then every line once, under one key."""
    async def arrived() -> dict[str, set[str]] | None:
        keys = await keys_by_message(flow)
        return keys if set(expected) <= set(keys) else None

    async with running(flow.catalog(interval="300ms", **catalog), flow.task, check_errors=True):
        keys = await wait_for_async(arrived, timeout=60, interval=0.2, message=f"{len(expected)} lines")
        await wait_for_async(lambda: _checkpointed(flow), timeout=30, interval=0.2, message="a checkpoint")
    keys = await keys_by_message(flow)
    return keys


async def _checkpointed(flow: Flow) -> bool:
    return await flow.checkpoint() is not None


def lines(prefix: str, n: int) -> list[str]:
    return [f"{prefix} {i:03d} " + "y" * 40 for i in range(n)]


def assert_once(keys: dict[str, set[str]], expected: list[str]) -> None:
    assert sorted(keys) == sorted(expected), "lost or unexpected lines"
    doubled = {m: ks for m, ks in keys.items() if len(ks) > 1}
    assert doubled == {}
    assert len({k for ks in keys.values() for k in ks}) == len(expected)


async def test_deleted_file_recreated_on_its_inode_with_the_same_first_line_is_read_from_0(flow: Flow) -> None:
    log = flow.logs / "agent.log"
    old = [HEADER] + lines("old", 20)
    write_lines(log, old)
    await capture_until(flow, old)
    inode = log.stat().st_ino
    log.unlink()  # while the capture is down; ext4 gives the next file the freed inode
    new = [HEADER] + lines("new", 40)  # longer than the old file: its old offset lies inside the new content
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o644)
    if os.fstat(fd).st_ino != inode:  # another file system: rewriting the old inode in place looks the same
        os.close(fd)
        fd = os.open(log, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in new))
    keys = await capture_until(flow, old + new)
    assert_once_allowing_header(keys, old, new)


def assert_once_allowing_header(keys: dict[str, set[str]], old: list[str], new: list[str]) -> None:
    """Both files start with HEADER: it is two lines, under two keys; every other line once."""
    assert len(keys.pop(HEADER)) == 2
    assert_once(keys, old[1:] + new[1:])


async def test_directory_copied_to_another_device_resumes_under_the_same_keys(
        flow: Flow, unique_name: Callable[..., str]) -> None:
    first = lines("first", 30)
    write_lines(flow.logs / "agent.log", first)
    worker = [HEADER] + lines("worker", 5)
    write_lines(flow.logs / "worker.log", worker)
    before = await capture_until(flow, first + worker)
    shm = Path("/dev/shm") / unique_name("logs")
    shutil.copytree(flow.logs, shm)  # new device, new inodes, same content
    try:
        assert os.stat(shm).st_dev != os.stat(flow.logs).st_dev
        later = lines("later", 10)
        write_lines(shm / "agent.log", later)
        keys = await capture_until(flow, first + later + worker, directory=str(shm))
        assert_once(keys, first + later + worker)
        assert {m: keys[m] for m in before} == before  # the copy's lines kept the keys they had
    finally:
        shutil.rmtree(shm)


async def test_rotated_copies_are_never_read_as_new_files(flow: Flow) -> None:
    write_lines(flow.logs / "agent.log", ["active 1"])
    write_lines(flow.logs / "agent.log.1", ["rotated 1"])
    with gzip.open(flow.logs / "agent.log.2.gz", "wt") as f:
        f.write("rotated 2\n")
    write_lines(flow.logs / "agent.log-20261130", ["rotated by date"])
    keys = await capture_until(flow, ["active 1"], globs=["*"])
    assert sorted(keys) == ["active 1"]


async def test_rest_of_a_file_is_read_from_its_gzip_copy_after_a_restart(flow: Flow) -> None:
    log = flow.logs / "agent.log"
    first = lines("first", 50)
    write_lines(log, first)
    await capture_until(flow, first)
    rest = lines("rest", 50)
    write_lines(log, rest)  # written while the capture is down, then rotated and compressed
    with log.open("rb") as src, gzip.open(flow.logs / "agent.log.1.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    log.unlink()
    after = lines("after", 5)
    write_lines(log, after)
    keys = await capture_until(flow, first + rest + after)
    assert_once(keys, first + rest + after)



async def test_copytruncate_while_down_reads_the_rest_from_the_copy_then_the_new_file(flow: Flow) -> None:
    log = flow.logs / "agent.log"
    first = [HEADER] + lines("first", 30)
    write_lines(log, first)
    await capture_until(flow, first)
    rest = lines("rest", 30)
    write_lines(log, rest)  # while the capture is down; then copytruncate, and the writer goes on
    shutil.copy(log, flow.logs / "agent.log.1")
    with log.open("r+") as f:
        f.truncate(0)
    after = [HEADER] + lines("after", 70)  # the same first line, and longer than the old offset
    write_lines(log, after)
    keys = await capture_until(flow, first + rest + after)
    assert_once_allowing_header(keys, first + rest, after)
