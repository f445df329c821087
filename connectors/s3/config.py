"""Configuration of the S3 archive: the endpoint (bucket, credentials) and each binding's layout.

Example (``examples/sophia/flow.yaml``)::

    endpoint:
      s3:
        bucket: sophia-intel-data
        prefix: estuary/
        aws_access_key_id: ${AWS_ACCESS_KEY_ID:-}
        aws_secret_access_key: ${AWS_SECRET_ACCESS_KEY:-}
    bindings:
      - source: sophia/sophia_raw_data
        resource: {compression: zstd, max_age: 5m, retention_days: 365}
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from pipeline.sdk.config import Duration, Model
from pipeline.sdk.retry import Retry

MiB = 1024 * 1024
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def _prefix(value: str) -> str:
    if value and not value.endswith("/"):
        raise ValueError(f"{value!r} must end with '/' (e.g. {value + '/'!r}) or be empty")
    if value.startswith("/"):
        raise ValueError(f"{value!r} must not start with '/': S3 keys are relative to the bucket")
    return value


class Advanced(Model):
    """Rarely changed settings; the defaults suit AWS S3 and S3-compatible stores."""

    multipart_threshold: int = Field(default=8 * MiB, ge=5 * MiB,
                                     description="Objects of at least this many (compressed) bytes use multipart upload.")
    part_size: int = Field(default=8 * MiB, ge=5 * MiB, description="Bytes per multipart part (S3's minimum is 5 MiB).")
    connect_timeout: Duration = Field(default=10.0, gt=0, description="Timeout to open a connection to S3.")
    request_timeout: Duration = Field(default=60.0, gt=0, description="Read timeout of one S3 request.")
    retry: Retry = Field(default_factory=lambda: Retry(initial_backoff=0.2, max_backoff=10.0), description=(
        "Retries while S3 is unavailable (default here: from 200ms up to 10s, until the task stops; a "
        "stopping task keeps trying to flush for shutdown_timeout)."))
    overlap: bool = Field(default=True, description=(
        "Upload sealed objects while the next batches are read (each partition's objects one after the other, "
        "partitions side by side; apply waits only when a partition holds more than two sealed objects "
        "not yet uploaded): each object is reported durable by the call after its upload. Off: apply returns once "
        "the objects it sealed are uploaded."))
    shutdown_timeout: Duration = Field(default=30.0, ge=0,
                                       description="How long a stopping task keeps trying to flush open batches.")
    conditional_writes: bool = Field(
        default=True,
        description="Move partition markers with If-Match / If-None-Match (AWS S3, MinIO, moto). Turn off only "
                    "for stores that reject conditional writes: the ownership check before each upload still "
                    "fences a replaced worker, but a race between two marker writes goes unnoticed.",
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="Bucket addressing; `path` for stores without virtual-host buckets.")


class S3Config(Model):
    """Where the archive lives and how to reach it. Credentials come from the environment only."""

    bucket: str = Field(description="Bucket name, e.g. sophia-intel-data.", examples=["sophia-intel-data"])
    prefix: str = Field(default="", description="Key prefix of every binding (e.g. `estuary/`); empty or ending in '/'.")
    region: str = Field(default="us-east-1", description="AWS region of the bucket; ${AWS_DEFAULT_REGION}.")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, moto); empty or unset means AWS S3.")
    aws_access_key_id: SecretStr | None = Field(
        default=None, description="Secret: ${AWS_ACCESS_KEY_ID}. Empty uses the AWS default chain (env, profile, role).")
    aws_secret_access_key: SecretStr | None = Field(default=None, description="Secret: ${AWS_SECRET_ACCESS_KEY}.")
    create_bucket: bool = Field(
        default=False, description="Create the bucket when it is missing (local stores); else a missing bucket is an error.")
    advanced: Advanced = Field(default_factory=Advanced)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not _BUCKET.match(v) or ".." in v:
            raise ValueError(f"{v!r} is not a valid bucket name (3-63 of a-z 0-9 . -, starting and ending "
                             "with a letter or digit)")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return _prefix(v)

    @field_validator("endpoint_url", "aws_access_key_id", "aws_secret_access_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _both_keys(self) -> S3Config:
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            raise ValueError("set both aws_access_key_id and aws_secret_access_key, or neither "
                             "(to use the AWS default credential chain)")
        return self


class S3Resource(Model):
    """How one collection is archived: where, compressed how, and in batches of what size."""

    prefix: str | None = Field(default=None, description="Key prefix of this binding; defaults to the endpoint's.")
    compression: Literal["gzip", "zstd", "none"] = Field(default="gzip", description="Compression of each object.")
    max_documents: int = Field(default=10_000, ge=1, description="An object holds at most this many documents.")
    max_bytes: int = Field(default=16 * MiB, ge=1024,
                           description="An object holds at most about this many bytes of JSON lines (before compression).")
    max_age: Duration = Field(default=300.0, gt=0,
                              description="An open batch is uploaded once its first document waited this long.")
    backfill: int = Field(default=0, ge=0, le=9999,
                          description="Increment to re-archive the collection from the start under a new `v<NNNN>/` path.")
    retention_days: int | None = Field(default=None, ge=1,
                                       description="Objects expire after this many days (a bucket lifecycle rule).")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        return None if v is None else _prefix(v)
