"""HTTP: routes, status codes and headers, streamed bodies.

`Proxy` owns every stateful part (config, metrics, token verifier, upstream, store);
`create_app` and `create_admin_app` build aiohttp applications around one Proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import itertools
import logging
import re
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from .assets import (
    SIDECAR_SUFFIX,
    InvalidAssetName,
    content_type_for,
    dtsh_length,
    looks_like_dtsh,
    validate_asset_name,
)
from .auth import AuthFailure, Grant, TokenVerifier, presented_token
from .config import Config, admin_secret
from .errors import AssetNotFound, ObjectChanged, S3ProxyError, UpstreamTimeout
from .fastlane import FAST_LANE, Head, header_lines, parse_head, status_line, write_slices
from .logs import ACCESS_LOGGER, log_fields
from .metrics import Metrics
from .ranges import (
    ByteRange,
    RangeNotSatisfiable,
    evaluate_preconditions,
    first_offset,
    format_http_date,
    if_range_matches,
    multipart_layout,
    open_offset,
    parse_range_header,
    ranges_to_serve,
)
from .store import BlockSpan, MemoryRead, ObjectStore, ReadHistory, ReadStats
from .upstream import ObjectMeta, S3Upstream

log = logging.getLogger("s3proxy.app")
access_log = logging.getLogger(ACCESS_LOGGER)

WWW_AUTHENTICATE = 'Bearer realm="s3proxy", error="invalid_token"'
ALLOW = "GET, HEAD"
ERROR_HEADER = "X-S3Proxy-Error"
PROBE_INTERVAL_S = 5.0
READY_WINDOW_S = 3 * PROBE_INTERVAL_S

CONDITIONALS = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How the listeners run the apps (serve, demo and tests alike): aiohttp's own access log
# would print query strings (tokens), and a handler is cancelled when its client hangs up,
# so waiting for S3 on behalf of a client that is gone stops at once (Mist hangs up at
# every seek).
RUNNER_OPTIONS: dict[str, Any] = {"access_log": None, "handler_cancellation": True}
CLIENT_CLOSED = 499  # as nginx logs a request whose client went away
ENTITY_LINES_KEPT = 4096  # versions whose fast-lane header lines are kept encoded
Chunk = bytes | bytearray | memoryview | BlockSpan  # a span: sent from its file


class Proxy:
    """Everything one running proxy owns; two Proxy objects never share state."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        verifier: TokenVerifier | None = None,
        worker: int = 0,
        workers: int = 1,
        shared_dir: str | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.verifier = verifier or TokenVerifier.from_config(config.auth, config.source)
        self.upstream = S3Upstream(config.s3, self.metrics)
        self.store = ObjectStore(
            self.upstream, config.s3.prefix, config.cache, self.metrics, worker, workers, shared_dir
        )
        # per client connection: what it has read (a reader is sequential by its own reads)
        self._histories: weakref.WeakKeyDictionary[object, ReadHistory] = (
            weakref.WeakKeyDictionary()
        )
        self.admin_secret = admin_secret(config)  # ConfigError if beyond loopback without
        self.probe_error: str | None = "no probe answered yet"
        self.probe_ok_at: float | None = None  # monotonic time of the last good probe
        self.inflight = 0
        self.fast_answers = 0  # requests the fast lane answered (memory hits)
        self.worker = worker
        self._background: set[asyncio.Task[None]] = set()
        # request ids: a random prefix per process and a counter, 16 hex digits like the
        # random ones they replace, without reading the system's random source per request
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count()
        self._entity_lines: dict[tuple[ObjectMeta, str], bytes | None] = {}
        node = config.server.node_name
        self.node_line = f"X-S3Proxy-Node: {node}\r\n" if node is not None else ""

    def entity_lines(self, meta: ObjectMeta, asset: str) -> bytes | None:
        """A version's entity header lines as the fast lane sends them (None: not
        sendable), encoded once per version and name."""
        key = (meta, asset)
        try:
            return self._entity_lines[key]
        except KeyError:
            pass
        if len(self._entity_lines) >= ENTITY_LINES_KEPT:
            self._entity_lines.clear()
        lines = self._entity_lines[key] = header_lines(_entity_headers(meta, asset).items())
        return lines

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids) & 0xFFFFFFFF:08x}"

    def request_id_for(self, given: str | None) -> str:
        """The client's `X-Request-ID` when it is a sane one, else a new one."""
        return given if given and _REQUEST_ID_RE.fullmatch(given) else self.new_request_id()

    async def start(self) -> None:
        await self.upstream.start()
        await self.store.start()

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Work that must finish even if the request that started it is cancelled."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "background upload failed", extra={"fields": {"error": str(task.exception())}}
            )

    async def close(self) -> None:
        await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.store.close()
        await self.upstream.close()

    async def probe_once(self) -> None:
        try:
            await self.upstream.probe(self.config.s3.probe_key)
        except S3ProxyError as exc:
            self.probe_error, self.probe_ok_at = str(exc), None
        else:
            self.probe_error, self.probe_ok_at = None, time.monotonic()
        self.metrics.ready.set(1 if self.readiness() is None else 0)

    async def probe_forever(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(PROBE_INTERVAL_S)

    def history(self, request: web.Request) -> ReadHistory | None:
        """The read history of the request's connection (Mist opens one per seek)."""
        return self.history_of(request.transport)

    def history_of(self, connection: object | None) -> ReadHistory | None:
        """The read history of a client connection (its transport)."""
        if connection is None:
            return None
        history = self._histories.get(connection)
        if history is None:
            history = self._histories[connection] = ReadHistory()
        return history

    def readiness(self) -> str | None:
        """None when ready, else why not."""
        if self.probe_ok_at is not None and time.monotonic() - self.probe_ok_at < READY_WINDOW_S:
            return None
        return self.probe_error or "upstream has not answered a probe recently"


PROXY = web.AppKey("proxy", Proxy)


class MediaError(Exception):
    """An answer with an empty body and the reason in X-S3Proxy-Error."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}

    def response(self) -> web.Response:
        headers = {ERROR_HEADER: self.reason, **self.headers}
        return web.Response(status=self.status, headers=headers)


def _status_for(error: S3ProxyError) -> int:
    """The one place upstream errors become HTTP statuses."""
    if isinstance(error, AssetNotFound):
        return 404
    if isinstance(error, UpstreamTimeout):
        return 504
    return 502  # UpstreamDenied, UpstreamUnavailable, ObjectChanged (twice over)


# --- the media handler ------------------------------------------------------------


def _asset_from(request: web.Request) -> str:
    try:
        return validate_asset_name(request.match_info["asset"])
    except InvalidAssetName as exc:
        raise MediaError(400, str(exc)) from None


def _target(request: web.Request, query_param: str) -> tuple[str, str | None]:
    """The asset asked for and the token presented (path, Bearer header or query)."""
    return presented_token(
        _asset_from(request),
        request.match_info.get("token"),
        request.headers.get("Authorization"),
        request.query.get(query_param),
    )


def _authorize(proxy: Proxy, asset: str, token: str | None) -> Grant:
    try:
        return proxy.verifier.authorize(token, asset)
    except AuthFailure as failure:
        proxy.metrics.auth_failures.labels(reason=failure.reason).inc()
        headers = {"WWW-Authenticate": WWW_AUTHENTICATE} if failure.status == 401 else {}
        raise MediaError(failure.status, failure.detail, headers) from None


def _entity_headers(meta: ObjectMeta, asset: str) -> dict[str, str]:
    headers = {
        "Accept-Ranges": "bytes",
        "Last-Modified": format_http_date(meta.last_modified),
        "Content-Type": content_type_for(asset, meta.content_type),
    }
    if meta.etag:
        headers["ETag"] = meta.etag
    return headers


async def handle_media(request: web.Request) -> web.StreamResponse:
    proxy = request.app[PROXY]
    if request.method == "PUT" and proxy.config.sidecars.accept_put:
        return await _store_sidecar(proxy, request)
    if request.method not in ("GET", "HEAD"):
        return refuse_method(request)
    asset, token = _target(request, proxy.config.auth.query_param)
    request[GRANT] = _authorize(proxy, asset, token)
    # The store fetches the block an answer starts with while it learns the metadata
    # (one S3 round trip for a cold asset instead of two); a conditional request may
    # need no block at all (304, 412, or If-Range's whole body).
    conditional = any(name in request.headers for name in CONDITIONALS)
    first_block = None if conditional else _first_block(request, proxy.store.block_size)
    # A version that changes between the look-up and the first GET is looked up again.
    for attempt in (1, 2):
        meta = await _stat(proxy, asset, first_block, _stats(request))
        try:
            return await _answer(proxy, request, asset, meta)
        except ObjectChanged:
            if attempt == 2:
                raise MediaError(502, "object kept changing upstream") from None
    raise AssertionError("unreachable")


def _first_block(request: web.Request, block_size: int) -> int | None:
    """The block to fetch with the metadata: a GET's first (block 0 for a whole body),
    and for a HEAD block 0, which Mist reads next (its box walk, `bytes=0-`). None for
    an open-ended range past the first block (a seek: it gets the cold seek's probe)
    and a suffix range (its block is known only from the size)."""
    header = request.headers.get("Range") if request.method == "GET" else None
    if header is None:
        return 0
    offset = first_offset(header)
    if offset is not None:
        return offset // block_size
    opened = open_offset(header)
    return 0 if opened is not None and opened < block_size else None


# --- the fast lane: memory hits answered from the request head ----------------------

# Larger bodies go the usual way, a block at a time: a fast answer holds its blocks until
# its client has taken them.
FAST_MAX_BYTES = 2 * 1024 * 1024


class MemoryAnswer:
    """A memory hit's whole answer: its head, the body's pieces (views of cached blocks),
    and `finish`, to call once when the body is out (or the client gone)."""

    def __init__(
        self, proxy: Proxy, served: Served, status: int, head: bytes, read: MemoryRead
    ) -> None:
        self.head = head
        self.body = read.views
        self._proxy, self._served, self._status, self._read = proxy, served, status, read
        self._waiting = False

    def waits(self) -> None:
        # Counted in flight only now: an answer that went out within the call that
        # made it was never in flight for anything that could look (the drain, a scrape).
        self._waiting = True
        self._proxy.inflight += 1
        self._proxy.metrics.inflight.inc()

    def finish(self, sent: int, completed: bool) -> None:
        proxy = self._proxy
        self._read.done(completed)
        if self._waiting:
            proxy.inflight -= 1
            proxy.metrics.inflight.dec()
        reason = None if completed else "client closed the connection"
        _account(proxy, self._served, self._status, sent, reason)


def answer_from_memory(
    proxy: Proxy, data: bytes, connection: object, remote: str | None
) -> MemoryAnswer | None:
    """The answer to a plain GET head (`fastlane.parse_head`) whose bytes are all in
    memory and whose metadata is fresh: what `handle_media` would send, byte for byte,
    headers and accounting included. None sends the head the usual way, which also
    answers every error (nothing is counted or logged here then)."""
    started = time.perf_counter()
    head = parse_head(data)
    if head is None:
        return None
    asset, token = _fast_target(head)
    if asset is None:
        return None
    try:
        grant = proxy.verifier.authorize(token, asset)
    except AuthFailure:
        return None
    meta = proxy.store.fresh(asset)
    if meta is None or meta.size == 0:
        return None
    entity = proxy.entity_lines(meta, asset)
    if entity is None:
        return None
    header = head.headers.get("range")
    try:
        ranges = _ranges_for(header, None, meta, proxy.config.http.max_ranges)
    except MediaError:
        return None  # a 416, answered the usual way
    byte_range, status, content_range = ByteRange(0, meta.size - 1, open_ended=True), 200, ""
    if ranges is not None:
        if len(ranges) != 1:
            return None
        (byte_range,), status = ranges, 206
        content_range = f"Content-Range: {byte_range.content_range(meta.size)}\r\n"
    if byte_range.length > FAST_MAX_BYTES:
        return None
    stats = ReadStats()
    served = Served(
        "GET",
        f"/t/-/{asset}" if head.path.startswith("/t/") else head.path,
        remote,
        header,
        head.headers.get("user-agent"),
        proxy.request_id_for(head.headers.get("x-request-id")),
        started,
        None,
        stats,
        grant,
    )
    # the head after the entity's lines: digits, a date, fixed words, a request id and a
    # node name both of checked characters: nothing aiohttp would refuse to send
    rest = (
        f"{content_range}Content-Length: {byte_range.length}\r\n"
        f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n"
        f"X-Request-ID: {served.request_id}\r\n{proxy.node_line}\r\n"
    )
    answer_head = b"".join((status_line(status), entity, rest.encode()))
    read = proxy.store.memory_read(
        meta,
        byte_range.start,
        byte_range.end,
        open_ended=byte_range.open_ended,
        history=proxy.history_of(connection),
        stats=stats,
    )
    if read is None:
        return None
    try:
        served.first_byte_at = time.perf_counter()
        answer = MemoryAnswer(proxy, served, status, answer_head, read)
    except BaseException:
        read.done(False)  # its read-ahead and window let go, as an abandoned read's
        raise
    proxy.fast_answers += 1
    return answer


def _fast_target(head: Head) -> tuple[str | None, str | None]:
    """The asset and token of a fast-lane path, as the routes and `_target` read them (a
    fast-lane path has no query); (None, None) for a path the routes would not take or
    an asset name refused."""
    path_token: str | None = None
    if head.path.startswith("/t/"):
        path_token, slash, name = head.path[3:].partition("/")
        if not path_token or not slash or "{" in path_token or "}" in path_token:
            return None, None  # the route's `{token}` is `[^{}/]+`
    elif head.path.startswith("/vod/"):
        name = head.path[5:]
    else:
        return None, None
    try:
        asset = validate_asset_name(name)
    except InvalidAssetName:
        return None, None
    return presented_token(asset, path_token, head.headers.get("authorization"), None)


async def _stat(
    proxy: Proxy, asset: str, first_block: int | None = None, stats: ReadStats | None = None
) -> ObjectMeta:
    try:
        return await proxy.store.stat(asset, first_block, stats)
    except S3ProxyError as exc:
        raise MediaError(_status_for(exc), str(exc)) from None


async def _answer(
    proxy: Proxy, request: web.Request, asset: str, meta: ObjectMeta
) -> web.StreamResponse:
    headers = _entity_headers(meta, asset)
    status = evaluate_preconditions(request.method, request.headers, meta.etag, meta.last_modified)
    if status == 304:
        return web.Response(
            status=304, headers={k: v for k, v in headers.items() if k in ("ETag", "Last-Modified")}
        )
    if status == 412:
        raise MediaError(412, "precondition failed")
    if request.method == "HEAD":
        response = web.StreamResponse(status=200, headers=headers)
        response.content_length = meta.size
        await _begin(request, response)
        await response.write_eof()
        return response
    ranges = _requested_ranges(proxy, request, meta)
    if ranges is None:
        return await _stream(
            request, proxy, meta, 200, headers, [ByteRange(0, meta.size - 1, open_ended=True)]
        )
    if len(ranges) == 1:
        headers["Content-Range"] = ranges[0].content_range(meta.size)
        return await _stream(request, proxy, meta, 206, headers, ranges)
    return await _stream_multipart(request, proxy, meta, headers, ranges)


def _requested_ranges(
    proxy: Proxy, request: web.Request, meta: ObjectMeta
) -> list[ByteRange] | None:
    return _ranges_for(
        request.headers.get("Range"),
        request.headers.get("If-Range"),
        meta,
        proxy.config.http.max_ranges,
    )


def _ranges_for(
    header: str | None, if_range: str | None, meta: ObjectMeta, max_ranges: int
) -> list[ByteRange] | None:
    """The ranges to answer, None for the whole body; MediaError 416 when none fits."""
    if header is None:
        return None
    if if_range is not None and not if_range_matches(if_range, meta.etag, meta.last_modified):
        return None
    try:
        ranges = parse_range_header(header, meta.size)
    except RangeNotSatisfiable:
        raise MediaError(
            416,
            "range not satisfiable",
            {"Content-Range": f"bytes */{meta.size}", "Accept-Ranges": "bytes"},
        ) from None
    if ranges is None:
        return None
    return ranges_to_serve(ranges, max_ranges)


def _closed_after(chunk: Chunk) -> contextlib.AbstractContextManager[object]:
    """A span of a block file is closed once the request is done with it, sent or not."""
    return chunk if isinstance(chunk, BlockSpan) else contextlib.nullcontext()


async def _first_chunk(chunks: AsyncIterator[Chunk]) -> Chunk:
    """Start the upstream read before any header goes out, so a failure to start is a
    clean error status rather than a truncated 2xx."""
    try:
        return await anext(chunks, b"")
    except ObjectChanged:
        raise
    except S3ProxyError as exc:
        raise MediaError(_status_for(exc), str(exc)) from None


async def _stream(
    request: web.Request,
    proxy: Proxy,
    meta: ObjectMeta,
    status: int,
    headers: dict[str, str],
    ranges: list[ByteRange],
) -> web.StreamResponse:
    (byte_range,) = ranges
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = max(0, byte_range.length)
    async with aclosing(
        proxy.store.open(
            meta,
            byte_range.start,
            byte_range.end,
            open_ended=byte_range.open_ended,
            history=proxy.history(request),
            stats=_stats(request),
            spans=True,
        )
    ) as chunks:
        first = await _first_chunk(chunks)
        with _closed_after(first):
            request[FIRST_BYTE_AT] = time.perf_counter()
            await _begin(request, response)
            if await _pump(request, response, first, chunks):
                await response.write_eof()
    return response


async def _stream_multipart(
    request: web.Request,
    proxy: Proxy,
    meta: ObjectMeta,
    headers: dict[str, str],
    ranges: list[ByteRange],
) -> web.StreamResponse:
    layout = multipart_layout(ranges, meta.size, headers["Content-Type"], secrets.token_hex(12))
    headers["Content-Type"] = layout.content_type
    response = web.StreamResponse(status=206, headers=headers)
    response.content_length = layout.content_length
    for index, part in enumerate(layout.parts):
        async with aclosing(
            proxy.store.open(
                meta,
                part.range.start,
                part.range.end,
                open_ended=part.range.open_ended,
                history=proxy.history(request),
                stats=_stats(request),
                spans=True,
            )
        ) as chunks:
            first = await _first_chunk(chunks) if index == 0 else b""
            with _closed_after(first):
                if index == 0:
                    request[FIRST_BYTE_AT] = time.perf_counter()
                    await _begin(request, response)
                if not await _pump(request, response, first, chunks, part.header):
                    return response
    await _send(request, response, layout.trailer)
    await response.write_eof()
    return response


BODY_BYTES = web.RequestKey("body_bytes", int)  # body bytes written so far
STATS = web.RequestKey("stats", ReadStats)  # what the request's reads cost
GRANT = web.RequestKey("grant", Grant)  # the verified token's grant
REQUEST_ID = web.RequestKey("request_id", str)
FIRST_BYTE_AT = web.RequestKey("first_byte_at", float)  # perf_counter() of the first byte
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _stats(request: web.Request) -> ReadStats:
    stats = request.get(STATS)
    if stats is None:
        stats = request[STATS] = ReadStats()
    return stats


def request_id(request: web.Request) -> str:
    """The client's `X-Request-ID` when it is a sane one, else a new one; echoed back."""
    given = request.get(REQUEST_ID)
    if given is None:
        given = request[REQUEST_ID] = request.app[PROXY].request_id_for(
            request.headers.get("X-Request-ID")
        )
    return given


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Request-ID"] = request_id(request)
    node = request.app[PROXY].config.server.node_name
    if node is not None:  # which node of a pool answered (server.node_name)
        response.headers["X-S3Proxy-Node"] = node


STATUS_SENT = web.RequestKey("status_sent", int)  # the status line that went out


async def _begin(request: web.Request, response: web.StreamResponse) -> None:
    await response.prepare(request)
    request[STATUS_SENT] = response.status


async def _send(request: web.Request, response: web.StreamResponse, data: Chunk) -> None:
    if isinstance(data, BlockSpan):
        with data:
            await _send_file(request, data)
        return
    for piece in write_slices(data):
        await response.write(piece)
        request[BODY_BYTES] = request.get(BODY_BYTES, 0) + len(piece)


async def _send_file(request: web.Request, span: BlockSpan) -> None:
    """A span of a block file, by `sendfile`: the kernel sends it from the file's pages,
    nothing is copied through the process. What went out counts, even when the client
    hangs up midway (asyncio leaves the file's position just past it)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client has gone")
    try:
        await asyncio.get_running_loop().sendfile(transport, span.file, span.offset, span.length)
    finally:
        sent = max(0, span.file.tell() - span.offset)
        request[BODY_BYTES] = request.get(BODY_BYTES, 0) + sent


async def _pump(
    request: web.Request,
    response: web.StreamResponse,
    first: Chunk,
    chunks: AsyncIterator[Chunk],
    before: bytes = b"",
) -> bool:
    """Copy chunks to the client with back-pressure, `before` them (a part's header).
    False when the body was cut short.

    Once the status line is out it can not change: on an upstream failure (or a new
    version) mid-body, the connection is closed so the client sees a short body.
    """
    try:
        if before and not isinstance(first, BlockSpan):
            first, before = before + first, b""  # one write for both
        if before:
            await _send(request, response, before)
        if first:
            await _send(request, response, first)
        async for chunk in chunks:
            await _send(request, response, chunk)
    except ConnectionError:
        return False  # the client hung up; leaving the block closes the S3 stream
    except S3ProxyError as exc:
        log.warning(
            "upstream failed mid-body, closing the connection",
            extra={"fields": {"error": str(exc)}},
        )
        if request.transport is not None:
            request.transport.close()
        return False
    return True


# --- methods other than GET and HEAD ----------------------------------------------


def refuse_method(request: web.Request) -> web.Response:
    """405 at once, without reading the body; the connection is not reused."""
    response = MediaError(405, "method not allowed", {"Allow": ALLOW}).response()
    response.force_close()
    return response


def _sidecar_put_allowed(proxy: Proxy, request: web.Request) -> str:
    """Everything a sidecar PUT must pass before its body is read (MediaError if not);
    the sidecar's asset name."""
    asset, token = _target(request, proxy.config.auth.query_param)
    if not asset.endswith(SIDECAR_SUFFIX):
        raise MediaError(405, "method not allowed", {"Allow": ALLOW})
    _authorize(proxy, asset, token)
    length = request.content_length
    if length is not None and length > proxy.config.sidecars.max_bytes:
        raise MediaError(413, "sidecar larger than sidecars.max_bytes")
    return asset


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Answer `Expect: 100-continue` with the refusal itself, so no refused body is ever
    sent; a sidecar PUT that passes every check gets its `100 Continue`."""
    if request.method in ("GET", "HEAD"):
        return None  # no body to wait for: the final answer serves as the go-ahead
    proxy = request.app[PROXY]
    started = time.perf_counter()
    if request.method == "PUT" and proxy.config.sidecars.accept_put:
        try:
            _sidecar_put_allowed(proxy, request)
        except MediaError as error:
            response = error.response()
            response.force_close()
            _record(request, error.status, 0, started, error.reason)
            return response
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None
    response = refuse_method(request)
    _record(request, response.status, 0, started, "method not allowed")
    return response


async def _store_sidecar(proxy: Proxy, request: web.Request) -> web.Response:
    """A checked `.dtsh` upload, stored at `{prefix}{asset}.dtsh` (never over media)."""
    limit = proxy.config.sidecars.max_bytes
    try:
        asset = _sidecar_put_allowed(proxy, request)
    except MediaError as error:  # refused before the body: do not read it at all
        response = error.response()
        response.force_close()
        return response
    body = bytearray()
    try:
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > limit:
                response = MediaError(413, "sidecar larger than sidecars.max_bytes").response()
                response.force_close()
                return response
    except (
        asyncio.CancelledError,
        ConnectionError,
        web.HTTPException,
        ValueError,
        aiohttp.ClientPayloadError,
        aiohttp.http_exceptions.HttpProcessingError,
    ):
        # Mist closes the socket after the last tiny chunk, with no terminator and
        # without reading an answer: keep what arrived, and store the header if the
        # length it gives itself has arrived whole.
        with contextlib.suppress(Exception):  # the rest already buffered, if the stream says
            body += request.content.read_nowait()
        length = dtsh_length(body)
        if length is not None and length <= limit and looks_like_dtsh(bytes(body[:length])):
            proxy.spawn(proxy.store.put_sidecar(asset, bytes(body[:length])))
        raise
    if not looks_like_dtsh(bytes(body)):
        raise MediaError(400, "body is not a DTSH header")
    # stored even if the client leaves meanwhile: the upload is the proxy's, not the request's
    stored = proxy.spawn(proxy.store.put_sidecar(asset, bytes(body)))
    try:
        await asyncio.shield(stored)
    except S3ProxyError as exc:
        raise MediaError(_status_for(exc), str(exc)) from None
    return web.Response(status=204)


# --- admin ------------------------------------------------------------------------


async def handle_healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def handle_readyz(request: web.Request) -> web.Response:
    reason = request.app[PROXY].readiness()
    if reason is None:
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"not ready: {reason}\n")


async def handle_warm(request: web.Request) -> web.Response:
    """POST /warm/{asset}: what a Mist start reads (metadata, sidecar, the MP4 index, the
    first cache.warm_seconds of media, at most cache.warm_bytes) into the cache, so the
    first viewer's start-up reads are hits."""
    proxy = request.app[PROXY]
    if proxy.admin_secret is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), proxy.admin_secret.encode("utf-8")
        ):
            return web.json_response(
                {"error": "admin token required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="s3proxy-admin"'},
            )
    try:
        asset = validate_asset_name(request.match_info["asset"])
    except InvalidAssetName as exc:
        return web.json_response({"error": str(exc)}, status=400)
    started = time.perf_counter()
    try:
        cache = proxy.config.cache
        result = await proxy.store.warm(asset, cache.warm_seconds, int(cache.warm_bytes))
    except S3ProxyError as exc:
        return web.json_response({"asset": asset, "error": str(exc)}, status=_status_for(exc))
    result["seconds"] = round(time.perf_counter() - started, 4)
    return web.json_response(result)


async def handle_metrics(request: web.Request) -> web.Response:
    proxy = request.app[PROXY]
    return web.Response(
        body=proxy.metrics.exposition(), headers={"Content-Type": Metrics.CONTENT_TYPE}
    )


# --- middleware: errors, metrics, access log --------------------------------------


LOGGED_HEADER_CHARS = 200  # of a client's Range or User-Agent in its access line


def _bounded(value: str | None) -> str | None:
    """A client's header as logged: cut at LOGGED_HEADER_CHARS, marked when cut."""
    if value is None or len(value) <= LOGGED_HEADER_CHARS:
        return value
    return value[:LOGGED_HEADER_CHARS] + f"...({len(value)} chars)"


def _log_path(request: web.Request) -> str:
    """The request path with any path token blanked; the query string (which may hold a
    token) is never logged."""
    info = request.match_info
    if "token" in info and "asset" in info:
        return f"/t/-/{info['asset']}"
    return request.path


def _record(
    request: web.Request, status: int, sent: int, started: float, reason: str | None
) -> None:
    _account(
        request.app[PROXY],
        Served(
            request.method,
            _log_path(request),
            request.remote,
            request.headers.get("Range"),
            request.headers.get("User-Agent"),
            request_id(request),
            started,
            request.get(FIRST_BYTE_AT),
            request.get(STATS),
            request.get(GRANT),
        ),
        status,
        sent,
        reason,
    )


@dataclass
class Served:
    """What a request's metrics and access line say of it, whichever path answered it."""

    method: str
    path: str  # as logged: any token blanked
    remote: str | None
    range: str | None
    user_agent: str | None
    request_id: str
    started: float  # perf_counter() when its head was read
    first_byte_at: float | None
    stats: ReadStats | None
    grant: Grant | None


def _account(proxy: Proxy, served: Served, status: int, sent: int, reason: str | None) -> None:
    """The request's metrics and its access line."""
    elapsed = time.perf_counter() - served.started
    metrics = proxy.metrics
    metrics.child(metrics.requests, served.method, str(status)).inc()
    metrics.child(metrics.request_duration, served.method).observe(elapsed)
    metrics.response_bytes.inc(sent)
    stats = served.stats
    if stats is not None and stats.first_source is not None and served.first_byte_at is not None:
        metrics.child(metrics.time_to_first_byte, stats.first_source).observe(
            served.first_byte_at - served.started
        )
    if not access_log.isEnabledFor(logging.INFO):
        return  # the line would be dropped: not built
    fields: dict[str, object] = {
        "method": served.method,
        "path": served.path,
        "status": status,
        "bytes": sent,
        "duration_ms": round(elapsed * 1000, 2),
        "remote": served.remote,
        "range": _bounded(served.range),
        "user_agent": _bounded(served.user_agent),
        "request_id": served.request_id,
        "worker": proxy.worker,
    }
    if stats is not None:
        fields["cache"] = stats.outcome
        fields["upstream_ms"] = round(stats.upstream_s * 1000, 2)
    grant = served.grant
    if grant is not None:
        fields["sub"], fields["jti"] = grant.subject, grant.token_id
    if reason:
        fields["error"] = reason
    log_fields(access_log, logging.INFO, "request", fields)


def _is_media(request: web.Request) -> bool:
    return "asset" in request.match_info


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    proxy = request.app[PROXY]
    started = time.perf_counter()
    proxy.inflight += 1
    proxy.metrics.inflight.inc()
    reason: str | None = None
    try:
        try:
            response: web.StreamResponse = await handler(request)
        except MediaError as error:
            reason = error.reason
            response = (
                error.response()
                if _is_media(request)
                else web.Response(
                    status=error.status, text=error.reason + "\n", headers=error.headers
                )
            )
        except web.HTTPException as exc:
            if not _is_media(request):
                _record(request, exc.status, 0, started, exc.reason)
                raise
            reason = exc.reason
            response = MediaError(exc.status, exc.reason).response()
        except (asyncio.CancelledError, ConnectionError) as exc:
            # The client hung up while we waited (RUNNER_OPTIONS: handler_cancellation)
            # or wrote: logged with the status it got, or 499 if none went out (nginx's way).
            _record(
                request,
                request.get(STATUS_SENT, CLIENT_CLOSED),
                int(request.get(BODY_BYTES, 0)),
                started,
                "client closed the connection",
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            # Not re-raised: aiohttp would log it as an error, with a traceback. Nothing
            # more goes out on this connection; aiohttp fails to send this, quietly.
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=CLIENT_CLOSED)
        except Exception:
            log.exception("unhandled error while answering a request")
            reason = "internal error"
            response = MediaError(500, reason).response()
            if not _is_media(request):
                response = web.Response(status=500, text="internal error\n")
        reason = reason or response.headers.get(ERROR_HEADER)
        _record(request, response.status, _body_bytes(request, response), started, reason)
        return response
    finally:
        proxy.inflight -= 1
        proxy.metrics.inflight.dec()


def _body_bytes(request: web.Request, response: web.StreamResponse) -> int:
    if request.method == "HEAD":
        return 0
    if response.prepared:
        return int(request.get(BODY_BYTES, 0))
    body = response.body if isinstance(response, web.Response) else None
    return len(body) if isinstance(body, (bytes, bytearray)) else 0


# --- building the applications ----------------------------------------------------


def _add_media_routes(app: web.Application) -> None:
    # (?s): a decoded %0a must reach the name check (400), not fall out of the route (404)
    for path in ("/vod/{asset:(?s:.+)}", "/t/{token}/{asset:(?s:.+)}"):
        app.router.add_route("*", path, handle_media, expect_handler=expect_handler)


def create_app(
    config: Config, proxy: Proxy | None = None, *, fast_lane: bool = True
) -> web.Application:
    """The main listener's application. It opens and closes the Proxy it serves.
    `fast_lane=False` answers every request through aiohttp (the tests compare the two)."""
    proxy = proxy or Proxy(config)
    app = web.Application(middlewares=[observe], handler_args={"max_field_size": 16384})
    app[PROXY] = proxy
    if fast_lane:
        app[FAST_LANE] = functools.partial(answer_from_memory, proxy)
    app.on_response_prepare.append(_echo_request_id)
    _add_media_routes(app)
    app.router.add_get("/healthz", handle_healthz)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await proxy.start()
        prober = asyncio.create_task(proxy.probe_forever())
        try:
            yield
        finally:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
            await proxy.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def create_admin_app(proxy: Proxy) -> web.Application:
    """The admin listener: health, readiness, metrics. Shares the main app's Proxy.
    Its own requests stay out of the request metrics (scrapes would skew them)."""
    app = web.Application()
    app[PROXY] = proxy
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_post("/warm/{asset:(?s:.+)}", handle_warm)
    return app
