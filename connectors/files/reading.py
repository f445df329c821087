"""File-level reading for the `files` capture: globs, fingerprints, descriptors, lines.

Everything here works on plain descriptors with ``pread``, so one descriptor serves any
offset and nothing depends on a file position.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import OrderedDict

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


def fingerprint(fd: int, head_bytes: int) -> tuple[str | None, os.stat_result]:
    """``<dev>-<inode>-<hash of the head>`` of an open file, with its stat; None while the first
    line is incomplete and shorter than ``head_bytes`` (or for anything but a regular file)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return None, st
    head = os.pread(fd, head_bytes, 0)
    nl = head.find(b"\n")
    if nl >= 0:
        head = head[:nl + 1]
    elif len(head) < head_bytes:
        return None, st
    digest = hashlib.blake2b(head, digest_size=8).hexdigest()
    return f"{st.st_dev:x}-{st.st_ino:x}-{digest}", st


class OpenFiles:
    """Descriptors kept open between reads, least recently used closed first (bounded)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._fds: OrderedDict[str, int] = OrderedDict()

    def get(self, fp: str) -> int | None:
        fd = self._fds.get(fp)
        if fd is not None:
            self._fds.move_to_end(fp)
        return fd

    def put(self, fp: str, fd: int) -> None:
        old = self._fds.pop(fp, None)
        if old is not None and old != fd:
            os.close(old)
        self._fds[fp] = fd
        while len(self._fds) > self.cap:
            os.close(self._fds.popitem(last=False)[1])

    def close(self, fp: str) -> None:
        fd = self._fds.pop(fp, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


def read_lines(fd: int, start: int, end: int, budget: int, max_line: int,
               chunk: int) -> tuple[list[tuple[int, bytes]], list[tuple[int, int, bytes]], int, bool]:
    """Complete lines of ``fd`` from ``start`` up to ``end``, at most ``budget`` of them.

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
        data = os.pread(fd, min(chunk, end - at), at)
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
            newline = _find_newline(fd, at, end, chunk)
            if newline is None:
                break  # still being written: come back to its start later
            too_long.append((base, newline - base, buf[:_DEAD_KEEP_BYTES]))
            base = at = newline + 1
            buf = b""
            if len(lines) + len(too_long) >= budget:
                return lines, too_long, base, True
    return lines, too_long, base, False


def _find_newline(fd: int, at: int, end: int, chunk: int) -> int | None:
    while at < end:
        data = os.pread(fd, min(chunk, end - at), at)
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
