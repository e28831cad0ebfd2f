"""The S3 side: one aiobotocore client per app, HEAD for metadata, ranged GETs for bytes.

Credentials come from botocore's standard chain (env, shared profile, web identity,
ECS, IMDS) and are refreshed by botocore itself; nothing here copies a key.
Every botocore failure becomes one of the error types in `errors`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.utils import parse_timestamp

from . import __version__
from .config import S3Config
from .errors import (
    AssetNotFound,
    ObjectChanged,
    S3ProxyError,
    UpstreamDenied,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .metrics import Metrics

# Bytes asked of the upstream body per read: small enough that a client's back-pressure
# stops S3 reads within a few chunks, large enough to keep syscalls few.
READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class ObjectMeta:
    key: str
    size: int
    etag: str
    last_modified: datetime
    content_type: str | None


class S3Upstream:
    """Owns the aiobotocore client; opened by `start()`, closed by `close()`."""

    def __init__(self, config: S3Config, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._stack = AsyncExitStack()
        self._client: Any = None

    @property
    def bucket(self) -> str:
        return self._config.bucket

    async def start(self) -> None:
        cfg = self._config
        aio_config = AioConfig(
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            retries={"total_max_attempts": cfg.max_attempts, "mode": "standard"},
            max_pool_connections=cfg.max_connections,
            # S3 returns whole-object checksums, which a ranged GET can not be checked
            # against; computing them costs CPU on every byte for nothing.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # S3-compatible stores behind an endpoint URL rarely resolve bucket subdomains.
            s3={"addressing_style": "path" if cfg.endpoint_url else "auto"},
            # Named in S3's access logs; and botocore's own User-Agent, rebuilt for every
            # request, cost ~0.1 ms of each cold read.
            user_agent=f"s3proxy/{__version__}",
        )
        session = get_session()
        # Last-Modified is an HTTP date: the standard library parses it several times
        # faster than botocore's default (dateutil), which stays for anything else.
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_parse_timestamp)
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", region_name=cfg.region, endpoint_url=cfg.endpoint_url,
                                  config=aio_config))

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def head(self, key: str) -> ObjectMeta:
        started = time.monotonic()
        try:
            response = await self._client.head_object(Bucket=self._config.bucket, Key=key)
        except Exception as exc:
            raise self._failed("head", started, exc) from None
        self._succeeded("head", started)
        return _meta_from(key, response, int(response["ContentLength"]))

    async def read(self, key: str, start: int, end: int, etag: str
                   ) -> AsyncGenerator[bytes, None]:
        """Stream bytes start..end (inclusive) of the version with `etag`.

        An async generator: closing it (or abandoning it) closes the S3 connection at
        once rather than draining the rest of the body.
        """
        started = time.monotonic()
        try:
            response = await self._client.get_object(
                Bucket=self._config.bucket, Key=key, Range=f"bytes={start}-{end}", IfMatch=etag)
        except Exception as exc:
            raise self._failed("get", started, exc) from None
        self._succeeded("get", started)
        async for chunk in self._body(response["Body"], end - start + 1):
            yield chunk

    async def read_unseen(self, key: str, start: int, end: int
                          ) -> tuple[ObjectMeta, AsyncGenerator[bytes, None]] | None:
        """A ranged GET of an object whose metadata is not known yet: the answer carries
        it (size in Content-Range, ETag, Last-Modified, type), which saves the HEAD and
        its round trip. None when `start` lies beyond the end (ask with a HEAD then)."""
        started = time.monotonic()
        try:
            response = await self._client.get_object(
                Bucket=self._config.bucket, Key=key, Range=f"bytes={start}-{end}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                self._succeeded("get", started)
                return None
            raise self._failed("get", started, exc) from None
        except Exception as exc:
            raise self._failed("get", started, exc) from None
        self._succeeded("get", started)
        length = int(response["ContentLength"])
        content_range = response.get("ContentRange") or ""
        size = int(content_range.rpartition("/")[2]) if "/" in content_range else length
        first = int(content_range.split()[1].split("-")[0]) if content_range else 0
        meta = _meta_from(key, response, size)
        if first != start:  # not the range asked for: do not guess, look it up properly
            response["Body"].close()
            return None
        return meta, self._body(response["Body"], length)

    async def _body(self, body: Any, length: int) -> AsyncGenerator[bytes, None]:
        try:
            remaining = length
            while remaining > 0:
                try:
                    chunk = await body.read(min(READ_CHUNK, remaining))
                except Exception as exc:
                    raise _classify(exc) from None
                if not chunk:
                    raise UpstreamUnavailable("upstream body ended early")
                remaining -= len(chunk)
                self._metrics.upstream_bytes.inc(len(chunk))
                yield chunk
        finally:
            body.close()

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        started = time.monotonic()
        try:
            await self._client.put_object(Bucket=self._config.bucket, Key=key, Body=data,
                                          ContentType=content_type)
        except Exception as exc:
            raise self._failed("put", started, exc) from None
        self._succeeded("put", started)

    async def probe(self, key: str | None) -> None:
        """Raise unless S3 answers: HEAD of `key`, or a bucket-level check."""
        if key:
            await self.head(key)
            return
        started = time.monotonic()
        try:
            await self._client.head_bucket(Bucket=self._config.bucket)
        except Exception as exc:
            raise self._failed("head", started, exc) from None
        self._succeeded("head", started)

    def _succeeded(self, op: str, started: float) -> None:
        now = time.monotonic()
        self._metrics.upstream_requests.labels(op=op, outcome="ok").inc()
        self._metrics.upstream_duration.labels(op=op).observe(now - started)

    def _failed(self, op: str, started: float, exc: BaseException) -> S3ProxyError:
        error = _classify(exc)
        outcome = {AssetNotFound: "not_found", ObjectChanged: "changed"}.get(type(error), "error")
        self._metrics.upstream_requests.labels(op=op, outcome=outcome).inc()
        self._metrics.upstream_duration.labels(op=op).observe(time.monotonic() - started)
        return error


def _parse_timestamp(value: str) -> datetime:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        fallback: datetime = parse_timestamp(value)
        return fallback
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # "-0000": still UTC


def _meta_from(key: str, response: dict[str, Any], size: int) -> ObjectMeta:
    """Object metadata from a HEAD or GET answer (the size comes from the caller: a
    ranged GET's Content-Length is the range's, not the object's)."""
    last_modified = response.get("LastModified") or datetime.now(UTC)
    return ObjectMeta(key=key, size=size, etag=response.get("ETag", ""),
                      last_modified=last_modified.astimezone(UTC),
                      content_type=response.get("ContentType"))


def _classify(exc: BaseException) -> S3ProxyError:
    """Map a botocore/aiohttp failure to our error types, with a message safe to show."""
    if isinstance(exc, S3ProxyError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "NotFound", "404") or status == 404 and code != "NoSuchBucket":
            return AssetNotFound("object not found")
        if code in ("PreconditionFailed", "412") or status == 412:
            return ObjectChanged("object changed upstream")
        if status >= 500 or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
            return UpstreamUnavailable(f"upstream error {status or code}")
        return UpstreamDenied(f"upstream refused the request ({code or status})")
    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError, asyncio.TimeoutError,
                        TimeoutError)):
        return UpstreamTimeout("upstream timed out")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return UpstreamDenied("no usable AWS credentials")
    if isinstance(exc, (BotoCoreError, aiohttp.ClientError, OSError)):
        return UpstreamUnavailable(f"upstream unreachable ({type(exc).__name__})")
    return UpstreamUnavailable(f"upstream failure ({type(exc).__name__})")
