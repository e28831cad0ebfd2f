"""A scriptable S3-like origin on loopback, for what the emulator can not do on demand:
huge objects made on the fly, stalls, server errors, and noticing when the proxy hangs up.

Objects are `size` bytes of a fixed pattern (byte i is i % 251), so any range can be
produced and checked without storing it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

PERIOD = 251
CHUNK = 64 * 1024
_PATTERN = bytes(i % PERIOD for i in range(PERIOD + CHUNK))
ETAG = '"0123456789abcdef0123456789abcdef"'

Behaviour = Literal["ok", "stall_headers", "stall_body", "error_500", "denied_403",
                    "get_error_500"]


def pattern(start: int, length: int) -> bytes:
    """Bytes start..start+length of a pattern object."""
    out = bytearray()
    while length > 0:
        n = min(length, CHUNK)
        offset = start % PERIOD
        out += _PATTERN[offset:offset + n]
        start += n
        length -= n
    return bytes(out)


@dataclass
class OriginState:
    size: int
    behaviour: Behaviour = "ok"
    chunk_delay_s: float = 0.0  # pause between 64 KiB chunks (a slow, far origin)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    user_agents: set[str] = field(default_factory=set)
    bytes_sent: int = 0
    gets: int = 0
    hangups: int = 0
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)


def make_origin(state: OriginState) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        state.requests.append((request.method, request.headers.get("Range")))
        state.user_agents.add(request.headers.get("User-Agent", ""))
        if request.method == "GET":
            state.gets += 1
        if state.behaviour == "stall_headers":
            await asyncio.sleep(3600)
        if state.behaviour == "error_500":
            return web.Response(status=500, text="<Error><Code>InternalError</Code></Error>")
        if state.behaviour == "denied_403":
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>")
        if request.path.count("/") < 2:  # the bucket itself (readiness probe)
            return web.Response(status=200)
        headers = {"ETag": ETAG, "Last-Modified": "Mon, 02 Nov 2026 10:00:00 GMT",
                   "Accept-Ranges": "bytes", "Content-Type": "video/mp4"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(state.size)})
        if state.behaviour == "get_error_500":
            return web.Response(status=500, text="<Error><Code>InternalError</Code></Error>")
        start, end = 0, state.size - 1
        spec = request.headers.get("Range", "")
        if spec.startswith("bytes="):
            first, _, last = spec[6:].partition("-")
            start, end = int(first), min(int(last) if last else end, state.size - 1)
        response = web.StreamResponse(status=206, headers={
            **headers, "Content-Range": f"bytes {start}-{end}/{state.size}"})
        response.content_length = end - start + 1
        await response.prepare(request)
        position = start
        try:
            while position <= end:
                if state.behaviour == "stall_body" and position - start >= 2 * CHUNK:
                    await asyncio.sleep(3600)
                n = min(CHUNK, end - position + 1)
                await response.write(pattern(position, n))
                if state.chunk_delay_s:
                    await asyncio.sleep(state.chunk_delay_s)
                state.bytes_sent += n
                position += n
        except (ConnectionError, asyncio.CancelledError):
            state.hangups += 1
            state.hung_up.set()
            raise
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
