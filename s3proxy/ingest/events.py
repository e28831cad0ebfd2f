"""S3 event notifications, as an SQS queue delivers them (directly or through SNS)."""

from __future__ import annotations

import calendar
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus


@dataclass(frozen=True)
class Upload:
    """One uploaded object, as an event or a listing names it."""

    bucket: str
    key: str
    size: int = 0
    etag: str = ""  # without quotes; empty when the event did not say
    time: float | None = None  # when it was uploaded (Unix seconds), if known


class NotAnEvent(ValueError):
    """A message that is no S3 event notification (its body, shortened, is the reason)."""


def uploads_in(body: str) -> list[Upload]:
    """The objects an SQS message announces as created. S3's test event and events other
    than `ObjectCreated:*` announce none. Keys arrive URL-encoded (`+` for a space)."""
    try:
        message: Any = json.loads(body)
    except ValueError:
        raise NotAnEvent(f"not JSON: {body[:80]!r}") from None
    if isinstance(message, dict) and message.get("Type") == "Notification":  # through SNS
        try:
            message = json.loads(message.get("Message", ""))
        except (TypeError, ValueError):
            raise NotAnEvent("an SNS notification without an S3 event inside") from None
    if not isinstance(message, dict):
        raise NotAnEvent(f"not an S3 event: {body[:80]!r}")
    if message.get("Event") == "s3:TestEvent":
        return []
    records = message.get("Records")
    if not isinstance(records, list):
        raise NotAnEvent(f"no Records: {body[:80]!r}")
    uploads = []
    for record in records:
        if not isinstance(record, dict) or record.get("eventSource") != "aws:s3":
            continue
        if not str(record.get("eventName", "")).startswith("ObjectCreated:"):
            continue
        s3 = record.get("s3") or {}
        bucket = (s3.get("bucket") or {}).get("name")
        obj = s3.get("object") or {}
        key = obj.get("key")
        if not isinstance(bucket, str) or not isinstance(key, str):
            continue
        size = obj.get("size")
        uploads.append(
            Upload(
                bucket=bucket,
                key=unquote_plus(key),
                size=size if isinstance(size, int) and size >= 0 else 0,
                etag=str(obj.get("eTag") or "").strip('"'),
                time=parse_event_time(record.get("eventTime")),
            )
        )
    return uploads


def parse_event_time(value: object) -> float | None:
    """`2026-12-02T02:42:41.666Z` -> Unix seconds; None for anything else."""
    if not isinstance(value, str):
        return None
    whole, _, fraction = value.rstrip("Z").partition(".")
    try:
        seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
        return seconds + (float("0." + fraction) if fraction.isdigit() else 0.0)
    except ValueError:
        return None
