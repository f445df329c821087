"""What the demo's live view shows of an S3 binding: the objects under its prefix."""

from __future__ import annotations

import shlex
from typing import Any

from pipeline.sdk.connector import Described

from .config import S3Config, S3Resource


def describe(config: S3Config, resource: S3Resource, collection: str) -> Described:
    prefix = (config.prefix if resource.prefix is None else resource.prefix) + collection + "/"
    held: dict[str, Any] = {}

    async def count() -> int | None:
        from connectors.s3.client import client

        if "s3" not in held:
            held["cm"] = client(config)
            held["s3"] = await held["cm"].__aenter__()
        s3 = held["s3"]
        n = 0
        try:
            async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=config.bucket, Prefix=prefix):
                n += page.get("KeyCount", 0)
        except s3.exceptions.NoSuchBucket:
            return None  # created by the archive's first upload
        return n

    async def close() -> None:
        cm = held.pop("cm", None)
        held.pop("s3", None)
        if cm is not None:
            await cm.__aexit__(None, None, None)

    return Described(f"s3://{config.bucket}/{prefix}", "objects", count, close, query=_aws(config, prefix))


def _aws(config: S3Config, prefix: str) -> str:
    endpoint = ["--endpoint-url", config.endpoint_url] if config.endpoint_url else []
    cmd = shlex.join(["aws", *endpoint, "s3", "ls", "--recursive", f"s3://{config.bucket}/{prefix}"])
    return cmd + ("   # with the catalog's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" if config.aws_access_key_id else "")
