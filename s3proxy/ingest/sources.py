"""Where jobs come from, and the lease that keeps one upload with one process.

- `QueueSource`: S3 event notifications in an SQS queue. The message's visibility timeout
  is the lease: extended while the job runs, the message deleted once the job is settled,
  made visible again at once when the job is given back (SIGTERM), or left to time out
  (a crash) so another process takes it.
- `PollSource`: for stores without notifications. Each pass lists the source prefix
  (ListObjectsV2) and takes an upload by creating its lease object with a conditional
  PUT (`If-None-Match: *`): of two pollers, one gets the object and the other a 412. A
  lease is renewed, taken over once expired, and finally rewritten as the upload's
  outcome, each by a PUT with `If-Match` on the ETag last seen, so two writers never both
  win. A settled lease (`done`, same upload ETag) keeps the upload from being taken again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..prepare import s3_reason
from .events import NotAnEvent, Upload, uploads_in

log = logging.getLogger("s3proxy.ingest")


class Lease(Protocol):
    async def renew(self) -> bool:
        """Extend it; False when it is no longer ours (the job must stop)."""

    async def settle(self, outcome: str) -> None:
        """The job is over (`ready`, `failed`, `skipped`): never take this upload again."""

    async def release(self, delay_s: float = 0.0) -> None:
        """Give it back, to be taken again after `delay_s`."""


@dataclass
class Job:
    upload: Upload
    lease: Lease


class _MessageLease:
    """One SQS message; an S3 event may announce several uploads, and the message goes
    when the last of them is settled (given back: it returns, the settled ones are then
    skipped as published)."""

    def __init__(self, source: QueueSource, receipt: str, jobs: int) -> None:
        self._source = source
        self._receipt = receipt
        self._open = jobs

    async def renew(self) -> bool:
        try:
            await self._source.sqs.change_message_visibility(
                QueueUrl=self._source.url,
                ReceiptHandle=self._receipt,
                VisibilityTimeout=int(self._source.lease_s),
            )
            return True
        except Exception as exc:
            log.warning("lease lost", extra={"fields": {"why": s3_reason(exc)}})
            return False

    async def settle(self, outcome: str) -> None:
        self._open -= 1
        if self._open == 0:
            await self._source.sqs.delete_message(
                QueueUrl=self._source.url, ReceiptHandle=self._receipt
            )

    async def release(self, delay_s: float = 0.0) -> None:
        await self._source.sqs.change_message_visibility(
            QueueUrl=self._source.url, ReceiptHandle=self._receipt, VisibilityTimeout=int(delay_s)
        )


class QueueSource:
    def __init__(self, sqs: Any, url: str, lease_s: float, wanted: Callable[[Upload], bool]):
        self.sqs = sqs
        self.url = url
        self.lease_s = lease_s
        self._wanted = wanted
        self.depth: int | None = None  # messages waiting, as SQS last said

    async def take(self, limit: int, wait_s: float) -> list[Job]:
        answer = await self.sqs.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=max(1, min(10, limit)),
            WaitTimeSeconds=int(max(0, min(20, wait_s))),
            VisibilityTimeout=int(self.lease_s),
        )
        jobs: list[Job] = []
        for message in answer.get("Messages", []):
            receipt = message["ReceiptHandle"]
            try:
                uploads = [u for u in uploads_in(message.get("Body", "")) if self._wanted(u)]
            except NotAnEvent as exc:
                log.warning("queue message dropped", extra={"fields": {"why": str(exc)}})
                uploads = []
            if not uploads:  # a test event, another prefix, not an event: nothing to do
                await self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=receipt)
                continue
            lease = _MessageLease(self, receipt, len(uploads))
            jobs.extend(Job(upload, lease) for upload in uploads)
        return jobs

    async def measure(self) -> None:
        attributes = await self.sqs.get_queue_attributes(
            QueueUrl=self.url, AttributeNames=["ApproximateNumberOfMessages"]
        )
        self.depth = int(attributes["Attributes"]["ApproximateNumberOfMessages"])


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    state: str  # running | done
    etag: str  # the upload's
    expires: float  # Unix seconds (running)
    outcome: str = ""

    def body(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def parse(cls, body: bytes) -> LeaseRecord | None:
        try:
            data = json.loads(body)
            return cls(
                owner=str(data["owner"]),
                state=str(data["state"]),
                etag=str(data["etag"]),
                expires=float(data["expires"]),
                outcome=str(data.get("outcome", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None  # damaged: treated as expired


def may_take(record: LeaseRecord | None, upload_etag: str, now: float) -> bool:
    """May a poller take an upload over an existing lease object? Not when it is settled
    for this very upload, nor while another's lease runs."""
    if record is None:
        return True
    if record.state == "done":
        return record.etag != upload_etag  # the key was uploaded again
    return record.expires <= now


class _ObjectLease:
    def __init__(self, source: PollSource, key: str, etag: str, upload: Upload) -> None:
        self._source = source
        self._key = key
        self._etag = etag  # of the lease object, as we last wrote it
        self._upload = upload

    async def _write(self, record: LeaseRecord) -> bool:
        try:
            answer = await self._source.s3.put_object(
                Bucket=self._source.bucket, Key=self._key, Body=record.body(), IfMatch=self._etag
            )
        except Exception as exc:
            log.warning("lease lost", extra={"fields": {"key": self._key, "why": s3_reason(exc)}})
            return False
        self._etag = answer["ETag"]
        return True

    async def renew(self) -> bool:
        return await self._write(self._source.record(self._upload.etag))

    async def settle(self, outcome: str) -> None:
        record = LeaseRecord(self._source.owner, "done", self._upload.etag, 0.0, outcome)
        await self._write(record)

    async def release(self, delay_s: float = 0.0) -> None:
        if delay_s > 0:  # left to expire then
            await self._write(self._source.record(self._upload.etag, delay_s))
            return
        try:
            await self._source.s3.delete_object(
                Bucket=self._source.bucket, Key=self._key, IfMatch=self._etag
            )
        except Exception as exc:
            log.warning("lease not released", extra={"fields": {"why": s3_reason(exc)}})


class PollSource:
    def __init__(
        self,
        s3: Any,
        bucket: str,
        prefix: str,
        lease_prefix: str,
        lease_s: float,
        owner: str,
        wanted: Callable[[Upload], bool],
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.lease_prefix = lease_prefix
        self.lease_s = lease_s
        self.owner = owner
        self._wanted = wanted
        self._records: dict[str, tuple[str, LeaseRecord | None]] = {}  # by lease ETag
        self.depth: int | None = None  # uploads waiting at the last pass

    def record(self, upload_etag: str, lasts_s: float | None = None) -> LeaseRecord:
        expires = time.time() + (self.lease_s if lasts_s is None else lasts_s)
        return LeaseRecord(self.owner, "running", upload_etag, expires)

    async def _list(self, prefix: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                found[entry["Key"]] = entry
        return found

    async def _read(self, key: str, etag: str) -> LeaseRecord | None:
        cached = self._records.get(key)
        if cached is not None and cached[0] == etag:
            return cached[1]
        try:
            answer = await self.s3.get_object(Bucket=self.bucket, Key=key)
            async with answer["Body"] as body:
                record = LeaseRecord.parse(await body.read())
            etag = answer["ETag"]
        except Exception as exc:
            if s3_reason(exc) in ("NoSuchKey", "404"):
                return None
            raise
        self._records[key] = (etag, record)
        return record

    async def take(self, limit: int, wait_s: float = 0.0) -> list[Job]:
        uploads = await self._list(self.prefix)
        leases = await self._list(self.lease_prefix)
        now = time.time()
        waiting: list[Upload] = []
        for key, entry in sorted(uploads.items(), key=lambda item: item[1]["LastModified"]):
            modified = entry["LastModified"]
            upload = Upload(
                self.bucket,
                key,
                int(entry.get("Size", 0)),
                str(entry.get("ETag", "")).strip('"'),
                modified.timestamp() if hasattr(modified, "timestamp") else None,
            )
            if not self._wanted(upload):
                continue
            lease = leases.get(self.lease_prefix + key)
            if lease is not None:
                record = await self._read(self.lease_prefix + key, lease["ETag"])
                if not may_take(record, upload.etag, now):
                    continue
            waiting.append(upload)
        self.depth = len(waiting)
        jobs: list[Job] = []
        for upload in waiting:
            if len(jobs) >= limit:
                break
            lease_key = self.lease_prefix + upload.key
            current = leases.get(lease_key)
            condition = {"IfMatch": current["ETag"]} if current else {"IfNoneMatch": "*"}
            try:
                answer = await self.s3.put_object(
                    Bucket=self.bucket,
                    Key=lease_key,
                    Body=self.record(upload.etag).body(),
                    **condition,
                )
            except Exception as exc:
                if s3_reason(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                    continue  # another poller was first
                raise
            jobs.append(Job(upload, _ObjectLease(self, lease_key, answer["ETag"], upload)))
        self.depth -= len(jobs)
        return jobs

    async def measure(self) -> None:
        """Depth is counted at each pass."""
