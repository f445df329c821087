"""The `files` checkpoint stays small whatever the number of rotations (the tailer, on real files).

Kafka refuses records over its message size (about 1 MiB by default): a checkpoint that grew
with every rotation would, after enough of them, fail every write. These tests drive the
tailer itself (the part that owns the state) through many rotations, no broker needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from connectors.files.config import FilesConfig, FilesResource
from connectors.files.tailer import Tailer
from pipeline.sdk.errors import CheckpointError

LOG = logging.getLogger("test_rotation_state")
KEEP = 5  # logrotate's `rotate 5`


def tailer(directory: Path, state: dict | None = None, **advanced: object) -> Tailer:
    config = FilesConfig(directory=str(directory), advanced=advanced)
    return Tailer(config, [FilesResource(globs=["*.log"])], state, LOG, "test/rotations")


def rotate(logs: Path) -> None:
    """logrotate's `create` scheme: agent.log -> agent.log.1 -> ... -> agent.log.5, the oldest deleted."""
    log = str(logs / "agent.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{log}.{KEEP}")
    for n in range(KEEP - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{log}.{n}", f"{log}.{n + 1}")
    os.rename(log, f"{log}.1")


def poll_all(t: Tailer) -> tuple[int, dict | None]:
    """Full scans until nothing is left to read: (documents, last state)."""
    documents, state = 0, None
    while True:
        item, more = t.poll(None)
        if item is not None:
            documents += len(item.documents)
            state = item.state if item.state is not None else state
        if not more:
            return documents, state


@pytest.fixture
def memory_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in /dev/shm when there is one: 50,000 renames cost seconds of journal on a disk."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="localflow-rotations-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_checkpoint_of_10000_rotations_stays_under_64_kib(memory_dir: Path) -> None:
    logs = memory_dir / "logs"
    logs.mkdir()
    t = tailer(logs)
    log = logs / "agent.log"
    captured, largest, state = 0, 0, None
    for r in range(10_000):
        # The same first line in every file: the worst case for keys (every file is `<head>.<n>`).
        with open(log, "w") as f:
            f.write(f"# agent log\nrotation {r} line 1\nrotation {r} line 2\n")
        for _ in range(2):  # read it and the rest of the rotated one; then retire the rotated one
            n, s = poll_all(t)
            captured += n
            if s is not None:
                state = s
                largest = max(largest, len(orjson.dumps(s)))
        rotate(logs)
    n, s = poll_all(t)
    captured += n
    size = len(orjson.dumps(s or state))
    print(f"\ncheckpoint after 10,000 rotations: {size} bytes "
          f"({len((s or state)['files'])} files); largest on the way: {largest} bytes")
    assert captured == 30_000
    assert largest < 64 * 1024


def test_checkpoint_over_the_size_limit_is_an_error_naming_the_capture(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(200):
        (logs / f"agent-{i:03d}.log").write_text(f"agent {i} started\n")
    t = tailer(logs, max_checkpoint_bytes=4096)
    with pytest.raises(CheckpointError) as e:
        poll_all(t)
    assert "capture 'test/rotations'" in str(e.value)
    assert "over advanced.max_checkpoint_bytes (4096)" in str(e.value)
    assert "it tracks 200 files" in str(e.value)


def test_checkpoint_is_written_only_when_it_changed(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "agent.log").write_text("one\ntwo\n")
    t = tailer(logs)
    assert poll_all(t)[1] is not None
    for _ in range(5):
        item, _ = t.poll(None)
        assert item is None  # idle: nothing to write


def test_version_1_checkpoint_resumes_at_its_offsets(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "agent.log").write_text("one\ntwo\nthree\n")
    probe = tailer(logs)
    head = next(iter(poll_all(probe)[1]["files"]))
    st = os.stat(logs / "agent.log")
    v1 = {"version": 1, "files": {f"{st.st_dev:x}-{st.st_ino:x}-{head}": {"path": "agent.log", "offset": 8},
                                  f"1-2-{'0' * 16}": {"path": "old.log", "offset": 5, "gone": 1.0}}}
    t = tailer(logs, v1)
    item, _ = t.poll(None)
    assert [d["data"]["message"] for _, d in item.documents] == ["three"]
    assert [d["metadata"]["id"] for _, d in item.documents] == [f"{head}:8"]
    assert list(item.state["files"]) == [head]
