"""Configuration of the `files` capture: one directory per task, glob patterns per binding.

Example (the Sophia catalog)::

    sophia/agent_logs:
      interval: 10s            # fallback rescan; file events wake the capture at once
      endpoint:
        files:
          directory: ${SOPHIA_AGENT_LOG_DIR:-/var/log/sophia/agents}
          start_at: beginning
      bindings:
        - target: sophia/sophia_agent_logs
          resource:
            globs: ["**/*.log", "**/*.jsonl"]
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator

from pipeline.sdk.config import Duration, Model


class FilesAdvanced(Model):
    """Rarely changed limits of the tailer."""

    batch_lines: int = Field(
        default=2000, ge=1, le=100_000,
        description="Lines per written batch; after a crash at most one batch is sent again (same keys).")
    fingerprint_bytes: int = Field(
        default=256, ge=16, le=65536,
        description="Bytes at the head of a file hashed into its identity (cut at the first newline): a file "
                    "is known by its content, so a rename, a copy to another disk or a remount keeps its keys.")
    max_open_files: int = Field(
        default=128, ge=1, le=10_000,
        description="Files kept open between reads; the others are reopened when they grow.")
    forget_after: Duration = Field(
        default=7 * 86400.0,
        description="How long the checkpoint remembers a finished file whose content is found nowhere any more "
                    "(at most the 100 newest of them), so a file or directory that comes back resumes. Files "
                    "still found (active, or a rotated copy) are remembered while they are found.")
    max_checkpoint_bytes: int = Field(
        default=1_000_000, ge=4096, le=64 * 1024 * 1024,
        description="A checkpoint larger than this stops the capture with an error naming it (Apache Kafka "
                    "refuses records over message.max.bytes, about 1 MiB by default).")
    watch: bool = Field(
        default=True,
        description="Wake on file-system events (inotify, through watchfiles); turn off where events do "
                    "not work (some network or container mounts): the periodic rescan still finds everything.")
    read_chunk_bytes: int = Field(default=65536, ge=4096, le=16 * 1024 * 1024, description="Bytes per read call.")


class FilesConfig(Model):
    """Which directory to tail and where reading starts."""

    directory: str = Field(
        description="Absolute directory holding the log files. Nothing outside it is read, not even "
                    "through a symlink.", examples=["${SOPHIA_AGENT_LOG_DIR:-/var/log/sophia/agents}"])
    start_at: Literal["beginning", "end"] = Field(
        default="beginning",
        description="Where to start in files found by the first scan of a capture that has no checkpoint "
                    "yet: `end` skips their history. Files found later are always read from their "
                    "beginning (they were created while the capture watched).")
    max_line_bytes: int = Field(
        default=256 * 1024, ge=64, le=64 * 1024 * 1024,
        description="A longer line becomes a dead letter (its first bytes, file and offset) and reading "
                    "goes on after it. Keep it below the broker's message size limit.")
    advanced: FilesAdvanced = Field(default_factory=FilesAdvanced)

    @field_validator("directory")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError(f"{v!r} is not an absolute directory (write e.g. /var/log/sophia/agents)")
        return os.path.normpath(v)


class FilesResource(Model):
    """Which files of the directory a binding captures (the first binding whose globs match wins)."""

    globs: list[str] = Field(
        min_length=1, examples=[["**/*.log", "**/*.jsonl"]],
        description="Patterns relative to `directory`: `*` and `?` within a name, `[abc]` classes, "
                    "`**/` any number of directories (`**/*.log` also matches `a.log`).")
    rotated: list[str] | None = Field(
        default=None,
        description="Where the rotated copies of these files live, patterns as `globs`. A rotated copy is "
                    "never read as a new file: only the rest of a known file whose active name was truncated "
                    "or replaced is read from it (gzip too). Default: each glob followed by `.[0-9]*` or "
                    "`-[0-9]*` (logrotate's `name.1`, `name-YYYYMMDD` and their `.gz`); `[]` for none.")

    @field_validator("globs", "rotated")
    @classmethod
    def _relative(cls, v: list[str] | None) -> list[str] | None:
        for g in v or []:
            if not g or g.startswith("/") or ".." in g.split("/"):
                raise ValueError(f"{g!r} is not a pattern relative to `directory` (write e.g. **/*.log)")
        return v
