"""The fast lane: the plainest request heads, read without aiohttp's request machinery.

Most requests a media server sends are a `GET` of one range already in memory. For those,
aiohttp's request object, router, middleware and response writer cost more than the answer
itself (bench case b). `parse_head` accepts only a head whose meaning is beyond doubt, and
the app answers it from memory or hands it, untouched, to aiohttp: anything unusual
(another method or version, a query, an escape, a conditional, a body, a repeated or
malformed header) goes the usual way, which also gives every error its answer.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from itertools import islice
from typing import Protocol

from aiohttp import web

# Largest slice handed to the transport at once: what the socket does not take at once
# is copied into the transport's buffer, so this bounds the memory each slow client pins
# (bench f, 200 readers, when this was chosen: ~146 MiB peak at 128 KiB, ~200 at
# 256 KiB, ~225 at 512 KiB; hot 1 MiB ranges lose some throughput for it, still above
# 0.5x nginx).
WRITE_SLICE = 128 * 1024


def write_slices(data: bytes | bytearray | memoryview) -> list[memoryview]:
    """`data` in pieces of at most WRITE_SLICE, each handed to the transport at once."""
    view = memoryview(data)
    return [view[at : at + WRITE_SLICE] for at in range(0, len(view), WRITE_SLICE)]


_GATHER = 64  # pieces handed to one sendmsg (Linux takes up to 1024)


def send_now(transport: asyncio.WriteTransport, pieces: deque[memoryview]) -> int:
    """Hand `pieces` to `transport`, in order, as far as it takes them without waiting;
    the bytes handed over. While the transport holds nothing unsent they go to its socket
    in one gathering `sendmsg`, so a head and its body leave in one system call and one
    segment, and nothing is copied on the way (`transport.write` would send the head
    alone, or a joined copy of both). The first piece the socket does not take whole goes
    through `transport.write`, which keeps its rest (at most one slice) and pauses the
    writer: what is left in `pieces` waits for the resume. A transport without a plain
    socket (TLS, another loop's) gets every piece through `write`."""
    sock = getattr(transport, "_sock", None)  # asyncio's selector transport: its socket
    gather = isinstance(sock, socket.socket)
    handed = 0
    while pieces and not transport.is_closing() and not transport.get_write_buffer_size():
        if gather:
            assert isinstance(sock, socket.socket)
            batch = list(islice(pieces, _GATHER))
            try:
                taken = sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                taken = 0
            except OSError:
                gather = False  # `write` meets the error again and reports it as its own
                continue
            handed += taken
            for piece in batch:
                if taken < len(piece):
                    break
                taken -= len(piece)
                pieces.popleft()
            else:
                continue  # the whole batch went: the next one
            if taken:
                pieces[0] = pieces[0][taken:]
        piece = pieces.popleft()
        transport.write(piece)  # the socket is full: buffered, and the writer paused
        handed += len(piece)
    return handed


MAX_HEAD_BYTES = 8190  # below aiohttp's own bounds on a line and on a header field
MAX_FIELDS = 64  # header lines (aiohttp refuses more than 128)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
_TARGET = re.compile(r"/[\x21-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # as aiohttp refuses in a header
# headers whose presence changes the answer or the connection: left to aiohttp
_NOT_HERE = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "expect",
        "upgrade",
        "te",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        "sec-websocket-key1",  # aiohttp refuses a head with it
    }
)


@dataclass(frozen=True)
class Head:
    """A request head the fast lane may answer: a GET over HTTP/1.1, kept alive."""

    path: str  # as sent: no query, no escapes, no dot or empty segments
    headers: dict[str, str]  # lower-case names, each present once, values trimmed


def parse_head(data: bytes) -> Head | None:
    """The head, when `data` is exactly one plain GET head (ending in its blank line);
    None for anything the fast lane leaves to aiohttp."""
    if len(data) > MAX_HEAD_BYTES or not data.endswith(b"\r\n\r\n") or not data.isascii():
        return None  # (aiohttp decodes other bytes its own way, and strip() differs on them)
    text = data[:-4].decode("ascii")
    line, *fields = text.split("\r\n")
    if len(fields) > MAX_FIELDS:
        return None
    method, _, rest = line.partition(" ")
    target, _, version = rest.partition(" ")
    if method != "GET" or version != "HTTP/1.1" or not _plain_path(target):
        return None
    headers: dict[str, str] = {}
    for field in fields:
        name, colon, value = field.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            return None  # also a folded line (it starts with a space) and a bare CR or LF
        value = value.strip(" \t")
        name = name.lower()
        if name in headers or name in _NOT_HERE or not _FIELD_VALUE.fullmatch(value):
            return None
        headers[name] = value
    if "host" not in headers or headers.get("connection", "keep-alive").lower() != "keep-alive":
        return None  # aiohttp refuses an HTTP/1.1 head without a Host
    return Head(target, headers)


def _plain_path(target: str) -> bool:
    """A path aiohttp would route exactly as written: no query or fragment, no escapes
    (a decoded one is a different path), no `.`, `..` or empty segments to normalise."""
    if not _TARGET.fullmatch(target) or "%" in target or "?" in target or "#" in target:
        return False
    return "//" not in target and "/./" not in target + "/" and "/../" not in target + "/"


def header_lines(headers: Iterable[tuple[str, str]]) -> bytes | None:
    """Header lines, each ending in CRLF, encoded as aiohttp encodes them; None when a
    value holds a control character (aiohttp would refuse to send it: the usual way then
    gives the error)."""
    lines = [f"{name}: {value}" for name, value in headers]
    if _CONTROL.search("\t".join(lines)):  # one search: a tab is allowed, as are ": "
        return None
    return "".join(f"{line}\r\n" for line in lines).encode()


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


def status_line(status: int) -> bytes:
    """An HTTP/1.1 status line, as aiohttp writes it."""
    return _STATUS_LINES[status]


class FastAnswer(Protocol):
    """What the fast lane sends for one request."""

    head: bytes
    body: list[memoryview]

    def waits(self) -> None:
        """The body did not all go out at once: the rest follows as the client reads."""

    def finish(self, sent: int, completed: bool) -> None:
        """Once, when the body is out (`completed`) or the client has gone."""


class AnswerFromMemory(Protocol):
    """The app's fast lane: the answer to a head, or None to send it the usual way."""

    def __call__(self, head: bytes, connection: object, remote: str | None) -> FastAnswer | None:
        """`connection`: the client's transport (its read history); `remote`: its address."""


FAST_LANE = web.AppKey("fast_lane", AnswerFromMemory)
