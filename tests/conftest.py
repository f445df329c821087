"""The suite's fixtures (from tests/support/services.py) and session hooks; pytest needs this file here."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

# `from tests.support.waiting import wait_for` must work however pytest is launched (`pytest` alone does
# not put the repository root on sys.path; `python -m pytest` does).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.services import (  # noqa: E402, F401 - fixtures, found by pytest here
    fresh_services,
    kafka_bootstrap,
    lazy_services,
    postgres_url,
    redis_url,
    s3_endpoint_url,
    services,
    services_env,
    unique_name,
)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """A SIGTERM (`timeout`, a cancelled CI job) interrupts like Ctrl-C: fixtures tear down and
    the servers the session started are stopped instead of being left behind."""
    signal.signal(signal.SIGTERM, _interrupt)
