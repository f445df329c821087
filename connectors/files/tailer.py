"""The synchronous core of the `files` capture: find files, know them by content, read lines.

Identity. A file is known by its content, never by device and inode: its *head*, a hash of
its first ``fingerprint_bytes`` bytes cut after the first newline (Vector's checksum
fingerprint), and its *check*, a hash of the bytes just before the offset read so far. A
file found with a known head is that entry only if its bytes before the entry's offset hash
to the entry's check: so a file moved, renamed, copied to another device or restored from a
backup resumes where it was, while a new file that starts with the same line (a reused
inode, a header, ``copytruncate`` of a file with a fixed first line) is a new entry, read
from 0. Device and inode are only hints for finding a file again. A file whose first line
is still incomplete (and shorter than ``fingerprint_bytes``) is not read yet.

Keys. An entry's key is its head, or ``<head>.<n>`` when an entry with the same head is
already known (``n`` from a counter kept in the checkpoint, so it is never reused). Each
document's ``metadata.id`` is ``<key>:<byte offset>``: the same line read again, from the
same file, a copy of it or its rotated (even gzip-compressed) copy, yields the same key.

Rotated copies. A path that a binding's ``rotated`` globs match (by default ``<glob>.[0-9]*``
and ``<glob>-[0-9]*``: logrotate's ``name.1``, ``name-YYYYMMDD`` and their ``.gz``) is never
read as a new file. It is read only to finish a known entry: when the active file was
renamed, replaced, truncated or found shorter than its checkpoint, the entry's content is
looked for in the rotated copies (head and check must match) and read from its offset to
the end (gzip included, in uncompressed offsets) before the new active file is read from 0.

Checkpoint (JSON, versioned): ``{"version": 2, "generation": n, "files": {key: {"path",
"offset", "check", "ts", "retired"}}}``. ``offset`` is the byte after the last complete line
handed out; ``ts`` the last timestamp read from the file, inherited by lines without one;
``retired`` when the entry stopped being read (its file rotated away and finished, or not
found). Retired entries stay while a rotated copy still holds their content; those whose
content cannot be found any more stay ``forget_after`` at most, and only the newest
``_LOST_KEPT`` of them (a file that comes back, or a directory remounted after a while,
resumes; a rotation that deleted its oldest copy leaves nothing behind). So the checkpoint
holds the files that can still be found plus a bounded tail, whatever the number of rotations.

Lifecycle of an entry: *live* (found at a path the globs match); *orphan* (no longer found
there: renamed, replaced, truncated, deleted), read to its end first, through a descriptor
still open, at a path with its inode, or in a rotated copy; *retired* once an orphan is at
its end on two full rescans in a row, or cannot be found.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.files.config import FilesConfig, FilesResource
from connectors.files.parse import format_utc, parse_line
from connectors.files.reading import (
    GZIP_ERRORS,
    OpenFiles,
    Source,
    glob_regex,
    head_hash,
    is_regular,
    last_line_end,
    open_source,
    read_lines,
    tail_check,
)
from pipeline.sdk.capture import Captured
from pipeline.sdk.errors import CheckpointError

_BOM = b"\xef\xbb\xbf"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LOST_KEPT = 100
"""Retired entries whose content is nowhere to be found that the checkpoint still keeps."""


# ---------------------------------------------------------------------------- checkpoint


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    offset: int = Field(ge=0)
    check: str | None = None
    ts: str | None = None
    retired: float | None = None


class FilesState(BaseModel):
    """The checkpoint of a `files` capture (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[2]
    generation: int = Field(default=0, ge=0)
    files: dict[str, FileEntry]


def _from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 checkpoint (keys ``<dev>-<inode>-<head>``): same heads and offsets, no checks
    yet (the first read trusts the offset, as version 1 did)."""
    files: dict[str, Any] = {}
    generation = 0
    for fp, e in (state.get("files") or {}).items():
        head = str(fp).rsplit("-", 1)[-1]
        key = head if head not in files else f"{head}.{(generation := generation + 1)}"
        entry = {"path": e.get("path"), "offset": e.get("offset")}
        if e.get("ts"):
            entry["ts"] = e["ts"]
        if e.get("gone") is None:  # finished files are not carried over: nothing could check them
            files[key] = entry
    return {"version": 2, "generation": generation, "files": files}


# ---------------------------------------------------------------------------- files


@dataclass(eq=False)
class Tracked:
    """A known file. ``path``/``offset``/``check``/``ts``/``retired`` are checkpointed; the rest is not."""

    key: str
    head: str
    path: str
    offset: int
    check: str | None = None
    ts: str | None = None
    retired: float | None = None
    binding: int = 0
    read_path: str = ""
    dev: int = -1
    ino: int = -1
    seen: int = -1
    orphaned_at: float | None = None
    size: int = 0
    mtime: float = 0.0

    def entry(self) -> dict[str, Any]:
        e: dict[str, Any] = {"path": self.path, "offset": self.offset}
        if self.check:
            e["check"] = self.check
        if self.ts:
            e["ts"] = self.ts
        if self.retired is not None:
            e["retired"] = self.retired
        return e


def _broken(task: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint of task {task!r} is not a `files` checkpoint ({why}); fix or delete it "
                           f"deliberately (localflow will not reset it silently)")


def default_rotated(globs: list[str]) -> list[str]:
    """logrotate's names for copies of what ``globs`` match: ``name.1``, ``name-20261201``, their ``.gz``."""
    return [g + suffix for g in globs for suffix in (".[0-9]*", "-[0-9]*")]


class Tailer:
    """Finds, identifies and reads the files of one capture. Not async: run it in a thread.

    ``poll`` MUST be called by one thread at a time (a lock enforces it); ``close`` releases
    every descriptor.
    """

    def __init__(self, config: FilesConfig, resources: list[FilesResource], state: dict[str, Any] | None,
                 log: logging.Logger | logging.LoggerAdapter[Any], task: str = "") -> None:
        self.root = os.path.realpath(config.directory)
        self.config = config
        self.advanced = config.advanced
        self.log = log
        self.task = task
        self.matchers = [[glob_regex(g) for g in r.globs] for r in resources]
        self.rotated_matchers = [[glob_regex(g) for g in (r.rotated if r.rotated is not None
                                                          else default_rotated(r.globs))] for r in resources]
        self.recursive = any("/" in g for r in resources for g in r.globs + (r.rotated or []))
        self.files: dict[str, Tracked] = {}
        self.by_path: dict[str, Tracked] = {}
        self.by_head: dict[str, list[Tracked]] = {}
        self.generation = 0
        self.rotated: dict[str, int] = {}  # rotated copies seen: real path -> binding
        self._heads: dict[tuple[int, int, int, int], str | None] = {}  # rotated copy's stat -> its head
        self.pending: set[str] = set()  # paths whose content changed under their entry: discover again
        self.open = OpenFiles(self.advanced.max_open_files)
        self.skip_history = state is None and config.start_at == "end"
        self.first_scan = True
        self.listed = True
        self.scan = 0
        self._relisted = -1
        self.dirty = False
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        if state is not None:
            self._restore(state, task)

    def _restore(self, state: dict[str, Any], task: str) -> None:
        if state.get("version") == 1:
            state = _from_version_1(state)
        try:
            parsed = FilesState.model_validate(state)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            raise _broken(task, f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        self.generation = parsed.generation
        for key, e in parsed.files.items():
            head = key.split(".", 1)[0]
            if len(head) != 16 or any(c not in "0123456789abcdef" for c in head):
                raise _broken(task, f"{key!r} is not a file key")
            binding = self._binding(e.path)
            t = Tracked(key, head, e.path, e.offset, e.check, e.ts, e.retired,
                        binding=binding[0] if binding else 0, read_path=os.path.join(self.root, e.path))
            self._add(t)
            if t.retired is None:
                self.by_path[t.path] = t

    def _add(self, t: Tracked) -> None:
        self.files[t.key] = t
        self.by_head.setdefault(t.head, []).append(t)

    def _drop(self, t: Tracked) -> None:
        del self.files[t.key]
        same = self.by_head[t.head]
        same.remove(t)
        if not same:
            del self.by_head[t.head]
        self.open.close(t.key)
        if self.by_path.get(t.path) is t:
            del self.by_path[t.path]
        self.dirty = True

    # ------------------------------------------------------------------------ polling

    def poll(self, changed: set[str] | None) -> tuple[Captured | None, bool]:
        """Discover (all files, or only ``changed`` paths) and read up to ``batch_lines`` lines.

        Returns the captured item (None when nothing changed) and whether more lines are
        already waiting (call again at once).
        """
        with self._lock:
            now = time.time()
            full = changed is None
            self.scan += 1
            touched = (changed or set()) | self.pending
            self.pending = set()
            found = self._discover(self._walk() if full else self._candidates(touched), now)
            if full:
                if self.listed:
                    self._sweep(found, now)
                if self.first_scan:
                    self.dirty = True  # checkpoint where `start_at: end` left each file, even if idle
            out = Captured()
            budget = self.advanced.batch_lines
            more = False
            for t in self._to_read(touched):
                if budget <= 0:
                    more = True
                    break
                budget, budget_reached = self._read(t, budget, out, now, full)
                more = more or budget_reached
            more = more or bool(self.pending)
            self.first_scan = self.first_scan and not full
            if not (out.documents or out.dead or self.dirty):
                return None, more
            out.state = self.state()
            self.dirty = False
            return out, more

    def state(self) -> dict[str, Any]:
        """The checkpoint; CheckpointError (naming the capture) when it outgrows ``max_checkpoint_bytes``."""
        state = {"version": 2, "generation": self.generation,
                 "files": {key: t.entry() for key, t in self.files.items()}}
        size = len(orjson.dumps(state))
        if size > self.advanced.max_checkpoint_bytes:
            live = sum(1 for t in self.files.values() if t.retired is None)
            raise CheckpointError(
                f"capture {self.task!r}: its checkpoint would be {size} bytes, over advanced.max_checkpoint_bytes "
                f"({self.advanced.max_checkpoint_bytes}); it tracks {len(self.files)} files ({live} being read) "
                f"under {self.root}. Narrow the globs, or raise max_checkpoint_bytes if the broker's "
                f"message.max.bytes allows it")
        return state

    def close(self) -> None:
        with self._lock:
            self.open.close_all()

    # ------------------------------------------------------------------------ discovery

    def _binding(self, rel: str) -> tuple[int, bool] | None:
        """``(binding, is a rotated copy)`` of a relative path; rotated globs win over active ones."""
        for index, patterns in enumerate(self.rotated_matchers):
            if any(p.match(rel) for p in patterns):
                return index, True
        for index, patterns in enumerate(self.matchers):
            if any(p.match(rel) for p in patterns):
                return index, False
        return None

    def _walk(self) -> Iterator[tuple[str, int]]:
        """Every regular file under the root that an active glob matches: ``(real path, binding)``.
        Rotated copies are collected into ``self.rotated``; ``self.listed`` says whether the root
        could be listed (a missing directory retires nothing)."""
        rotated: dict[str, int] = {}
        stack = [(self.root, "")]
        self.listed = True
        while stack:
            directory, prefix = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                if directory == self.root:
                    self.listed = False
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
                if hit is None:
                    continue
                if hit[2]:
                    rotated[hit[0]] = hit[1]
                else:
                    yield hit[0], hit[1]
        self.rotated = rotated

    def _candidates(self, changed: set[str]) -> Iterator[tuple[str, int]]:
        """The changed paths an active glob matches (rotated copies are only noted). Events also
        come from behind symlinked directories, so every path is resolved (the walk never enters those)."""
        for path in changed:
            rel = os.path.relpath(path, self.root)
            if rel.startswith(".."):
                continue
            hit = self._match(rel, path, resolve=True)
            if hit is None:
                continue
            if hit[2]:
                self.rotated[hit[0]] = hit[1]
            else:
                yield hit[0], hit[1]

    def _match(self, rel: str, path: str, *, resolve: bool) -> tuple[str, int, bool] | None:
        binding = self._binding(rel)
        if binding is None:
            return None
        if resolve:
            real = os.path.realpath(path)
            if not real.startswith(self.root + os.sep):
                self._warn_once(path, "%s leads out of %s (to %s) through a symlink: not read", path, self.root, real)
                return None
            path = real
        return path, binding[0], binding[1]

    def _discover(self, hits: Iterator[tuple[str, int]], now: float) -> set[str]:
        """Open, identify and register each active hit; returns the keys found."""
        found: set[str] = set()
        for path, binding in hits:
            src = self._open_path(path)
            if src is None:
                continue
            try:
                st = src.stat()
                head = head_hash(src, self.advanced.fingerprint_bytes) if is_regular(st) else None
                t = None if head is None else self._register(src, st, head, path, binding, now)
            except OSError:
                t = None
            if t is None or t.key in found:
                src.close()
                continue
            found.add(t.key)
            if t.size > t.offset and self.open.get(t.key) is None:
                self.open.put(t.key, src)
            else:
                src.close()
        return found

    def _register(self, src: Source, st: os.stat_result, head: str, path: str, binding: int,
                  now: float) -> Tracked:
        rel = os.path.relpath(path, self.root)
        t = self.by_path.get(rel)
        same = (t is not None and t.head == head and t.dev == st.st_dev and t.ino == st.st_ino
                and t.orphaned_at is None and t.retired is None and st.st_size >= t.offset)
        if not same:  # content decides: a known entry only if its bytes before the offset match
            t = self._first_held(src, (c for c in self.by_head.get(head, ()) if self._claimable(c, rel)),
                                 st.st_size)
            if t is not None:
                self.open.close(t.key)  # read it from here on, not from where it was found before
        if t is None:
            t = self._new(head, rel, src, st)
        elif t.path != rel or t.retired is not None or t.orphaned_at is not None:
            if self.by_path.get(t.path) is t:
                del self.by_path[t.path]
            t.path, t.retired, t.orphaned_at = rel, None, None
            self.dirty = True
        previous = self.by_path.get(rel)
        if previous is not None and previous is not t and previous.retired is None:
            previous.orphaned_at = previous.orphaned_at or now  # replaced at its path (rotation): finish it first
        self.by_path[rel] = t
        t.seen, t.binding, t.read_path = self.scan, binding, path
        t.dev, t.ino, t.size, t.mtime = st.st_dev, st.st_ino, st.st_size, st.st_mtime
        return t

    def _claimable(self, c: Tracked, rel: str) -> bool:
        """Whether entry ``c`` may be the file found at ``rel``: not already found at another path in
        this scan, nor still at another path (then this is a copy of it, a new file)."""
        if c.seen == self.scan or (c.check is None and c.path != rel):  # no check (version 1): only in place
            return False
        if c.retired is None and c.orphaned_at is None and c.path != rel and c.dev >= 0:
            try:
                there = os.stat(c.read_path, follow_symlinks=False)
                return (there.st_dev, there.st_ino) != (c.dev, c.ino)
            except OSError:
                pass
        return True

    def _new(self, head: str, rel: str, src: Source, st: os.stat_result) -> Tracked:
        key = head
        if head in self.by_head:
            self.generation += 1
            key = f"{head}.{self.generation}"
        offset = 0
        if self.first_scan and self.skip_history and not src.gzipped:
            offset = last_line_end(src.fd, st.st_size, self.advanced.read_chunk_bytes)
        t = Tracked(key, head, rel, offset, tail_check(src, offset))
        self._add(t)
        self.dirty = True
        return t

    def _sweep(self, found: set[str], now: float) -> None:
        """After a full scan: live entries not found become orphans. Retired ones stay while rotated
        copies hold them (of the entries sharing a head, as many of the newest as there are copies
        with that head), the others for ``forget_after`` and ``_LOST_KEPT`` at most."""
        copies: dict[str, int] = {}
        for head in self._rotated_heads().values():
            if head is not None:
                copies[head] = copies.get(head, 0) + 1
        retired = sorted((t for t in self.files.values() if t.retired is not None),
                         key=lambda t: t.retired or 0.0, reverse=True)
        lost: list[Tracked] = []
        for t in retired:
            if copies.get(t.head, 0) > 0:
                copies[t.head] -= 1
            else:
                lost.append(t)
        for n, t in enumerate(lost):
            if n >= _LOST_KEPT or now - (t.retired or 0.0) > self.advanced.forget_after:
                self._drop(t)
        for t in self.files.values():
            if t.retired is None and t.key not in found and t.orphaned_at is None:
                t.orphaned_at = now

    def _rotated_heads(self) -> dict[str, str | None]:
        """The head of every rotated copy, by path (cached by the copy's stat, which a rename keeps:
        a compressed copy is decompressed once, for its head only)."""
        heads: dict[tuple[int, int, int, int], str | None] = {}
        by_path: dict[str, str | None] = {}
        for path in self.rotated:
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            heads[sig] = by_path[path] = self._heads[sig] if sig in self._heads else self._head_of(path)
        self._heads = heads
        return by_path

    def _head_of(self, path: str) -> str | None:
        src = self._open_path(path)
        if src is None:
            return None
        try:
            return head_hash(src, self.advanced.fingerprint_bytes)
        except GZIP_ERRORS:
            return None
        finally:
            src.close()

    def _first_held(self, src: Source, candidates: Iterable[Tracked], size: int | None) -> Tracked | None:
        """The first candidate whose bytes before its offset ``src`` holds (one read per distinct offset:
        files that share a head often share a length too)."""
        checks: dict[int, str | None] = {}
        for c in candidates:
            if size is not None and size < c.offset:
                continue
            if c.check is None:
                return c
            if c.offset not in checks:
                checks[c.offset] = tail_check(src, c.offset)
            if checks[c.offset] == c.check:
                return c
        return None

    def _to_read(self, touched: set[str]) -> list[Tracked]:
        """Orphans first (finish a rotated file before its successor), then files with news, oldest first."""
        orphans, live = [], []
        for t in self.files.values():
            if t.retired is not None:
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
        src = self._source_of(t, now)
        if src is None:
            if full:  # looked for everywhere on a full scan: nothing more of it can be read
                self._retire(t, now, "its content is no longer found")
            return budget, False
        try:
            st = src.stat()
            end_limit = src.end(st)
            lines, too_long, end, budget_reached = read_lines(
                src.pread, t.offset, end_limit, budget, self.config.max_line_bytes, self.advanced.read_chunk_bytes)
            check = tail_check(src, end) if end != t.offset else t.check
        except GZIP_ERRORS as e:  # OSError included: a file gone mid-read, a gzip copy still being written
            self._warn_once(t.read_path, "cannot read %s: %s (retrying at the next scan)", t.read_path, e)
            self.open.close(t.key)
            return budget, False
        t.size, t.mtime = (end if src.gzipped else st.st_size), st.st_mtime
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
        if not src.gzipped:
            out.source_bytes += end - t.offset
        t.offset, t.check = end, check
        if full and not budget_reached and t.orphaned_at is not None and t.orphaned_at < now:
            # Read to its end on two rescans in a row: its writer has had a whole interval to move
            # on to the new file. An unterminated last line is left behind.
            self._retire(t, now, "")
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
                "metadata": {"id": f"{t.key}:{offset}", "path": t.read_path, "offset": offset}}

    def _retire(self, t: Tracked, now: float, why: str) -> None:
        if why:
            self.log.info("%s: %s (read up to byte %d)", t.read_path, why, t.offset)
        t.retired, t.orphaned_at = now, None
        self.open.close(t.key)
        if self.by_path.get(t.path) is t:
            del self.by_path[t.path]
        self.dirty = True

    def _source_of(self, t: Tracked, now: float) -> Source | None:
        """An open source of ``t``'s content: kept open, at its path, by inode, or a rotated copy.

        A live entry whose path now holds other content (truncated, replaced) becomes an orphan,
        and its path is discovered again as a new file.
        """
        src = self.open.get(t.key)
        if src is not None:
            if src.gzipped or self._holds(src, t):  # a gzip copy is never rewritten in place
                return src
            self.open.close(t.key)
        for path in itertools.chain((t.read_path,), self._same_inode(t)):
            src = self._open_path(path)
            if src is not None and self._holds(src, t):
                self._moved(t, path, now)
                self.open.put(t.key, src)
                return src
            if src is not None:
                src.close()
        for path in self._rotated_copies(t):
            src = self._open_path(path)
            if src is None:
                continue
            if self._holds(src, t):
                self.log.info("%s: reading the rest of %s from its rotated copy %s, from byte %d",
                              self.task, t.path, path, t.offset)
                self._moved(t, path, now)
                self.open.put(t.key, src)
                return src
            src.close()
        if t.orphaned_at is None:
            self._moved(t, "", now)
        return None

    def _moved(self, t: Tracked, path: str, now: float) -> None:
        """``t``'s content is found at ``path`` (or nowhere): if that is not its active path, it is an orphan."""
        if path == t.read_path and t.orphaned_at is None:
            return
        if t.orphaned_at is None:
            self.pending.add(t.read_path)
            t.orphaned_at = now
            if self.by_path.get(t.path) is t:
                del self.by_path[t.path]
        if path:
            t.read_path = path
            t.path = os.path.relpath(path, self.root)
            self.dirty = True

    def _rotated_copies(self, t: Tracked) -> list[str]:
        """Rotated copies that start as ``t`` does (listed again once per poll when none does: the
        copy may be seconds old)."""
        same = [path for path, head in self._rotated_heads().items() if head == t.head]
        if not same and self._relisted != self.scan:
            self._relisted = self.scan
            for _ in self._walk():
                pass
            same = [path for path, head in self._rotated_heads().items() if head == t.head]
        return same

    def _holds(self, src: Source, t: Tracked) -> bool:
        """Whether ``src`` is ``t``'s content: same head, and the same bytes just before its offset."""
        try:
            if head_hash(src, self.advanced.fingerprint_bytes) != t.head:
                return False
            if not src.gzipped and src.stat().st_size < t.offset:
                return False
            return t.check is None or tail_check(src, t.offset) == t.check
        except GZIP_ERRORS:
            return False

    def _same_inode(self, t: Tracked) -> Iterator[str]:
        """Paths in ``t``'s last directory with its inode (a hint: a file renamed out of the globs)."""
        if t.ino < 0:
            return
        directory = os.path.dirname(t.read_path)
        try:
            with os.scandir(directory) as entries:
                hits = [e.path for e in entries
                        if e.inode() == t.ino and e.path != t.read_path and e.is_file(follow_symlinks=False)]
        except OSError:
            return
        yield from hits

    def _open_path(self, path: str) -> Source | None:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn_once(path, "cannot open %s: %s", path, e)
            return None
        return open_source(fd, path)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            if len(self._warned) > 10_000:
                self._warned.clear()
            self._warned.add(key)
            self.log.warning(msg, *args)
