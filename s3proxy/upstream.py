"""The S3 side: one aiobotocore client per app, HEAD for metadata, ranged GETs for bytes.

Credentials come from botocore's standard chain (env, shared profile, web identity,
ECS, IMDS) and are refreshed by botocore itself; nothing here copies a key.
Every botocore failure becomes one of the error types in `errors`.
"""

from __future__ import annotations

import asyncio
import enum
import re
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
from .credentials import CredentialKeeper
from .errors import (
    AssetNotFound,
    ObjectChanged,
    RangeBeyondEnd,
    S3ProxyError,
    UpstreamDenied,
    UpstreamInvalid,
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


class NotModified(enum.Enum):
    """S3's 304: the version named in If-None-Match is still the current one."""

    NOT_MODIFIED = "not_modified"


NOT_MODIFIED = NotModified.NOT_MODIFIED


class Answer:
    """A GET whose head has arrived. Its outcome is counted once, when it ends:
    `ok` when the body came whole (or we closed it early), `error` when the body failed,
    `invalid` when the caller discarded it as not what was asked."""

    def __init__(
        self,
        upstream: S3Upstream,
        status: int,
        meta: ObjectMeta,
        content_range: tuple[int, int, int] | None,
        length: int,
        body: Any,
    ) -> None:
        self._upstream = upstream
        self.status = status
        self.meta = meta
        self.content_range = content_range
        self.length = length
        self._body = body
        self._counted = False

    def _end(self, outcome: str) -> None:
        if not self._counted:
            self._counted = True
            self._upstream._count("get", outcome)
        self._body.close()

    def close(self) -> None:
        """Not read after all (the reader left first): closed, counted as `ok`."""
        self._end("ok")

    def discard(self) -> None:
        """Not what was asked: nothing of it is used; counted as `invalid`."""
        self._end("invalid")

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body, exactly `length` bytes; UpstreamUnavailable if it ends short or fails.
        Closing the generator early closes the S3 connection at once."""
        remaining = self.length
        outcome = "ok"
        try:
            while remaining > 0:
                try:
                    chunk = await self._body.read(min(READ_CHUNK, remaining))
                except Exception as exc:
                    outcome = "error"
                    raise _classify(exc) from None
                if not chunk:
                    outcome = "error"
                    raise UpstreamUnavailable("upstream body ended early")
                if len(chunk) > remaining:  # more than its Content-Length: not trusted
                    outcome = "invalid"
                    raise UpstreamInvalid("upstream body longer than its length")
                remaining -= len(chunk)
                self._upstream._metrics.upstream_bytes.inc(len(chunk))
                yield chunk
        finally:
            self._end(outcome)


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
            timestamp_parser=_parse_timestamp
        )
        # resolved before the client, which then uses these very credentials
        keeper = await CredentialKeeper.start(session)
        if keeper is not None:
            self._stack.push_async_callback(keeper.close)
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3", region_name=cfg.region, endpoint_url=cfg.endpoint_url, config=aio_config
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def head(self, key: str, if_none_match: str | None = None) -> ObjectMeta | NotModified:
        """The object's metadata; NOT_MODIFIED when `if_none_match` still names it."""
        started = time.monotonic()
        extra = {"IfNoneMatch": if_none_match} if if_none_match else {}
        try:
            response = await self._client.head_object(Bucket=self._config.bucket, Key=key, **extra)
        except asyncio.CancelledError:
            self._count("head", "ok")  # sent, then abandoned by us: counted all the same
            raise
        except Exception as exc:
            if _not_modified(exc):
                self._count("head", "not_modified", started)
                return NOT_MODIFIED
            raise self._failed("head", started, exc) from None
        if not response.get("ETag"):  # no version to pin blocks to: never cached
            self._count("head", "invalid", started)
            raise UpstreamInvalid("upstream answer did not match the request: no ETag")
        self._count("head", "ok", started)
        return meta_from(key, response, int(response["ContentLength"]))

    async def get(
        self,
        key: str,
        start: int,
        end: int,
        *,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> Answer | NotModified:
        """A GET of bytes start..end (inclusive): its head is in, its body still to come.

        Nothing here trusts the answer: the caller checks it against what it asked
        (`Answer.meta`, `content_range`, `length`) before using a byte. Raises
        RangeBeyondEnd when S3 says the range starts past the end of the object.
        """
        started = time.monotonic()
        extra = {}
        if if_match:
            extra["IfMatch"] = if_match
        if if_none_match:
            extra["IfNoneMatch"] = if_none_match
        try:
            response = await self._client.get_object(
                Bucket=self._config.bucket, Key=key, Range=f"bytes={start}-{end}", **extra
            )
        except asyncio.CancelledError:
            self._count("get", "ok")  # sent, then abandoned by us: counted all the same
            raise
        except ClientError as exc:
            if _not_modified(exc):
                self._count("get", "not_modified", started)
                return NOT_MODIFIED
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                self._count("get", "ok", started)
                raise RangeBeyondEnd("range starts past the end of the object") from None
            raise self._failed("get", started, exc) from None
        except Exception as exc:
            raise self._failed("get", started, exc) from None
        self._metrics.upstream_duration.labels(op="get").observe(time.monotonic() - started)
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        length = int(response.get("ContentLength", -1))
        content_range = parse_content_range(response.get("ContentRange"))
        size = content_range[2] if content_range is not None else max(length, 0)
        return Answer(
            self, status, meta_from(key, response, size), content_range, length, response["Body"]
        )

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        started = time.monotonic()
        try:
            await self._client.put_object(
                Bucket=self._config.bucket, Key=key, Body=data, ContentType=content_type
            )
        except Exception as exc:
            raise self._failed("put", started, exc) from None
        self._count("put", "ok", started)

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
        self._count("head", "ok", started)

    def _count(self, op: str, outcome: str, started: float | None = None) -> None:
        self._metrics.upstream_requests.labels(op=op, outcome=outcome).inc()
        if started is not None:
            self._metrics.upstream_duration.labels(op=op).observe(time.monotonic() - started)

    def _failed(self, op: str, started: float, exc: BaseException) -> S3ProxyError:
        error = _classify(exc)
        outcome = {AssetNotFound: "not_found", ObjectChanged: "changed"}.get(type(error), "error")
        self._count(op, outcome, started)
        return error


_CONTENT_RANGE = re.compile(r"^bytes (\d{1,20})-(\d{1,20})/(\d{1,20})$")


def parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    """`bytes first-last/size` as three numbers; None when absent or not of that form
    (`*` sizes included: an answer we can not check is not used)."""
    match = _CONTENT_RANGE.match(value.strip()) if value else None
    if match is None:
        return None
    first, last, size = (int(group) for group in match.groups())
    return (first, last, size) if first <= last < size else None


def _not_modified(exc: BaseException) -> bool:
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return bool(status == 304 or exc.response.get("Error", {}).get("Code") == "304")


def _parse_timestamp(value: str) -> datetime:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        fallback: datetime = parse_timestamp(value)
        return fallback
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # "-0000": still UTC


def meta_from(key: str, response: dict[str, Any], size: int) -> ObjectMeta:
    """Object metadata from a HEAD or GET answer (the size comes from the caller: a
    ranged GET's Content-Length is the range's, not the object's)."""
    last_modified = response.get("LastModified") or datetime.now(UTC)
    return ObjectMeta(
        key=key,
        size=size,
        etag=response.get("ETag", ""),
        last_modified=last_modified.astimezone(UTC),
        content_type=response.get("ContentType"),
    )


def _classify(exc: BaseException) -> S3ProxyError:
    """Map a botocore/aiohttp failure to our error types, with a message safe to show."""
    if isinstance(exc, S3ProxyError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "NotFound", "404") or (status == 404 and code != "NoSuchBucket"):
            return AssetNotFound("object not found")
        if code in ("PreconditionFailed", "412") or status == 412:
            return ObjectChanged("object changed upstream")
        if status >= 500 or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
            return UpstreamUnavailable(f"upstream error {status or code}")
        return UpstreamDenied(f"upstream refused the request ({status or code})")
    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError, asyncio.TimeoutError, TimeoutError)):
        return UpstreamTimeout("upstream timed out")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return UpstreamDenied("no usable AWS credentials")
    if isinstance(exc, (BotoCoreError, aiohttp.ClientError, OSError)):
        return UpstreamUnavailable(f"upstream unreachable ({type(exc).__name__})")
    return UpstreamUnavailable(f"upstream failure ({type(exc).__name__})")
