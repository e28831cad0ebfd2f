"""A scriptable S3-like origin on loopback, for what the emulator can not do on demand:
huge objects made on the fly, stalls, server errors, noticing when the proxy hangs up,
and answers that are not what was asked.

Objects are `size` bytes of a fixed pattern per version (byte i of version v is
(i + v) % 251), so any range of any version can be produced and checked without storing
it; `head` replaces the first bytes (an MP4's top-level boxes, say). `overwrite()`
makes a new version of the same size. A well-behaved origin honours
If-Match (412) and If-None-Match (304); `faults` lists misbehaviour for the next GETs,
one each, in order. Every key holds that object, but no `.dtsh` sidecar (404).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

PERIOD = 251
CHUNK = 64 * 1024
_PATTERN = bytes(i % PERIOD for i in range(2 * PERIOD + CHUNK))
ETAG = '"0123456789abcdef0123456789abcdef"'

Behaviour = Literal["ok", "stall_headers", "stall_body", "error_500", "denied_403", "get_error_500"]
# what one GET does wrong: answer 200 with the whole object; another range than asked;
# a Content-Length short of the range; a body cut short of its Content-Length; ignore
# If-Match and send the current version
Fault = Literal["whole_200", "shifted", "short_length", "short_body", "ignore_if_match"]


def pattern(start: int, length: int, version: int = 0) -> bytes:
    """Bytes start..start+length of version `version` of a pattern object."""
    out = bytearray()
    while length > 0:
        n = min(length, CHUNK)
        offset = (start + version) % PERIOD
        out += _PATTERN[offset : offset + n]
        start += n
        length -= n
    return bytes(out)


def etag_of(version: int) -> str:
    return ETAG if version == 0 else f'"{version:032x}"'


@dataclass
class OriginState:
    size: int
    behaviour: Behaviour = "ok"
    chunk_delay_s: float = 0.0  # pause between 64 KiB chunks (a slow, far origin)
    version: int = 0
    honours_if_match: bool = True
    send_etag: bool = True
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    conditional: list[tuple[str, str]] = field(default_factory=list)  # method, header
    user_agents: set[str] = field(default_factory=set)
    bytes_sent: int = 0
    gets: int = 0
    hangups: int = 0
    sidecar_lookups: int = 0  # of `<key>.dtsh` (404: not counted above)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    head: bytes = b""  # the object's first bytes, in place of the pattern's

    def content(self, start: int, length: int, version: int | None = None) -> bytes:
        """Bytes start..start+length of the object (of its current version)."""
        out = pattern(start, length, self.version if version is None else version)
        if start >= len(self.head):
            return out
        overlap = self.head[start : start + length]
        return overlap + out[len(overlap) :]

    @property
    def etag(self) -> str:
        return etag_of(self.version)

    def overwrite(self) -> None:
        """A new version of the object, same size."""
        self.version += 1


def _bounds(spec: str, size: int) -> tuple[int, int] | None:
    if not spec.startswith("bytes="):
        return None
    first, _, last = spec[6:].partition("-")
    return int(first), min(int(last) if last else size - 1, size - 1)


def make_origin(state: OriginState) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path.endswith(".dtsh"):  # the one object here has no sidecar
            state.sidecar_lookups += 1
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")
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
        fault = state.faults.pop(0) if request.method == "GET" and state.faults else None
        version = state.version
        headers = {
            "ETag": etag_of(version),
            "Last-Modified": "Mon, 02 Nov 2026 10:00:00 GMT",
            "Accept-Ranges": "bytes",
            "Content-Type": "video/mp4",
        }
        if not state.send_etag:
            del headers["ETag"]
        if_match = request.headers.get("If-Match")
        if_none_match = request.headers.get("If-None-Match")
        for name, value in (("If-Match", if_match), ("If-None-Match", if_none_match)):
            if value is not None:
                state.conditional.append((request.method, name))
        if if_none_match == etag_of(version):
            return web.Response(status=304, headers={"ETag": etag_of(version)})
        if (
            if_match is not None
            and if_match != etag_of(version)
            and state.honours_if_match
            and fault != "ignore_if_match"
        ):
            return web.Response(status=412, text="<Error><Code>PreconditionFailed</Code></Error>")
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(state.size)})
        if state.behaviour == "get_error_500":
            return web.Response(status=500, text="<Error><Code>InternalError</Code></Error>")
        bounds = _bounds(request.headers.get("Range", ""), state.size)
        status = 206
        if bounds is None or fault == "whole_200":
            start, end, status = 0, state.size - 1, 200
        else:
            start, end = bounds
            if start >= state.size:
                return web.Response(status=416, text="<Error><Code>InvalidRange</Code></Error>")
            if fault == "shifted":
                start, end = start + 1, min(end + 1, state.size - 1)
        length = end - start + 1
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{state.size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length - 1 if fault == "short_length" else length
        send = response.content_length if fault != "short_body" else length // 2
        await response.prepare(request)
        position = start
        try:
            while position < start + send:
                if state.behaviour == "stall_body" and position - start >= 2 * CHUNK:
                    await asyncio.sleep(3600)
                n = min(CHUNK, start + send - position)
                await response.write(state.content(position, n, version))
                if state.chunk_delay_s:
                    await asyncio.sleep(state.chunk_delay_s)
                state.bytes_sent += n
                position += n
        except (ConnectionError, asyncio.CancelledError):
            state.hangups += 1
            state.hung_up.set()
            raise
        if fault == "short_body":
            assert request.transport is not None
            request.transport.close()  # the body ends short of its Content-Length
            return response
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
