"""The synchronous core of the `files` capture: find files, know them by fingerprint, read lines.

Identity. A file is known by its fingerprint, ``<dev>-<inode>-<hash>``: device and inode, plus
a hash of its head, the first ``fingerprint_bytes`` bytes cut after the first newline (Vector's
checkpointer does the same with its first line). The head of an append-only file never
changes, so the fingerprint survives renames (rotation), while a reused inode or a file
rewritten in place gets a new one. A file whose first line is still incomplete (and shorter
than ``fingerprint_bytes``) is not read yet: it has no complete line to give anyway.

Checkpoint (JSON, versioned): ``{"version": 1, "files": {fingerprint: {"path", "offset", ...}}}``.
``offset`` is the byte after the last complete line handed out; ``epoch`` counts truncations
in place (``copytruncate`` that kept the head); ``ts`` is the last timestamp read from the
file, inherited by lines without one; ``gone`` is when the file stopped being found, and
entries gone longer than ``forget_after`` are dropped.

Each document's ``metadata.id`` is ``<fingerprint>:<offset>`` (``<fingerprint>.<epoch>:<offset>``
after a truncation in place): re-reading from a checkpoint yields the same keys. Its
``timestamp`` is the line's own (see ``parse``), else the last one seen earlier in the file
(kept in the checkpoint, so a re-read yields the same), else the file's mtime when read.
Blank lines are skipped.

Limits, as in every tailer: a ``copytruncate`` whose new content outgrows the old offset before
a rescan sees it is missed, and lines written between the copy and the truncation are lost;
keep the copies (``agent.log.1``) out of the globs, or they are read as new files.

Lifecycle of a known file: *live* (a glob finds it); *orphan* (no longer found under its
path: renamed out of the globs, deleted, or replaced by a new file at its path), read to its
end first, through a still-open descriptor or found again by inode in its directory; *gone*
once an orphan is at its end on two full rescans in a row, or cannot be reached.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.files.config import FilesConfig
from connectors.files.parse import format_utc, parse_line
from connectors.files.reading import OpenFiles, fingerprint, glob_regex, last_line_end, read_lines
from pipeline.capture import Captured
from pipeline.errors import CheckpointError

_BOM = b"\xef\xbb\xbf"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


# ---------------------------------------------------------------------------- checkpoint


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    offset: int = Field(ge=0)
    epoch: int = Field(default=0, ge=0)
    ts: str | None = None
    gone: float | None = None


class FilesState(BaseModel):
    """The checkpoint of a `files` capture (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    files: dict[str, FileEntry]


# ---------------------------------------------------------------------------- files


@dataclass(eq=False)
class Tracked:
    """A known file. ``path``/``offset``/``epoch``/``ts``/``gone`` are checkpointed; the rest is not."""

    fp: str
    dev: int
    ino: int
    path: str
    offset: int
    epoch: int = 0
    ts: str | None = None
    gone: float | None = None
    binding: int = 0
    read_path: str = ""
    orphaned_at: float | None = None
    size: int = 0
    mtime: float = 0.0

    @property
    def id_prefix(self) -> str:
        return self.fp if self.epoch == 0 else f"{self.fp}.{self.epoch}"

    def entry(self) -> dict[str, Any]:
        e: dict[str, Any] = {"path": self.path, "offset": self.offset}
        if self.epoch:
            e["epoch"] = self.epoch
        if self.ts:
            e["ts"] = self.ts
        if self.gone is not None:
            e["gone"] = self.gone
        return e


def _broken(task: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint of task {task!r} is not a `files` checkpoint ({why}); fix or delete it "
                           f"deliberately (localflow will not reset it silently)")


class Tailer:
    """Finds, identifies and reads the files of one capture. Not async: run it in a thread.

    ``poll`` MUST be called by one thread at a time (a lock enforces it); ``close`` releases
    every descriptor.
    """

    def __init__(self, config: FilesConfig, globs: list[list[str]], state: dict[str, Any] | None,
                 log: logging.Logger | logging.LoggerAdapter[Any], task: str = "") -> None:
        self.root = os.path.realpath(config.directory)
        self.config = config
        self.advanced = config.advanced
        self.log = log
        self.matchers = [[glob_regex(g) for g in gs] for gs in globs]
        self.recursive = any("/" in g for gs in globs for g in gs)
        self.files: dict[str, Tracked] = {}
        self.by_path: dict[str, str] = {}
        self.open = OpenFiles(self.advanced.max_open_files)
        self.skip_history = state is None and config.start_at == "end"
        self.first_scan = True
        self.dirty = False
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        if state is not None:
            self._restore(state, task)

    def _restore(self, state: dict[str, Any], task: str) -> None:
        try:
            parsed = FilesState.model_validate(state)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            raise _broken(task, f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        for fp, e in parsed.files.items():
            try:
                dev, ino, _ = (int(part, 16) for part in fp.split("-"))
            except ValueError:
                raise _broken(task, f"{fp!r} is not a file fingerprint") from None
            binding = self._binding(e.path)
            t = Tracked(fp, dev, ino, e.path, e.offset, e.epoch, e.ts, e.gone,
                        binding=binding or 0, read_path=os.path.join(self.root, e.path))
            if binding is None and t.gone is None:
                t.gone = time.time()  # no glob names it any more: not to be read, only forgotten
            self.files[fp] = t
            if t.gone is None:
                self.by_path[t.path] = fp

    # ------------------------------------------------------------------------ polling

    def poll(self, changed: set[str] | None) -> tuple[Captured | None, bool]:
        """Discover (all files, or only ``changed`` paths) and read up to ``batch_lines`` lines.

        Returns the captured item (None when nothing changed) and whether more lines are
        already waiting (call again at once).
        """
        with self._lock:
            now = time.time()
            full = changed is None
            found = self._discover(self._walk() if full else self._candidates(changed), now)
            if full:
                self._sweep(found, now)
                if self.first_scan:
                    self.dirty = True  # checkpoint where `start_at: end` left each file, even if idle
            out = Captured()
            budget = self.advanced.batch_lines
            more = False
            for t in self._to_read(changed or set()):
                if budget <= 0:
                    more = True
                    break
                budget, budget_reached = self._read(t, budget, out, now, full)
                more = more or budget_reached
            self.first_scan = self.first_scan and not full
            if not (out.documents or out.dead or self.dirty):
                return None, more
            out.state = self.state()
            self.dirty = False
            return out, more

    def state(self) -> dict[str, Any]:
        return {"version": 1, "files": {fp: t.entry() for fp, t in self.files.items()}}

    def close(self) -> None:
        with self._lock:
            self.open.close_all()

    # ------------------------------------------------------------------------ discovery

    def _binding(self, rel: str) -> int | None:
        for index, patterns in enumerate(self.matchers):
            if any(p.match(rel) for p in patterns):
                return index
        return None

    def _walk(self) -> Iterator[tuple[str, int]]:
        """Every regular file under the root that a glob matches: ``(real path, binding)``."""
        stack = [(self.root, "")]
        while stack:
            directory, prefix = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for e in entries:
                rel = prefix + e.name
                try:
                    if e.is_dir(follow_symlinks=False):
                        if self.recursive:
                            stack.append((e.path, rel + "/"))
                        continue
                    link = e.is_symlink()
                except OSError:
                    continue
                hit = self._match(rel, e.path, resolve=link)
                if hit:
                    yield hit

    def _candidates(self, changed: set[str]) -> Iterator[tuple[str, int]]:
        """The changed paths a glob matches. Events also come from behind symlinked directories,
        so every path is resolved (the walk never enters those)."""
        for path in changed:
            rel = os.path.relpath(path, self.root)
            if rel.startswith(".."):
                continue
            hit = self._match(rel, path, resolve=True)
            if hit:
                yield hit

    def _match(self, rel: str, path: str, *, resolve: bool) -> tuple[str, int] | None:
        binding = self._binding(rel)
        if binding is None:
            return None
        if resolve:
            real = os.path.realpath(path)
            if not real.startswith(self.root + os.sep):
                self._warn_once(path, "%s leads out of %s (to %s) through a symlink: not read", path, self.root, real)
                return None
            path = real
        return path, binding

    def _discover(self, hits: Iterator[tuple[str, int]], now: float) -> set[str]:
        """Open, identify and register each hit; returns the fingerprints found."""
        found: set[str] = set()
        for path, binding in hits:
            fd = self._open_path(path)
            if fd is None:
                continue
            try:
                fp, st = self._identify(fd)
            except OSError:
                os.close(fd)
                continue
            if fp is None or fp in found:
                os.close(fd)
                continue
            found.add(fp)
            t = self._register(fp, st, fd, path, binding, now)
            if t.size > t.offset and self.open.get(fp) is None:
                self.open.put(fp, fd)
            else:
                os.close(fd)
        return found

    def _register(self, fp: str, st: os.stat_result, fd: int, path: str, binding: int, now: float) -> Tracked:
        rel = os.path.relpath(path, self.root)
        t = self.files.get(fp)
        if t is None:
            offset = 0
            if self.first_scan and self.skip_history:
                offset = last_line_end(fd, st.st_size, self.advanced.read_chunk_bytes)
            t = self.files[fp] = Tracked(fp, st.st_dev, st.st_ino, rel, offset)
            self.dirty = True
        else:
            if t.path != rel or t.gone is not None:
                if self.by_path.get(t.path) == fp:
                    del self.by_path[t.path]
                t.path, t.gone = rel, None
                self.dirty = True
            if st.st_size < t.offset:
                self._truncated(t, st.st_size)
        t.orphaned_at = None
        t.binding, t.read_path, t.size, t.mtime = binding, path, st.st_size, st.st_mtime
        previous = self.by_path.get(rel)
        if previous is not None and previous != fp and previous in self.files:
            self.files[previous].orphaned_at = now  # replaced at its path (rotation): finish it first
        self.by_path[rel] = fp
        return t

    def _truncated(self, t: Tracked, size: int) -> None:
        self.log.info("%s was truncated (%d bytes, read up to %d): reading it again from 0", t.read_path, size,
                      t.offset)
        t.epoch, t.offset, t.ts = t.epoch + 1, 0, None
        self.dirty = True

    def _sweep(self, found: set[str], now: float) -> None:
        """After a full scan: known files not found become orphans; long-gone ones are forgotten."""
        forget = []
        for fp, t in self.files.items():
            if t.gone is not None:
                if now - t.gone > self.advanced.forget_after:
                    forget.append(fp)
            elif fp not in found and t.orphaned_at is None:
                t.orphaned_at = now
        for fp in forget:
            t = self.files.pop(fp)
            self.open.close(fp)
            if self.by_path.get(t.path) == fp:
                del self.by_path[t.path]
            self.dirty = True

    def _to_read(self, touched: set[str]) -> list[Tracked]:
        """Orphans first (finish a rotated file before its successor), then files with news, oldest first."""
        orphans, live = [], []
        for t in self.files.values():
            if t.gone is not None:
                continue
            if t.orphaned_at is not None:
                orphans.append(t)
            elif t.size > t.offset or t.read_path in touched:
                live.append(t)
        orphans.sort(key=lambda t: t.mtime)
        live.sort(key=lambda t: t.mtime)
        return orphans + live

    # ------------------------------------------------------------------------ reading

    def _read(self, t: Tracked, budget: int, out: Captured, now: float, full: bool) -> tuple[int, bool]:
        fd = self._fd_of(t)
        if fd is None:
            self._gone(t, now)
            return budget, False
        try:
            st = os.fstat(fd)
            if st.st_size < t.offset:
                self._truncated(t, st.st_size)
            t.size, t.mtime = st.st_size, st.st_mtime
            lines, too_long, end, budget_reached = read_lines(
                fd, t.offset, st.st_size, budget, self.config.max_line_bytes, self.advanced.read_chunk_bytes)
        except OSError as e:
            self._warn_once(t.read_path, "cannot read %s: %s (retrying at the next scan)", t.read_path, e)
            self.open.close(t.fp)
            return budget, False
        rel = os.path.relpath(t.read_path, self.root)
        source = "file:" + rel
        mtime = format_utc(datetime.fromtimestamp(st.st_mtime, UTC))
        for offset, raw in lines:
            doc = self._document(t, offset, raw, source, mtime)
            if doc is not None:
                out.documents.append((t.binding, doc))
        for offset, length, head in too_long:
            out.dead.append((t.binding, f"{t.read_path}:{offset}: line of {length} bytes is longer than "
                             f"max_line_bytes ({self.config.max_line_bytes}); skipped (the original holds its "
                             f"first {len(head)} bytes)", head))
        out.source_bytes += end - t.offset
        t.offset = end
        if full and not budget_reached and t.orphaned_at is not None and t.orphaned_at < now:
            # Read to its end on two rescans in a row: its writer has had a whole interval to move
            # on to the new file. An unterminated last line is left behind.
            self._gone(t, now)
        return budget - len(lines) - len(too_long), budget_reached

    def _document(self, t: Tracked, offset: int, raw: bytes, source: str, mtime: str) -> dict[str, Any] | None:
        if offset == 0 and raw.startswith(_BOM):
            raw = raw[3:]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            return None
        data, ts = parse_line(raw)
        if ts is not None:
            t.ts = ts
        return {"timestamp": ts or t.ts or mtime, "source": source, "data": data,
                "metadata": {"id": f"{t.id_prefix}:{offset}", "path": t.read_path, "offset": offset}}

    def _gone(self, t: Tracked, now: float) -> None:
        t.gone, t.orphaned_at = now, None
        self.open.close(t.fp)
        if self.by_path.get(t.path) == t.fp:
            del self.by_path[t.path]
        self.dirty = True

    def _fd_of(self, t: Tracked) -> int | None:
        """An open descriptor of ``t``'s content: kept open, at its path, or found by inode."""
        fd = self.open.get(t.fp)
        if fd is not None:
            if self._is(fd, t):
                return fd
            self.open.close(t.fp)  # same inode, new content: the old content is gone
            return None
        for path in itertools.chain((t.read_path,), self._same_inode(t)):
            fd = self._open_path(path)
            if fd is None:
                continue
            if self._is(fd, t):
                t.read_path = path
                self.open.put(t.fp, fd)
                return fd
            os.close(fd)
        return None

    def _same_inode(self, t: Tracked) -> Iterator[str]:
        """Paths in ``t``'s last directory with its inode (a rotated file renamed out of the globs)."""
        directory = os.path.dirname(os.path.join(self.root, t.path))
        try:
            with os.scandir(directory) as entries:
                hits = [e.path for e in entries if e.inode() == t.ino and e.is_file(follow_symlinks=False)]
        except OSError:
            return
        yield from hits

    def _is(self, fd: int, t: Tracked) -> bool:
        try:
            return self._identify(fd)[0] == t.fp
        except OSError:
            return False

    def _identify(self, fd: int) -> tuple[str | None, os.stat_result]:
        return fingerprint(fd, self.advanced.fingerprint_bytes)

    def _open_path(self, path: str) -> int | None:
        try:
            return os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn_once(path, "cannot open %s: %s", path, e)
            return None

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            if len(self._warned) > 10_000:
                self._warned.clear()
            self._warned.add(key)
            self.log.warning(msg, *args)
