"""What the archive knows about itself: markers, the last archived object of a partition, uploads.

Exactly once without a checkpoint store (SPEC "s3"): the archive *is* the checkpoint.

* Every data object is named by its partition and offset range, so the highest last offset
  among a partition's objects is where archiving resumes.
* Finding it stays bounded as the archive grows: a small marker per partition (written after
  each upload) names the last object its writer knew; a resume lists only that object's hour
  after it (``StartAfter``) and the hours that exist after that hour. Hours are monotonic per
  partition (see ``naming``), so nothing newer can hide in an earlier hour. The marker alone
  would not do: a crash can fall between an upload and its marker, and the listing finds
  that object.
* The marker is also the partition's fencing token. A new owner claims it on assignment with a
  conditional write; before each upload the owner checks the marker is still its own, and
  after each upload it moves the marker with ``If-Match`` on the ETag it holds. A replaced
  worker ("zombie") therefore learns it was fenced before it uploads, except in one window
  S3 cannot close (its check passed, then the new owner claimed, then its upload landed).
  Such an object overlaps the new owner's objects by offsets; its marker write then fails, so
  the zombie stops. Overlaps are visible from names alone, and ``verify`` reads the archive
  de-duplicated by offset (each line's offset is known from the name and ``gaps`` metadata).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from botocore.exceptions import ClientError
from pydantic import Field, ValidationError

from connectors.s3.client import code_of, status_of
from connectors.s3.config import Advanced
from connectors.s3.naming import CONTENT_TYPE, Layout, ObjectName
from pipeline.sdk.config import Model
from pipeline.sdk.errors import CheckpointError, ConfigError, EndpointError, Fenced

log = logging.getLogger("localflow.s3")


class Marker(Model):
    """Per-partition state: a lower bound of what is archived, and who owns the partition."""

    version: Literal[1] = 1
    next_offset: int | None
    """Every offset below this is archived (None: nothing yet)."""
    key: str | None
    """The last data object the owner knew of (None: none)."""
    owner: str
    updated_at: str = Field(default_factory=lambda: _now())


@dataclass
class Claim:
    """A worker's hold on a partition: its owner token, and where archiving resumes."""

    owner: str
    next_offset: int | None
    last: ObjectName | None


class Archive:
    """S3 operations of one bucket. ``s3`` is an open aioboto3 client."""

    def __init__(self, s3: Any, bucket: str, advanced: Advanced) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.advanced = advanced

    # ------------------------------------------------------------------ bucket and lifecycle

    async def ensure_bucket(self, create: bool, region: str, place: str) -> None:
        """Check the bucket exists; create it only when allowed, else say which bucket is missing."""
        try:
            await self.s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if status_of(e) != 404:
                raise EndpointError(f"S3 bucket {self.bucket!r}: HeadBucket answered HTTP {status_of(e)} "
                                    f"{code_of(e)}; check the credentials and the bucket policy") from e
        if not create:
            raise ConfigError(f"S3 bucket {self.bucket!r} does not exist: create it, or set "
                              "create_bucket: true to let localflow create it", place)
        await self.create_bucket(region)

    async def create_bucket(self, region: str) -> None:
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            await self.s3.create_bucket(Bucket=self.bucket, **extra)
        except ClientError as e:
            if code_of(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        log.info("created S3 bucket %s", self.bucket)

    async def ensure_lifecycle(self, retention: dict[str, int | None]) -> None:
        """Make the bucket's lifecycle hold one expiry rule per prefix with a retention.

        ``retention`` maps a prefix to its days (None: no rule). Rules of other owners are kept;
        ours are recognised by their ID (``localflow <prefix>``).
        """
        try:
            current = (await self.s3.get_bucket_lifecycle_configuration(Bucket=self.bucket)).get("Rules", [])
        except ClientError as e:
            if code_of(e) != "NoSuchLifecycleConfiguration":
                raise
            current = []
        ours = {f"localflow {prefix}"[:255]: (prefix, days) for prefix, days in retention.items()}
        rules = [r for r in current if r.get("ID") not in ours]
        for rule_id, (prefix, days) in ours.items():
            if days is not None:
                rules.append({"ID": rule_id, "Filter": {"Prefix": prefix}, "Status": "Enabled",
                              "Expiration": {"Days": days},
                              "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}})
        if _rules_key(rules) == _rules_key(current):
            return
        if rules:
            await self.s3.put_bucket_lifecycle_configuration(Bucket=self.bucket,
                                                             LifecycleConfiguration={"Rules": rules})
        else:
            await self.s3.delete_bucket_lifecycle(Bucket=self.bucket)

    # ------------------------------------------------------------------ markers (fencing)

    async def read_marker(self, layout: Layout, partition: int) -> tuple[Marker | None, str | None]:
        """The partition's marker and its ETag, or (None, None) when there is none."""
        key = layout.marker_key(partition)
        try:
            got = await self.s3.get_object(Bucket=self.bucket, Key=key)
            async with got["Body"] as body:
                raw = await body.read()
        except ClientError as e:
            if code_of(e) in ("NoSuchKey", "404"):
                return None, None
            raise
        try:
            return Marker.model_validate_json(raw), got["ETag"]
        except ValidationError as e:
            raise CheckpointError(f"s3://{self.bucket}/{key} is not a localflow marker of a known version: "
                                  f"{e.errors(include_url=False)[0]['msg']}. Move it aside to rebuild it from "
                                  "the archive.") from e

    async def write_marker(self, layout: Layout, partition: int, marker: Marker, *, etag: str | None,
                           conditional: bool) -> None:
        """Write the marker; with ``conditional``, only over ``etag`` (None: only if absent).

        Raises Fenced when the marker changed since: another worker claimed the partition.
        """
        key = layout.marker_key(partition)
        condition: dict[str, str] = {}
        if conditional:
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            await self.s3.put_object(Bucket=self.bucket, Key=key, Body=marker.model_dump_json().encode(),
                                           ContentType="application/json", **condition)
        except ClientError as e:
            if status_of(e) in (409, 412):  # 409: a concurrent conditional write won
                raise Fenced(f"s3://{self.bucket}/{key} was changed by another worker "
                             f"(now owned by someone other than {marker.owner})") from e
            if status_of(e) == 501:
                raise ConfigError(f"the S3 store rejects conditional writes on s3://{self.bucket}/{key}: set "
                                  "advanced.conditional_writes: false") from e
            raise

    async def claim(self, layout: Layout, partition: int, owner: str, conditional: bool) -> Claim:
        """Take the partition over: find where its archive ends, then write our marker.

        Two workers claiming at once: the conditional write lets exactly one win each round;
        the loser re-reads and claims after it (the newest assignee owns the partition).
        """
        for _ in range(5):
            marker, etag = await self.read_marker(layout, partition)
            last = await self.last_object(layout, partition, marker)
            next_offset = marker.next_offset if marker else None
            if last is not None and (next_offset is None or last.last + 1 > next_offset):
                next_offset = last.last + 1
            known = last.key if last else (marker.key if marker else None)
            mine = Marker(next_offset=next_offset, key=known, owner=owner)
            try:
                await self.write_marker(layout, partition, mine, etag=etag, conditional=conditional)
            except Fenced:
                continue
            return Claim(owner, next_offset, last)
        raise Fenced(f"partition {partition} of {layout.data}: other workers keep claiming it; "
                     "is the same task running under two consumer groups?")

    async def check_owner(self, layout: Layout, partition: int, owner: str) -> str | None:
        """Raise Fenced unless the marker is still ours; its ETag (None: it vanished, e.g. a new bucket)."""
        marker, etag = await self.read_marker(layout, partition)
        if marker is not None and marker.owner != owner:
            raise Fenced(f"partition {partition} of s3://{self.bucket}/{layout.data} was taken over by "
                         f"{marker.owner}")
        return etag

    # ------------------------------------------------------------------ finding the end

    async def last_object(self, layout: Layout, partition: int, marker: Marker | None) -> ObjectName | None:
        """The object with the highest last offset of the partition, looking only after the marker."""
        after = layout.parse(marker.key) if marker and marker.key else None
        best: ObjectName | None = after
        for hour in await self.hours(layout, after.hour if after else None):
            prefix = layout.partition_prefix(hour, partition)
            start = after.key if after and after.hour == hour else ""
            async for key in self.keys(prefix, start_after=start):
                name = layout.parse(key)
                if name is not None and name.partition == partition and (best is None or name.last > best.last):
                    best = name
        return best

    async def hours(self, layout: Layout, since: str | None) -> list[str]:
        """Hours (``dt=.../hr=..``) holding objects of the layout, from ``since`` on, ascending."""
        since_day = since[:13] if since else ""  # "dt=YYYY-MM-DD"
        out: list[str] = []
        for day in await self._folders(f"{layout.data}dt=", f"{layout.data}{since_day}" if since else ""):
            day_name = day[len(layout.data):-1]
            start = f"{layout.data}{since}" if since and day_name == since_day else ""
            for hour in await self._folders(f"{day}hr=", start):
                out.append(hour[len(layout.data):-1])
        return out

    async def _folders(self, prefix: str, start_after: str) -> list[str]:
        out: list[str] = []
        args = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
        if start_after:
            args["StartAfter"] = start_after
        async for page in self.s3.get_paginator("list_objects_v2").paginate(**args):
            out.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        return out

    async def keys(self, prefix: str, start_after: str = ""):  # noqa: ANN201 - async iterator of keys
        """Keys under ``prefix`` (after ``start_after``), ascending."""
        args = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            args["StartAfter"] = start_after
        async for page in self.s3.get_paginator("list_objects_v2").paginate(**args):
            for item in page.get("Contents", []):
                yield item["Key"]

    # ------------------------------------------------------------------ uploads

    async def put(self, key: str, body: bytes, encoding: str | None, metadata: dict[str, str]) -> None:
        """Upload one object; multipart when large. A retry with the same key rewrites the same bytes."""
        headers: dict[str, Any] = {"ContentType": CONTENT_TYPE, "Metadata": metadata}
        if encoding:
            headers["ContentEncoding"] = encoding
        if len(body) < self.advanced.multipart_threshold:
            await self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, **headers)
            return
        upload = await self.s3.create_multipart_upload(Bucket=self.bucket, Key=key, **headers)
        upload_id = upload["UploadId"]
        try:
            size = self.advanced.part_size
            parts = []
            for number, start in enumerate(range(0, len(body), size), start=1):
                part = await self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                 PartNumber=number, Body=body[start:start + size])
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
            await self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                    MultipartUpload={"Parts": parts})
        except BaseException:
            try:  # best effort; a lifecycle rule aborts what is left after a day
                await self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception as e:  # noqa: BLE001 - the upload's own error is the one to report
                log.debug("abort of multipart upload %s failed: %r", key, e)
            raise


def _rules_key(rules: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(sorted(rules, key=lambda r: str(r.get("ID"))), option=orjson.OPT_SORT_KEYS)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
