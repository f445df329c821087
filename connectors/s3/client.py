"""The S3 client (aioboto3), how its errors are classified, and the doctor check.

Errors are classified by type and by the structured parts of S3's answer (HTTP status, error
code), never by message text: connection failures, timeouts, 5xx, 429 and S3's throttling
codes are transient (retry the same request later); everything else is not.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, IncompleteReadError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError as BotoHTTPClientError

from connectors.s3.config import S3Config
from pipeline.sdk.connector import Check

_TRANSIENT_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException",
                              "RequestLimitExceeded", "InternalError", "ServiceUnavailable"})


def status_of(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def code_of(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def transient(e: BaseException) -> bool:
    """True when retrying the same request later may succeed (S3 down, slow, or throttling)."""
    if isinstance(e, ClientError):
        status = status_of(e)
        return status >= 500 or status in (408, 429) or code_of(e) in _TRANSIENT_CODES
    return isinstance(e, BotoConnectionError | BotoHTTPClientError | IncompleteReadError
                      | aiohttp.ClientError | asyncio.TimeoutError)


def where(config: S3Config) -> str:
    """The endpoint in words, for messages (never includes credentials)."""
    return config.endpoint_url or f"AWS S3 ({config.region})"


def session(config: S3Config) -> aioboto3.Session:
    key = config.aws_access_key_id
    secret = config.aws_secret_access_key
    return aioboto3.Session(
        aws_access_key_id=key.get_secret_value() if key else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        region_name=config.region,
    )


def client(config: S3Config, attempts: int = 3) -> Any:
    """An async context manager yielding an S3 client for ``config``.

    botocore makes up to ``attempts`` tries of a request; longer outages are the caller's to
    ride out (the materialization keeps its batch and retries with backoff).
    """
    a = config.advanced
    return session(config).client(
        "s3",
        endpoint_url=config.endpoint_url,
        config=Config(
            connect_timeout=a.connect_timeout,
            read_timeout=a.request_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": a.addressing_style},
        ),
    )


async def doctor(config: S3Config) -> list[Check]:
    """Can we reach the bucket with these credentials? (HeadBucket; no secret is ever printed.)"""
    name = f"s3 bucket {config.bucket} at {where(config)}"
    try:
        async with asyncio.timeout(config.advanced.connect_timeout + config.advanced.request_timeout):
            async with client(config, attempts=1) as s3:
                await s3.head_bucket(Bucket=config.bucket)
    except ClientError as e:
        status = status_of(e)
        why = {404: "the bucket does not exist (create it, or set create_bucket: true)",
               403: "access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
                    "and the bucket policy",
               301: f"the bucket is in another region than {config.region}: set region"}.get(status, "")
        return [Check(name, False, f"HTTP {status} {code_of(e)}" + (f": {why}" if why else ""))]
    except NoCredentialsError:
        return [Check(name, False, "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")]
    except (BotoCoreError, aiohttp.ClientError, TimeoutError) as e:
        return [Check(name, False, f"unreachable ({type(e).__name__}): is the endpoint right and up?")]
    return [Check(name, True, "reachable, credentials accepted")]


async def close_quietly(stack: contextlib.AsyncExitStack) -> None:
    """Close the client; a failure to close must not hide the error that got us here."""
    with contextlib.suppress(Exception):
        await stack.aclose()
