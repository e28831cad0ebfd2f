"""A client that reads an HTTP source the way MistServer 3.x does (../shared/mist.md),
without a Mist binary: used by the tests and by bench/playable.py.

Start-up of an MP4: HEAD (must be 2xx with Accept-Ranges and Content-Length), then
`bytes=0-` on the same connection; the top-level boxes are walked by reading 16-byte
headers, each seek on a new connection with `bytes=N-` that is dropped at the next seek;
the `moov` is read whole; finally `bytes=<size>-`, expecting 416. The `.dtsh` look-up
appends `.dtsh` to the whole source string (query included): HEAD, then GET. Then two
greedy readers, each on its own connection with `bytes=<start of the mdat's media>-`,
take the first `media_seconds` of media (Mist reads about 70 s, 78 MB of a 9 Mb/s
asset, before its first segment) and are dropped.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Exchange:
    method: str
    target: str
    range: str | None
    status: int
    headers: dict[str, str]
    body: bytearray  # what the reader took (not necessarily the whole body)


@dataclass
class StartUp:
    size: int
    boxes: list[tuple[str, int, int]]  # (type, offset, size)
    moov: bytes
    sidecar_status: int
    sidecar: bytes
    seconds: float
    exchanges: list[Exchange] = field(default_factory=list)
    media_bytes: int = 0  # what each greedy reader took


class Connection:
    """One keep-alive HTTP/1.1 connection, read as far as the caller wants."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: list[Exchange]
    ) -> None:
        self._reader, self._writer, self._log = reader, writer, log

    @classmethod
    async def open(cls, host: str, port: int, log: list[Exchange]) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, log)

    async def request(
        self, method: str, target: str, range_: str | None = None, extra: str = ""
    ) -> Exchange:
        lines = [f"{method} {target} HTTP/1.1", "Host: origin", "User-Agent: MistServer/3.10"]
        if range_:
            lines.append(f"Range: {range_}")
        self._writer.write(("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode())
        await self._writer.drain()
        head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        exchange = Exchange(
            method, target, range_, int(status_line.split()[1]), headers, bytearray()
        )
        self._log.append(exchange)
        return exchange

    async def read(self, exchange: Exchange, amount: int) -> bytes:
        data = await asyncio.wait_for(self._reader.readexactly(amount), 10)
        exchange.body += data
        return data

    async def read_body(self, exchange: Exchange) -> bytes:
        return await self.read(exchange, int(exchange.headers.get("content-length", "0")))

    def drop(self) -> None:
        self._writer.transport.abort()  # Mist closes the socket at every seek


def _box_header(data: bytes) -> tuple[str, int, int]:
    """(type, size, header length) of an MP4 box header."""
    size = int.from_bytes(data[0:4], "big")
    kind = data[4:8].decode("latin-1")
    if size == 1:
        return kind, int.from_bytes(data[8:16], "big"), 16
    return kind, size, 8


def sidecar_target(source: str) -> str:
    return source + ".dtsh"


def movie_seconds(moov: bytes) -> float | None:
    """The `mvhd` duration (its own parse: the client does not borrow the proxy's)."""
    at = moov.find(b"mvhd")
    if at < 0:
        return None
    body = moov[at + 4 :]
    if body[:1] == b"\x01":
        scale, length = int.from_bytes(body[20:24], "big"), int.from_bytes(body[24:32], "big")
    else:
        scale, length = int.from_bytes(body[12:16], "big"), int.from_bytes(body[16:20], "big")
    return length / scale if scale and length else None


async def greedy_readers(
    host: str, port: int, source: str, start: int, amount: int, log: list[Exchange]
) -> None:
    """Mist's two readers (one per track of an interleaved mdat): each streams from
    `start` on its own connection, as fast as it can, until it has `amount` bytes."""

    async def reader() -> None:
        conn = await Connection.open(host, port, log)
        exchange = await conn.request("GET", source, f"bytes={start}-")
        taken = 0
        while taken < amount:
            taken += len(await conn.read(exchange, min(64 * 1024, amount - taken)))
        conn.drop()

    await asyncio.gather(reader(), reader())


async def mp4_start_up(
    host: str,
    port: int,
    source: str,
    *,
    put_sidecar: bytes | None = None,
    media_seconds: float = 70.0,
) -> StartUp:
    """Everything Mist reads of an MP4 source before its first segment."""
    started = time.perf_counter()
    log: list[Exchange] = []
    conn = await Connection.open(host, port, log)
    head = await conn.request("HEAD", source)
    if not (
        200 <= head.status < 300
        and "accept-ranges" in head.headers
        and "content-length" in head.headers
    ):
        raise AssertionError(f"Mist would not treat this source as seekable: {head}")
    size = int(head.headers["content-length"])
    boxes: list[tuple[str, int, int]] = []
    moov = b""
    offset = 0
    exchange = await conn.request("GET", source, "bytes=0-")  # same connection as HEAD
    while offset < size:
        header = await conn.read(exchange, min(16, size - offset))
        kind, box_size, _ = _box_header(header)
        if box_size == 0:
            box_size = size - offset
        boxes.append((kind, offset, box_size))
        if kind == "moov":
            moov = header + await conn.read(exchange, box_size - len(header))
        offset += box_size
        conn.drop()
        if offset >= size:
            break
        conn = await Connection.open(host, port, log)
        exchange = await conn.request("GET", source, f"bytes={offset}-")
    conn = await Connection.open(host, port, log)
    await conn.request("GET", source, f"bytes={size}-")  # Mist expects (and ignores) 416
    conn.drop()
    conn = await Connection.open(host, port, log)
    sidecar_head = await conn.request("HEAD", sidecar_target(source))
    sidecar = b""
    if sidecar_head.status == 200:
        get = await conn.request("GET", sidecar_target(source))
        sidecar = await conn.read_body(get)
    conn.drop()
    media = 0
    mdat = next(((offset, box) for kind, offset, box in boxes if kind == "mdat"), None)
    duration = movie_seconds(moov) if moov else None
    if mdat is not None and duration and media_seconds:
        first = mdat[0] + 8  # (a 64-bit mdat size would start 8 bytes later: fine here)
        media = min(mdat[0] + mdat[1] - first, int(media_seconds * (mdat[1] - 8) / duration))
        await greedy_readers(host, port, source, first, media, log)
    seconds = time.perf_counter() - started
    if put_sidecar is not None:
        await put_header(host, port, source, put_sidecar, log)
    return StartUp(size, boxes, moov, sidecar_head.status, sidecar, seconds, log, media)


async def put_header(
    host: str, port: int, source: str, header: bytes, log: list[Exchange]
) -> Exchange:
    """Mist's attempt to store the header it built (mist.md): PUT with Expect:
    100-continue; after the 100, the header as a chunked body in tiny chunks (1 to 14
    bytes), then the socket is closed: no final chunk, no waiting for an answer. The
    exchange records what Mist saw: the 100, or the refusal that came instead."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"PUT {sidecar_target(source)} HTTP/1.1\r\nHost: origin\r\n"
        "User-Agent: MistServer/3.10\r\nExpect: 100-continue\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if first.startswith(b"HTTP/1.1 100"):
        offset, size = 0, 1
        while offset < len(header):
            piece = header[offset : offset + size]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            offset, size = offset + len(piece), size % 14 + 1
        await writer.drain()
    writer.transport.abort()
    status_line, *header_lines = first.decode("latin-1").split("\r\n")
    headers = {
        n.strip().lower(): v.strip()
        for n, _, v in (line.partition(":") for line in header_lines if ":" in line)
    }
    exchange = Exchange(
        "PUT", sidecar_target(source), None, int(status_line.split()[1]), headers, bytearray()
    )
    log.append(exchange)
    return exchange
