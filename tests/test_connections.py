"""Connections from clients that never authenticate are bounded, with real sockets: a
request head's size and time, idle keep-alive, the number of open connections; requests
without an HTTP version and malformed ones get a fixed short answer."""

from __future__ import annotations

import asyncio
import contextlib
import time

from .conftest import Emulator, RunningProxy, StartProxy, make_token, put_object

LIMITS = {
    "header_timeout_s": 1,
    "keepalive_timeout_s": 1,
    "max_head_bytes": "4KiB",
    "max_connections": 4,
}


async def connect(running: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(running.server.host, running.server.port)


async def answer(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    """Everything the proxy sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout)


def status_of(data: bytes) -> int:
    version, status = data.split(b" ", 2)[:2]
    assert version in (b"HTTP/1.0", b"HTTP/1.1"), data[:100]
    return int(status)


def statuses(data: bytes) -> list[int]:
    """The status of each answer on a connection, in order."""
    return [int(answer.split()[1]) for answer in data.split(b"HTTP/1.")[1:]]


async def closed_after(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[bytes, float]:
    started = time.monotonic()
    data = await answer(reader, timeout)
    return data, time.monotonic() - started


async def test_a_head_over_max_head_bytes_is_431_even_unfinished(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(server=LIMITS)
    # every line under aiohttp's own per-line bound; never the blank line that ends a head
    reader, writer = await connect(running)
    writer.write(b"GET /vod/a.mp4 HTTP/1.1\r\nHost: x\r\n")
    for n in range(20):
        writer.write(b"X-Filler-%d: %s\r\n" % (n, b"a" * 1000))
    await writer.drain()
    data = await answer(reader)
    assert status_of(data) == 431, data[:100]
    assert data.endswith(b"\r\n\r\n431 Request Header Fields Too Large\n")
    writer.close()
    # and a whole one that arrives at once
    reader, writer = await connect(running)
    writer.write(b"GET /vod/a.mp4 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n")
    data = await answer(reader)
    assert status_of(data) == 431, data[:100]
    writer.close()
    assert running.metric("s3proxy_requests_total", method="-", status="431") == 2


async def test_a_head_under_the_bound_is_served(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "a.mp4", b"0123456789")
    running = await start_proxy(server=LIMITS)
    reader, writer = await connect(running)
    writer.write(
        f"GET /t/{make_token()}/a.mp4 HTTP/1.1\r\nHost: x\r\nRange: bytes=2-4\r\n"
        f"X-Filler: {'c' * 2000}\r\nConnection: close\r\n\r\n".encode()
    )
    data = await answer(reader)
    assert status_of(data) == 206 and data.endswith(b"\r\n\r\n234"), data
    writer.close()


async def test_a_slow_head_is_408_after_header_timeout(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(server=LIMITS)
    reader, writer = await connect(running)
    head = b"GET /vod/a.mp4 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100
    started = time.monotonic()

    async def trickle() -> None:
        for byte in head:  # one byte every 50 ms: 6 s for the whole head
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)

    sender = asyncio.ensure_future(trickle())
    data = await answer(reader)
    elapsed = time.monotonic() - started
    sender.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await sender
    writer.close()
    assert status_of(data) == 408, data[:100]
    assert 0.8 < elapsed < 3, elapsed


async def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(server=LIMITS)
    reader, writer = await connect(running)
    data, elapsed = await closed_after(reader)
    assert data == b"" and 0.8 < elapsed < 3, (data, elapsed)
    writer.close()


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_timeout(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(server={**LIMITS, "header_timeout_s": 30})
    reader, writer = await connect(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"ok\n"), 5)
    assert status_of(first) == 200
    data, elapsed = await closed_after(reader)
    assert data == b"" and 0.5 < elapsed < 3, (data, elapsed)
    writer.close()


async def test_connections_over_max_connections_get_503_at_accept(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(server={**LIMITS, "header_timeout_s": 30})
    held = [await connect(running) for _ in range(4)]
    await asyncio.sleep(0.1)
    reader, writer = await connect(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await answer(reader)
    assert status_of(data) == 503 and b"Retry-After: 1\r\n" in data, data
    writer.close()
    # one of the four goes: a new connection is served again
    held.pop()[1].close()
    await asyncio.sleep(0.1)
    reader, writer = await connect(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(await answer(reader)) == 200
    writer.close()
    for _, each in held:
        each.close()


async def test_a_request_line_without_a_version_is_400_at_once(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(server={**LIMITS, "header_timeout_s": 30})
    for line in (b"GET /healthz\r\n", b"GET /healthz\r\n\r\n", b"GET\r\n"):
        reader, writer = await connect(running)
        writer.write(line)
        data, elapsed = await closed_after(reader)
        assert status_of(data) == 400, (line, data)
        assert elapsed < 2
        writer.close()


async def test_a_malformed_request_gets_a_fixed_short_answer(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy()
    token = make_token()
    for head in (
        f"GET /t/{token}/a.mp4 HTTP/1.1\nHost: x\n\n",  # bare LF
        f"GET /t/{token}/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        f"BREW /t/{token}/a.mp4 HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /vod/a.mp4 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded {token}\r\n\r\n",
    ):
        reader, writer = await connect(running)
        writer.write(head.encode("latin-1"))
        data = await answer(reader)
        writer.close()
        assert status_of(data) == 400 and data.endswith(b"\r\n\r\n400 Bad Request\n")
        assert token.split(".")[2].encode() not in data


# --- pipelined heads: each one is bounded, whichever read it arrives in ---------


async def test_a_pipelined_head_arriving_with_the_request_before_it_is_bounded(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(server=LIMITS)
    # a whole request, then most of a second head over the bound, in one write
    reader, writer = await connect(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
    writer.write(b"".join(b"X-Filler-%d: %s\r\n" % (n, b"a" * 1000) for n in range(8)))
    await writer.drain()
    data, took = await closed_after(reader)
    assert statuses(data) == [200, 431], data[:300]
    assert took < 1, "refused at once, not held until a timeout"
    writer.close()
    # a whole request, then the start of a second head that never ends: 408, in time
    reader, writer = await connect(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
    await writer.drain()
    data, took = await closed_after(reader)
    assert statuses(data) == [200, 408], data[:300]
    assert took < 3, f"held {took:.1f} s"
    writer.close()


async def test_a_pipelined_request_split_across_reads_is_served(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(server=LIMITS)
    reader, writer = await connect(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
    await writer.drain()
    await asyncio.sleep(0.2)  # a read of its own for the rest of the second head
    writer.write(b"st: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await answer(reader)
    assert statuses(data) == [200, 200], data[:300]
    writer.close()


async def test_a_pipelined_request_line_without_a_version_is_400(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(server=LIMITS)
    reader, writer = await connect(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz\r\n\r\n")
    await writer.drain()
    data = await answer(reader)
    assert b"HTTP/0.9" not in data
    assert statuses(data) == [200, 400], data[:300]
    writer.close()
