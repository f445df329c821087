"""`localflow doctor`: one line per check, the right exit code, and never a secret in its output."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from pipeline.embedded.services import free_port
from tests.support.cli import cli_env, localflow, redis_catalog
from tests.support.workers import ROOT


def jwt(**claims: int) -> str:
    """An unsigned-looking JWT with these claims (doctor reads dates without verifying)."""
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': 'sophia', **claims})}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk"


def line_of(out: str, check: str) -> str:
    return next(line for line in out.splitlines() if check in line)


def test_doctor_passes_with_kafka_and_endpoints_up_while_estuary_is_only_reported(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    token = jwt(iat=int(time.time()) - 11 * 86400, exp=int(time.time()) + 3 * 86400)
    result = localflow("doctor", str(redis_catalog(tmp_path, name)),
                       env=cli_env(ESTUARY_ACCESS_TOKEN=token, ESTUARY_REFRESH_TOKEN="refresh-0123456789"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert line_of(out, "kafka ").startswith("OK")
    assert line_of(out, f"{name}/cache: redis").startswith("OK")
    assert re.search(r"estuary token ESTUARY_ACCESS_TOKEN\s+valid until \S+ \S+ UTC \(in 3\.0 days\)", out), out
    assert re.search(r"^OK\s+estuary refresh token\s+ESTUARY_REFRESH_TOKEN is present", out, re.M), out
    assert "estuary dns api.estuary.dev" in out and "estuary https api.estuary.dev" in out
    assert out.splitlines()[-1].startswith("all required checks passed")
    assert "no broker?" not in out


def test_doctor_exits_1_naming_kafka_when_the_broker_is_unreachable(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    result = localflow("doctor", str(redis_catalog(tmp_path, unique_name())), "--timeout", "10",
                       env=cli_env(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert line_of(result.stdout, "kafka 127.0.0.1:").startswith("FAIL")
    assert "1 required check(s) failed" in result.stdout


def test_with_nothing_running_each_check_is_one_clean_line_optional_ones_warn_and_a_hint_closes(
        tmp_path: Path, unique_name: Callable[..., str]) -> None:
    kafka, redis = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    name = unique_name()
    result = localflow("doctor", str(redis_catalog(tmp_path, name)), "--timeout", "10",
                       env=cli_env(KAFKA_BOOTSTRAP_SERVERS=kafka, REDIS_URL=f"redis://{redis}/0",
                                   ESTUARY_ACCESS_TOKEN="", ESTUARY_JWT_TOKEN="", ESTUARY_REFRESH_TOKEN=""))
    assert result.returncode == 1
    assert result.stderr == "", "no log line of a client library"
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"FAIL  kafka {kafka} +unreachable: no Kafka broker answers at {kafka}", lines[0]), lines[0]
    assert re.fullmatch(rf"FAIL  {name}/cache: redis redis://{redis}/0 +unreachable: connection refused by {redis}",
                        lines[1]), lines[1]
    assert re.fullmatch(r"WARN  estuary refresh token +ESTUARY_REFRESH_TOKEN is not set", lines[-3]), lines[-3]
    assert all(ln[:6] in ("OK    ", "FAIL  ", "WARN  ", "SKIP  ") for ln in lines[:-2])
    assert not any("(not required)" in ln or "<" in ln or "Error:" in ln for ln in lines), "no reprs, no type names"
    assert re.fullmatch(r"2 required check\(s\) failed, \d optional check\(s\) warned", lines[-2]), lines[-2]
    assert lines[-1] == "no broker? try localflow demo --keep-services"


def test_output_json_gives_every_check_and_the_verdict(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    result = localflow("doctor", str(redis_catalog(tmp_path, name)), "--output", "json",
                       env=cli_env(ESTUARY_REFRESH_TOKEN=""))
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads(result.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert checks[f"kafka {services_env['KAFKA_BOOTSTRAP_SERVERS']}"]["state"] == "OK"
    assert checks[f"{name}/cache: redis {services_env['REDIS_URL']}"]["state"] == "OK"
    assert checks["estuary refresh token"] == {"state": "WARN", "check": "estuary refresh token",
                                               "detail": "ESTUARY_REFRESH_TOKEN is not set", "required": False}
    assert (report["ok"], report["failed"], report["hint"]) == (True, 0, None)


def test_doctor_reports_an_expired_estuary_token(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    token = jwt(iat=int(time.time()) - 20 * 86400)  # no exp: 14 days after iat, so 6 days ago
    result = localflow("doctor", str(redis_catalog(tmp_path, unique_name())),
                       env=cli_env(ESTUARY_JWT_TOKEN=token, ESTUARY_ACCESS_TOKEN=""))
    line = line_of(result.stdout, "estuary token ESTUARY_JWT_TOKEN")
    assert line.startswith("WARN  ") and "expired" in line and "(6.0 days ago)" in line
    assert result.returncode == 0, "an Estuary token is never required"


def test_doctor_never_prints_tokens_or_passwords(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    """The Sophia catalog with every secret set, and sources and endpoints failing with them."""
    secrets = {
        "ESTUARY_ACCESS_TOKEN": jwt(exp=int(time.time()) + 86400),
        "ESTUARY_REFRESH_TOKEN": "refresh-token-5f0a9c2e71",
        "SOPHIA_API_TOKEN": "sophia-api-token-88d1c0",
        "POSTGRES_PASSWORD": "pg-password-3b7e11",
        "REDIS_PASSWORD": "redis-password-c0ffee",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-key-9e8d7c6b",
        "LOCALFLOW_MASK_KEY": "mask-key-12ab34cd",
    }
    pg_port, redis_port = services_env["POSTGRES_PORT"], services_env["REDIS_PORT"]
    env = cli_env(**secrets, POSTGRES_URL=f"postgresql://sophia:{secrets['POSTGRES_PASSWORD']}@127.0.0.1:{pg_port}/x",
                  REDIS_URL=f"redis://:{secrets['REDIS_PASSWORD']}@127.0.0.1:{redis_port}/0",
                  SOPHIA_API_URL=f"http://127.0.0.1:{free_port()}/v1/records")
    result = localflow("doctor", str(ROOT / "examples/sophia/flow.yaml"), "--timeout", "3", env=env)
    output = result.stdout + result.stderr
    assert result.stdout.count("\n") >= 8, output
    for name, value in secrets.items():
        assert value not in output, f"{name} leaked"
    assert "ESTUARY_REFRESH_TOKEN is present" in output
