"""Client connections before a request reaches the app: how long and how large a request
head may be, how long an idle connection stays, how many connections are open at once,
and the one short answer (and one log line) a malformed request gets.

aiohttp bounds single header lines but not a head's total size or the time it takes to
arrive, and it answers a request line without an HTTP version as HTTP/0.9. These bounds
live in a RequestHandler subclass; it uses a few of aiohttp's private attributes, which
is why pyproject.toml pins aiohttp to one minor version (tests/test_connections.py
exercises each bound with real sockets).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from .config import ServerConfig
from .fastlane import FAST_LANE, WRITE_SLICE, AnswerFromMemory, FastAnswer, send_now, write_slices
from .logs import LogBudget, redact
from .metrics import Metrics

log = logging.getLogger("s3proxy.connections")

UNKNOWN_METHOD = "-"  # the method label of what was refused before it was parsed
LINGER_S = 1.0  # a refused connection is read (and discarded) this long before closing
_MAX_LINE = 8190  # aiohttp's own request-line bound; the line kept for the log is shorter
_LOGGED_LINE = 200
_VERSIONED = re.compile(rb" HTTP/\d\.\d\r?$")


@dataclass(frozen=True)
class Limits:
    max_connections: int
    header_timeout_s: float
    keepalive_timeout_s: float
    max_head_bytes: int

    @classmethod
    def of(cls, server: ServerConfig) -> Limits:
        return cls(
            server.max_connections,
            server.header_timeout_s,
            server.keepalive_timeout_s,
            server.max_head_bytes,
        )


def refusal(status: int) -> bytes:
    """A whole answer sent before (or instead of) reading a request: fixed text only."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode()
    extra = "Retry-After: 1\r\n" if status == 503 else ""
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


class GuardedServer(Server):
    """aiohttp's connection manager with the limits: one per listener, so the admin
    listener's connections never count against the main one's."""

    def __init__(
        self,
        plain: Server,
        limits: Limits,
        metrics: Metrics | None,
        fast_lane: AnswerFromMemory | None = None,
    ) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self.limits = limits
        self.metrics = metrics
        self.fast_lane = fast_lane
        self.malformed_log = LogBudget(per_second=5.0)

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    @property
    def full(self) -> bool:
        return len(self._connections) >= self.limits.max_connections

    def refused(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(method=UNKNOWN_METHOD, status=str(status)).inc()

    def report(self, status: int, reason: str, line: bytes, remote: str | None) -> None:
        """One warning per malformed request (within the log budget), no traceback."""
        self.refused(status)
        allowed, dropped = self.malformed_log.take()
        if not allowed:
            return
        fields: dict[str, Any] = {
            "status": status,
            "reason": redact(reason)[:_LOGGED_LINE],
            "request_line": redact(line[:_LOGGED_LINE].decode("ascii", "backslashreplace")),
            "remote": remote,
        }
        if dropped:
            fields["dropped"] = dropped
        log.warning("malformed request", extra={"fields": fields})


class GuardedHandler(RequestHandler):
    """One client connection: aiohttp's handler, with the head bounded in time and size,
    no HTTP/0.9, and fixed short answers to malformed requests."""

    _manager: GuardedServer

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._head_bytes = 0
        self._tail = b""  # a head's last bytes so far: its blank line may straddle reads
        self._line: bytearray | None = bytearray()  # the request line, until its end
        self._request_line = b""
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: Any = None  # the payload of the last head, while it is being read
        self._refused = False
        self._turned_away = False
        self._fast_lane = manager.fast_lane
        self._remote: str | None = None
        self._sending: asyncio.Future[None] | None = None  # a fast answer's rest, going out
        self._held = b""  # what the client sent meanwhile
        # bytes past a body went to aiohttp's parser: it may hold a head's start
        self._after_body = False

    # --- connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._manager.full:
            self._turn_away(transport)
            return
        super().connection_made(transport)
        # Pause the writer as soon as the socket does not take a write whole, and resume
        # once it took everything: the next slice then goes to the socket itself instead
        # of being copied into the transport's buffer behind the last (hot ranges: 8-19 %
        # more requests a second; 200 streaming readers: 6 % more bytes, the same RSS).
        assert isinstance(transport, asyncio.WriteTransport)
        transport.set_write_buffer_limits(high=0)
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else None
        # from accept to the end of the first head (as nginx's client_header_timeout)
        self._start_head_timer()
        self._stop_idle_timer()

    def _turn_away(self, transport: asyncio.BaseTransport) -> None:
        """Over server.max_connections: a 503 at once, nothing parsed or kept; the
        client's request is read and dropped for a moment so it sees the answer rather
        than a reset."""
        self._turned_away = True
        self._manager.refused(503)
        assert isinstance(transport, asyncio.Transport)
        transport.write(refusal(503))
        transport.write_eof()
        self._loop.call_later(LINGER_S, transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._turned_away:
            return
        super().connection_lost(exc)

    # --- the head -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Heads are handed to aiohttp one at a time, each cut at its end, so every head
        (a pipelined one that arrives with the request before it included) has its
        line checked, its bytes counted and its time bounded."""
        while data:
            if self._turned_away or self._refused:
                return  # read and dropped
            if self._force_close or self._close:
                return
            if self._sending is not None:  # after the fast answer going out
                self._held += data
                return
            if self._body is not None and not self._body.is_eof():  # a body: aiohttp's
                self._after_body = True
                self._feed(data)
                return
            if self._head_bytes == 0 and self._fast_lane:  # nothing of this head fed yet
                end = data.find(b"\r\n\r\n")
                if end >= 0 and self._answered_fast(data[: end + 4]):
                    data = data[end + 4 :]
                    continue
            if self._head_timer is None:
                # from a head's first byte to its end; no longer idle
                self._start_head_timer()
                self._stop_idle_timer()
            cut = self._head_end(data)
            piece, data = data[:cut], data[cut:]
            if self._line is not None and not self._check_line(piece):
                return
            self._head_bytes += len(piece)
            if not self._feed(piece) and self._head_bytes > self._limits.max_head_bytes:
                self._refuse(431, "request head over server.max_head_bytes")
                return

    # --- the fast lane ---------------------------------------------------------------

    def _answered_fast(self, head: bytes) -> bool:
        """Whether the app answered this whole head from memory (`fastlane`). Only while
        aiohttp is idle, waiting for a head (or yet to see one), so answers keep their
        order and none follows an answer that closes the connection."""
        waiter = self._waiter
        waiting = waiter is not None and not waiter.done()
        if (
            not (waiting or (self._request_count == 0 and not self._request_in_progress))
            or self._messages
            or self._message_tail
            or self._after_body
            or self._upgraded
            or self.transport is None
            or self.transport.is_closing()  # reset by the client: nothing more goes out
            or self._paused  # the client is not reading: aiohttp queues and waits
            or len(head) > self._limits.max_head_bytes
        ):
            return False
        assert self._fast_lane is not None
        try:
            answer = self._fast_lane(head, self.transport, self._remote)
        except Exception:  # a defect: logged, and the request answered the usual way
            log.exception("the fast lane failed on a request; answering it the usual way")
            return False
        if answer is None:
            return False
        self._manager.requests_count += 1
        self._cancel_head_timer()
        transport = self.transport
        head_length = len(answer.head)
        body = answer.body
        if len(body) == 1 and len(body[0]) <= WRITE_SLICE:  # most answers: one slice
            pieces = deque((memoryview(answer.head), body[0]))
        else:
            pieces = deque([memoryview(answer.head)])
            pieces.extend(piece for view in body for piece in write_slices(view))
        handed, rest = 0, False
        try:
            handed = send_now(transport, pieces)
            if pieces and not transport.is_closing():  # a slow client: the rest waits
                self._stop_idle_timer()  # not idle while an answer is going out
                sent = handed - head_length  # below 0 while the head is not all out
                answer.waits()
                self._sending = asyncio.ensure_future(self._send_rest(answer, pieces, sent))
                self._sending.add_done_callback(_report_failure)
                self._pause_transport_reading()
                rest = True
        finally:
            if not rest:  # done, or the client is gone (a reset): the rest is dropped
                answer.finish(max(handed - head_length, 0), completed=not pieces)
        if not rest and not transport.is_closing():
            self._answered()
        return True

    async def _send_rest(self, answer: FastAnswer, pieces: deque[memoryview], sent: int) -> None:
        try:
            while pieces:
                await self._drain_helper()
                if self.transport is None or self.transport.is_closing():
                    return
                sent += send_now(self.transport, pieces)
        except ConnectionError:
            return
        except Exception:
            if self.transport is not None:
                self.transport.close()  # reading stays paused: nothing more on this one
            raise
        finally:
            self._sending = None
            answer.finish(max(sent, 0), completed=not pieces)
        if self.transport is not None:
            if not self._reading_paused and not self._buffer_paused:
                self._resume_transport_reading()
            self._answered()
            held, self._held = self._held, b""
            if held:
                self.data_received(held)

    def _answered(self) -> None:
        """A fast answer is out: the connection is idle again (aiohttp's keep-alive)."""
        if self._keepalive_timeout > 0:
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _head_end(self, data: bytes) -> int:
        """How much of `data` belongs to the head being read: up to its blank line, or
        all of it (the blank line may straddle two reads)."""
        seen = self._tail + data
        end = seen.find(b"\r\n\r\n")
        if end < 0:
            self._tail = seen[-3:]
            return len(data)
        self._tail = b""
        return end + 4 - (len(seen) - len(data))

    def _feed(self, data: bytes) -> bool:
        """Give bytes to aiohttp's parser; whether they completed a head."""
        count = self._request_count
        super().data_received(data)
        if self._request_count == count:
            return False
        self._heads_complete(self._request_count - count)
        return True

    def _check_line(self, data: bytes) -> bool:
        """Collect the request line; refuse one without an HTTP version (aiohttp would
        take it for HTTP/0.9) as soon as its end arrives."""
        assert self._line is not None
        end = data.find(b"\n")
        self._line += data if end < 0 else data[:end]
        if end < 0:
            if len(self._line) > _MAX_LINE:  # aiohttp refuses it; keep the start to log
                self._request_line, self._line = bytes(self._line[:_LOGGED_LINE]), None
            return True
        line, self._line = bytes(self._line), None
        self._request_line = line.rstrip(b"\r")[:_LOGGED_LINE]
        if _VERSIONED.search(line) is None:
            self._refuse(400, "request line without an HTTP version")
            return False
        return True

    def _heads_complete(self, new: int) -> None:
        self._cancel_head_timer()
        queued = list(self._messages)[-new:]
        for index, (message, payload) in enumerate(queued):
            if isinstance(message, _ErrInfo):
                continue
            if _head_size(message) > self._limits.max_head_bytes:
                position = len(self._messages) - new + index
                self._messages[position] = (
                    _ErrInfo(431, _TooLarge(), "request head over server.max_head_bytes"),
                    payload,
                )
            self._body = payload
        self._head_bytes = 0
        self._tail = b""
        self._line = bytearray()
        self._after_body = False

    def _refuse(self, status: int, reason: str) -> None:
        """Answer `status` in turn (after what is already queued), then close; the rest
        of what the client sends is dropped."""
        self._refused = True
        self._cancel_head_timer()
        self._messages.append((_ErrInfo(status, _Refused(reason), reason), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _start_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(
            self._limits.header_timeout_s, self._head_timed_out
        )

    def _stop_idle_timer(self) -> None:
        """aiohttp's keep-alive timer: rescheduled by aiohttp after each response."""
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._request_in_progress or self._messages:
            if self._head_bytes:  # a pipelined head, begun during an answer: once it is sent
                self._head_timer = self._loop.call_later(1.0, self._head_timed_out)
            return
        if self._head_bytes == 0 and self._request_count == 0:
            self._manager.refused(408)
            self.force_close()  # connected and sent nothing: just closed
            return
        self._refuse(408, "request head not received within server.header_timeout_s")

    # --- answers to malformed requests --------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # not the client's fault: aiohttp's report, redacted on output
            return super().handle_error(request, status, exc, message)
        reason = (message or str(exc or "")).strip().splitlines() or ["malformed"]
        self._manager.report(status, reason[0].rstrip(":"), self._request_line, request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer had started: the connection is closed")
        response = web.Response(
            status=status, text=f"{status} {HTTPStatus(status).phrase}\n", content_type="text/plain"
        )
        response.force_close()
        return response


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections carry the limits."""

    def __init__(
        self, app: web.Application, limits: Limits, metrics: Metrics | None, **kwargs: Any
    ) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout_s, **kwargs)
        self._limits = limits
        self._metrics = metrics

    async def _make_server(self) -> Server:
        plain = await super()._make_server()
        return GuardedServer(plain, self._limits, self._metrics, self._app.get(FAST_LANE))


class _Refused(Exception):
    pass


class _TooLarge(Exception):
    pass


def _report_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a fast answer failed", exc_info=task.exception())


def _head_size(message: Any) -> int:
    """Bytes of a parsed request head: the request line and every header line."""
    line = len(message.method) + len(message.path) + len(" HTTP/1.1\r\n") + 1
    return line + sum(len(name) + len(value) + 4 for name, value in message.raw_headers) + 2
