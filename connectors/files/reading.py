"""File-level reading for the `files` capture: globs, content hashes, sources, lines.

A source is a plain descriptor read with ``pread`` (one descriptor serves any offset and
nothing depends on a file position) or a gzip-compressed rotated copy, read by offset in
its uncompressed bytes, so offsets mean the same in a log and in its ``.gz``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import stat
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable

_DEAD_KEEP_BYTES = 16 * 1024
"""A dead letter keeps the head of an over-long line, not all of it (it may not fit in a message)."""


def glob_regex(pattern: str) -> re.Pattern[str]:
    """``*``/``?`` within a path segment, ``[...]`` classes, ``**/`` any number of directories."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        at_segment = i == 0 or pattern[i - 1] == "/"
        if at_segment and pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
            continue
        if at_segment and pattern[i:] == "**":
            out.append(".*")
            break
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (j := pattern.find("]", i + 2)) > 0:
            inner = pattern[i + 1:j]
            inner = "^" + inner[1:] if inner.startswith("!") else inner
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


_CHECK_BYTES = 256
"""Bytes before an offset hashed into its check: a different file with the same head differs there."""


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class Plain:
    """A regular file's bytes by offset (``pread``: no file position)."""

    __slots__ = ("fd",)
    gzipped = False

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pread(self, n: int, at: int) -> bytes:
        return os.pread(self.fd, n, at)

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def end(self, st: os.stat_result) -> int:
        return st.st_size

    def close(self) -> None:
        os.close(self.fd)


class Gzipped:
    """A gzip-compressed rotated copy, read by offset in its *uncompressed* bytes.

    Reads go forward through one decompressor; the last chunk is kept, so the check of the
    bytes just before an offset reached by reading needs no rewind.
    """

    gzipped = True

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._raw = os.fdopen(fd, "rb", closefd=True)
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="rb")
        self._pos = 0
        self._last, self._last_at = b"", 0

    def pread(self, n: int, at: int) -> bytes:
        last_end = self._last_at + len(self._last)
        if self._last_at <= at and at + n <= last_end:
            return self._last[at - self._last_at:at - self._last_at + n]
        if at != self._pos:
            self._gz.seek(at)  # forward: decompresses and discards; backward: from the start
        data = self._gz.read(n)
        self._pos = at + len(data)
        self._last, self._last_at = data, at
        return data

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def end(self, st: os.stat_result) -> int:
        return sys.maxsize  # the uncompressed size is known only at the end of the stream

    def close(self) -> None:
        self._gz.close()
        self._raw.close()


Source = Plain | Gzipped
GZIP_ERRORS = (EOFError, OSError, zlib.error)
"""What a gzip copy raises while it is still being written (or when it is not gzip at all)."""


def open_source(fd: int, path: str) -> Source:
    return Gzipped(fd) if path.endswith(".gz") else Plain(fd)


def head_hash(src: Source, head_bytes: int) -> str | None:
    """The content identity of a file: a hash of its first ``head_bytes`` bytes cut after the
    first newline; None while that first line is incomplete and shorter than ``head_bytes``."""
    head = src.pread(head_bytes, 0)
    nl = head.find(b"\n")
    if nl >= 0:
        head = head[:nl + 1]
    elif len(head) < head_bytes:
        return None
    return _digest(head)


def tail_check(src: Source, offset: int) -> str | None:
    """A hash of the bytes just before ``offset`` (None at 0, or when the file is shorter)."""
    if offset <= 0:
        return None
    n = min(_CHECK_BYTES, offset)
    data = src.pread(n, offset - n)
    return _digest(data) if len(data) == n else None


def is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


class OpenFiles:
    """Sources kept open between reads, least recently used closed first (bounded)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: OrderedDict[str, Source] = OrderedDict()

    def get(self, key: str) -> Source | None:
        src = self._open.get(key)
        if src is not None:
            self._open.move_to_end(key)
        return src

    def put(self, key: str, src: Source) -> None:
        old = self._open.pop(key, None)
        if old is not None and old is not src:
            old.close()
        self._open[key] = src
        while len(self._open) > self.cap:
            self._open.popitem(last=False)[1].close()

    def close(self, key: str) -> None:
        src = self._open.pop(key, None)
        if src is not None:
            src.close()

    def close_all(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def read_lines(pread: Callable[[int, int], bytes], start: int, end: int, budget: int, max_line: int,
               chunk: int) -> tuple[list[tuple[int, bytes]], list[tuple[int, int, bytes]], int, bool]:
    """Complete lines of a source (its ``pread``) from ``start`` up to ``end``, at most ``budget`` of them.

    Returns ``(lines, too_long, next_offset, budget_reached)``: ``lines`` are
    ``(offset, bytes without newline)``, ``too_long`` are ``(offset, length, head)`` of lines
    over ``max_line`` (skipped to their newline without buffering them), ``next_offset`` is
    the byte after the last complete line (an incomplete last line is left for later).
    """
    lines: list[tuple[int, bytes]] = []
    too_long: list[tuple[int, int, bytes]] = []
    base = at = start  # file offset of buf[0]; next file offset to read
    buf = b""
    while at < end:
        data = pread(min(chunk, end - at), at)
        if not data:
            break
        at += len(data)
        buf = buf + data if buf else data
        i = 0
        while (nl := buf.find(b"\n", i)) >= 0:
            if nl - i > max_line:
                too_long.append((base + i, nl - i, buf[i:min(nl, i + _DEAD_KEEP_BYTES)]))
            else:
                lines.append((base + i, buf[i:nl]))
            i = nl + 1
            if len(lines) + len(too_long) >= budget:
                return lines, too_long, base + i, True
        base += i
        buf = buf[i:]
        if len(buf) > max_line:
            newline = _find_newline(pread, at, end, chunk)
            if newline is None:
                break  # still being written: come back to its start later
            too_long.append((base, newline - base, buf[:_DEAD_KEEP_BYTES]))
            base = at = newline + 1
            buf = b""
            if len(lines) + len(too_long) >= budget:
                return lines, too_long, base, True
    return lines, too_long, base, False


def _find_newline(pread: Callable[[int, int], bytes], at: int, end: int, chunk: int) -> int | None:
    while at < end:
        data = pread(min(chunk, end - at), at)
        if not data:
            return None
        k = data.find(b"\n")
        if k >= 0:
            return at + k
        at += len(data)
    return None


def last_line_end(fd: int, size: int, chunk: int) -> int:
    """The offset after the last newline before ``size`` (0 when there is none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - chunk)
        k = os.pread(fd, pos - start, start).rfind(b"\n")
        if k >= 0:
            return start + k + 1
        pos = start
    return 0
