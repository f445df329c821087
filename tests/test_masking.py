"""Masking (SPEC: "sensitive data should be masked"): values at a binding's `mask` pointers are
replaced by a keyed hash before anything is written, so the original never reaches Kafka while
equal values still join. Exercised through the `files` capture on the real broker.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from pipeline.runtime.capture import MASK_KEY_ENV
from tests.support.files import Flow, write_lines
from tests.support.tasks import running
from tests.support.waiting import wait_for_async

KEY = "test-masking-key"


@pytest.fixture
def flow(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> Flow:
    f = Flow(tmp_path, kafka_bootstrap, f"mask/{unique_name('cap')}", f"mask/{unique_name()}")
    f.logs.mkdir()
    return f


@pytest.fixture
def mask_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(MASK_KEY_ENV, KEY)
    return KEY


def line(**data: object) -> str:
    return orjson.dumps(data).decode()


async def captured(flow: Flow, count: int) -> list[dict]:
    async def enough() -> list[dict] | None:
        docs = await flow.documents()
        return docs if len(docs) >= count else None

    return await wait_for_async(enough, timeout=60, interval=0.2, message=f"{count} documents")


async def test_masked_values_never_reach_kafka(flow: Flow, mask_key: str) -> None:
    write_lines(flow.logs / "agent.log", [
        line(event="login", user_email="ada@example.com"),
        line(event="query", user_email="grace@example.com", contacts=["alan@example.com"]),
    ])
    catalog = flow.catalog(mask=["/data/user_email", "/data/contacts/0"])
    async with running(catalog, flow.task, check_errors=True):
        docs = await captured(flow, 2)
    raw = await flow.raw_values()
    assert all(b"@example.com" not in value for value in raw)
    assert [d["data"]["event"] for d in docs] == ["login", "query"]
    assert all(d["data"]["user_email"].startswith("masked:") for d in docs)
    assert docs[1]["data"]["contacts"][0].startswith("masked:")


async def test_equal_values_get_equal_keyed_hashes(flow: Flow, mask_key: str) -> None:
    write_lines(flow.logs / "agent.log", [
        line(n=1, user_email="ada@example.com"),
        line(n=2, user_email="grace@example.com"),
        line(n=3, user_email="ada@example.com"),
    ])
    async with running(flow.catalog(mask=["/data/user_email"]), flow.task, check_errors=True):
        docs = await captured(flow, 3)
    emails = [d["data"]["user_email"] for d in docs]
    assert emails[0] == emails[2] != emails[1]
    # HMAC-SHA256 with the key from the environment: another system holding the key can join on it.
    expected = hmac.new(mask_key.encode(), b"ada@example.com", hashlib.sha256).hexdigest()[:32]
    assert emails[0] == f"masked:{expected}"


async def test_dead_letter_of_a_masking_binding_withholds_the_raw_line(flow: Flow, mask_key: str) -> None:
    write_lines(flow.logs / "agent.log", [
        line(user_email="ada@example.com", padding="x" * 2000),  # too long: a dead letter
        line(user_email="grace@example.com"),
    ])
    async with running(flow.catalog(mask=["/data/user_email"], max_line_bytes=1000), flow.task, check_errors=True):
        await captured(flow, 1)
        dead = await wait_for_async(flow.dead_letters, timeout=30, message="a dead letter")
    assert "longer than max_line_bytes" in dead[0]["error"]
    assert "original withheld" in dead[0]["error"]
    assert b"@example.com" not in orjson.dumps(dead)


async def test_mask_without_the_key_in_the_environment_is_a_config_error(
        flow: Flow, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MASK_KEY_ENV, raising=False)
    write_lines(flow.logs / "agent.log", [line(user_email="ada@example.com")])
    async with running(flow.catalog(mask=["/data/user_email"]), flow.task) as ctx:
        error = await wait_for_async(lambda: ctx.status.last_error, timeout=30, message="the task's error")
    assert error.startswith("ConfigError")
    assert f"captures.{flow.task}" in error and MASK_KEY_ENV in error
    assert await flow.raw_values() == []
