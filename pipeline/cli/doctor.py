"""`localflow doctor`: can this catalog run here? One line per check, secrets never shown.

Checks, in order: the Kafka broker; each task's endpoint through its connector's ``doctor``
hook (required unless the connector says otherwise); and, per the SPEC's "Estuary fallback",
``api.estuary.dev`` (DNS, then HTTPS) and the Estuary tokens (expiry read from the JWT without
verifying it; the refresh token only reported present or absent). Estuary being unreachable
is expected (it is why localflow exists), so those checks are never required.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx
import orjson
import typer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from pipeline.cli.app import (
    CATALOG_ARG,
    OUTPUT,
    LogFormat,
    Output,
    app,
    load_or_exit,
    run_command,
    setup,
)
from pipeline.runtime.catalog import Catalog
from pipeline.sdk.connector import Check
from pipeline.telemetry.logs import describe, redact

ESTUARY_HOST = "api.estuary.dev"
ESTUARY_TOKEN_ENVS = ("ESTUARY_ACCESS_TOKEN", "ESTUARY_JWT_TOKEN")
ESTUARY_REFRESH_ENV = "ESTUARY_REFRESH_TOKEN"
ESTUARY_TOKEN_LIFETIME = 14 * 86400
"""The seed: Estuary access tokens expire after 14 days (used when a token has no ``exp``)."""


NO_BROKER_HINT = "no broker? try localflow demo --keep-services"
"""Printed under a failed Kafka check: the demo's embedded services, kept up, with their export lines."""
KAFKA_CHECK = "kafka "


@dataclass(frozen=True)
class Line:
    """One printed line: OK, FAIL (a required check failed), WARN (an optional one did), or SKIP
    (nothing could be checked)."""

    state: Literal["OK", "FAIL", "WARN", "SKIP"]
    check: Check

    @property
    def blocking(self) -> bool:
        return self.state == "FAIL"

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "check": self.check.name, "detail": tidy(self.check.detail),
                "required": self.check.required}


def line(check: Check) -> Line:
    return Line("OK" if check.ok else "FAIL" if check.required else "WARN", check)


def kafka_failed(lines: list[Line]) -> bool:
    return any(ln.check.name.startswith(KAFKA_CHECK) and ln.state == "FAIL" for ln in lines)


_REFUSED = re.compile(r"(?:\w+Error: )?(?:\[Errno 111\]|Error 111 connecting to \S+) "
                      r"Connect call failed \('([^']*)', (\d+)(?:, \d+, \d+)?\)\.?")
"""asyncio's refusal as drivers quote it, with its address as a tuple (asyncpg, redis-py)."""


def tidy(detail: str) -> str:
    """A connector's detail without the Python tuple of asyncio's refusal: ``connection refused by HOST:PORT``."""
    return _REFUSED.sub(lambda m: f"connection refused by {m[1]}:{m[2]}", detail)


def render(lines: list[Line]) -> list[str]:
    """The report as printed: one line per check, a summary, and a hint when no broker answered."""
    width = max(len(ln.check.name) for ln in lines)
    out = [redact(f"{ln.state:<4}  {ln.check.name:<{width}}  {tidy(ln.check.detail)}".rstrip()) for ln in lines]
    failed = sum(ln.blocking for ln in lines)
    warned = sum(ln.state == "WARN" for ln in lines)
    summary = f"{failed} required check(s) failed" if failed else "all required checks passed"
    out.append(summary + (f", {warned} optional check(s) warned" if warned else ""))
    if kafka_failed(lines):
        out.append(NO_BROKER_HINT)
    return out


def as_json(lines: list[Line]) -> dict[str, object]:
    """``--output json``: every check, and the same verdict as the exit code."""
    return {"ok": not any(ln.blocking for ln in lines),
            "failed": sum(ln.blocking for ln in lines), "warned": sum(ln.state == "WARN" for ln in lines),
            "checks": [{k: redact(v) if isinstance(v, str) else v for k, v in ln.as_dict().items()} for ln in lines],
            "hint": NO_BROKER_HINT if kafka_failed(lines) else None}


async def check_kafka(catalog: Catalog, timeout: float) -> Check:  # noqa: ASYNC109
    servers = catalog.kafka.bootstrap_servers
    admin = AIOKafkaAdminClient(**catalog.kafka.client_options(), request_timeout_ms=int(timeout * 1000))
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            topics = await admin.list_topics()
    except (KafkaError, OSError, TimeoutError) as e:
        why = f"no answer within {timeout:g}s" if isinstance(e, TimeoutError) else describe(e)
        return Check(KAFKA_CHECK + servers, False, f"unreachable: {why}")
    finally:
        await admin.close()
    return Check(KAFKA_CHECK + servers, True, f"answered, {len(topics)} topics")


async def check_endpoints(catalog: Catalog, timeout: float) -> list[Line]:  # noqa: ASYNC109
    """Each capture's and materialization's connector ``doctor`` hook, names prefixed by task."""
    from pipeline.runtime.registry import load_connector

    out: list[Line] = []
    for name, spec in {**catalog.captures, **catalog.materializations}.items():
        connector = load_connector(spec.connector)
        if connector.doctor is None:
            out.append(Line("SKIP", Check(f"{name}: {spec.connector}", True,
                                          "the connector has no doctor check", required=False)))
            continue
        try:
            async with asyncio.timeout(timeout):
                checks = await connector.doctor(spec.config)
        except TimeoutError:
            checks = [Check(spec.connector, False, f"no answer within {timeout:g}s")]
        except Exception as e:  # noqa: BLE001 - a broken hook is a failed check, not a crash
            checks = [Check(spec.connector, False, f"check failed: {describe(e)}")]
        out.extend(line(Check(f"{name}: {c.name}", c.ok, c.detail, c.required)) for c in checks)
    return out


async def check_estuary(host: str, timeout: float) -> list[Check]:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as e:
        why = "no answer in time" if isinstance(e, TimeoutError) else (e.strerror or describe(e)).lower()
        return [Check(f"estuary dns {host}", False, f"does not resolve ({why}); localflow runs without it",
                      required=False),
                Check(f"estuary https {host}", False, "not tried: the name does not resolve", required=False)]
    address = infos[0][4][0]
    checks = [Check(f"estuary dns {host}", True, f"resolves to {address}", required=False)]
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(f"https://{host}/")
    except httpx.HTTPError as e:
        checks.append(Check(f"estuary https {host}", False, f"unreachable: {describe(e)}", required=False))
    else:
        checks.append(Check(f"estuary https {host}", True, f"answered HTTP {response.status_code}", required=False))
    return checks


async def check_api(env: dict[str, str], timeout: float) -> Line:  # noqa: ASYNC109
    """The control plane named by LOCALFLOW_API_URL: reachable (not required: `localflow run`
    serves it) and LOCALFLOW_API_TOKEN accepted (required: a wrong token is a broken setup)."""
    url, token = env.get("LOCALFLOW_API_URL", "").rstrip("/"), env.get("LOCALFLOW_API_TOKEN", "")
    if not url:
        return Line("SKIP", Check("localflow api", True, "LOCALFLOW_API_URL is not set", required=False))
    name = f"localflow api {url}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(f"{url}/v1/health", headers=headers)
    except httpx.HTTPError as e:
        return line(Check(name, False, f"unreachable: {type(e).__name__}: {e}".rstrip(": "), required=False))
    if response.status_code == 401:
        why = "LOCALFLOW_API_TOKEN was refused" if token else "a token is required: LOCALFLOW_API_TOKEN is not set"
        return line(Check(name, False, why))
    try:
        health = response.json()
        detail = f"{health['status']}, {health['tasks']['total']} task(s)"
    except (ValueError, KeyError, TypeError):
        return line(Check(name, False, f"answered HTTP {response.status_code}, not localflow's health"))
    return line(Check(name, response.is_success, f"{detail}; {'token accepted' if token else 'no token needed'}"))


def check_tokens(env: dict[str, str], now: float | None = None) -> list[Check]:
    """Expiry of the Estuary access token and presence of the refresh token; never the tokens."""
    now = time.time() if now is None else now
    checks = []
    name = next((n for n in ESTUARY_TOKEN_ENVS if env.get(n)), None)
    if name is None:
        checks.append(Check("estuary token", False, f"{' / '.join(ESTUARY_TOKEN_ENVS)} not set "
                            f"(only needed to use Estuary itself)", required=False))
    else:
        checks.append(_token_expiry(name, env[name], now))
    present = bool(env.get(ESTUARY_REFRESH_ENV))
    checks.append(Check("estuary refresh token", present,
                        f"{ESTUARY_REFRESH_ENV} is {'present' if present else 'not set'}", required=False))
    return checks


def _token_expiry(name: str, token: str, now: float) -> Check:
    label = f"estuary token {name}"
    claims = _jwt_claims(token)
    if claims is None:
        return Check(label, False, "is not a JWT: its expiry cannot be read", required=False)
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) and isinstance(iat, int | float):
        exp = iat + ESTUARY_TOKEN_LIFETIME
    if not isinstance(exp, int | float):
        return Check(label, False, "a JWT without `exp` or `iat`: its expiry cannot be read", required=False)
    when = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    left = exp - now
    if left <= 0:
        return Check(label, False, f"expired {when} ({_days(-left)} ago); Estuary tokens last 14 days: "
                                   f"get a new one, or use the refresh token", required=False)
    return Check(label, True, f"valid until {when} (in {_days(left)})", required=False)


def _jwt_claims(token: str) -> dict | None:
    """The payload of a JWT, decoded without verifying its signature (we only read the dates)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _days(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


async def diagnose(catalog: Catalog, *, timeout: float = 5.0, estuary_host: str = ESTUARY_HOST,  # noqa: ASYNC109
                   env: dict[str, str] | None = None) -> list[Line]:
    """Every check of the catalog, in print order."""
    env = dict(os.environ) if env is None else env
    kafka, endpoints, estuary, api = await asyncio.gather(
        check_kafka(catalog, timeout), check_endpoints(catalog, timeout), check_estuary(estuary_host, timeout),
        check_api(env, timeout))
    tokens = check_tokens(env)
    return [line(kafka), *endpoints, api, *(line(c) for c in estuary), *(line(c) for c in tokens)]


# ---------------------------------------------------------------------------- the command

@app.command()
def doctor(
    catalog: Path = CATALOG_ARG,
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds each check may take."),
    output: Output = OUTPUT,
) -> None:
    """Check that the catalog can run here: Kafka, every task's endpoint, and api.estuary.dev.

    One line per check: OK, FAIL (a required check failed), WARN (an optional one did) or
    SKIP, and why. Estuary (DNS, HTTPS, token expiry, refresh token present) is reported but
    never required: localflow is what runs while it is unreachable. Secrets are never
    printed. Exit 1 when a required check fails.

    \b
    Example:
      localflow doctor examples/sophia/flow.yaml
      localflow doctor examples/sophia/flow.yaml --output json
    """
    from pipeline.cli import doctor as dr

    setup(LogFormat.text, "error", quiet_clients=True)
    cat = load_or_exit(catalog)

    async def go() -> int:
        lines = await dr.diagnose(cat, timeout=timeout)
        if output == Output.json:
            print(orjson.dumps(dr.as_json(lines), option=orjson.OPT_INDENT_2).decode())
        else:
            print("\n".join(dr.render(lines)))
        return 1 if any(ln.blocking for ln in lines) else 0

    raise typer.Exit(run_command(go))
