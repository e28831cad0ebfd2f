"""The upstream side: failures map to 502/504 within the timeouts, bodies stream with
back-pressure, and a client that hangs up stops the S3 GET at once."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import tracemalloc
from typing import Any

import aiohttp
import pytest

from s3proxy import __version__

from .conftest import RunningProxy, StartProxy, make_config, make_token
from .origin import OriginState, make_origin, pattern
from .test_http import fetch

TOKEN = make_token("**", ttl=3600)


async def start_with_origin(
    aiohttp_server: Any,
    start_proxy: StartProxy,
    state: OriginState,
    cache: dict[str, Any] | None = None,
    **s3: Any,
) -> RunningProxy:
    origin = await aiohttp_server(make_origin(state))
    endpoint = f"http://{origin.host}:{origin.port}"
    config = make_config(endpoint, "media", s3={"max_attempts": 1, **s3}, cache=cache or {})
    return await start_proxy(config)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_s3_sees_our_user_agent_and_its_dates_come_back_unchanged(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=4096)
    running = await start_with_origin(aiohttp_server, start_proxy, state)
    async with aiohttp.ClientSession() as session:
        for method in ("HEAD", "GET"):  # the date from a HEAD, and from a cold GET
            async with session.request(
                method,
                running.url(f"/t/{TOKEN}/fresh-{method}.mp4"),
                headers={"Range": "bytes=0-9"},
            ) as response:
                assert response.headers["Last-Modified"] == "Mon, 02 Nov 2026 10:00:00 GMT"
    (agent,) = state.user_agents
    assert agent.startswith(f"s3proxy/{__version__} "), agent


async def test_unreachable_upstream_is_502_quickly(start_proxy: StartProxy) -> None:
    config = make_config(
        f"http://127.0.0.1:{closed_port()}", "media", s3={"connect_timeout_s": 1, "max_attempts": 2}
    )
    running = await start_proxy(config)
    started = time.monotonic()
    status, headers, body = await fetch(running.url(f"/vod/a.mp4?token={TOKEN}"))
    assert (status, body) == (502, b"")
    assert "unreachable" in headers["X-S3Proxy-Error"]
    assert time.monotonic() - started < 5
    errors = sum(
        running.metric("s3proxy_upstream_requests_total", op=op, outcome="error")
        for op in ("head", "get")  # a cold read learns the metadata from a GET
    )
    assert errors >= 1


async def test_stalled_upstream_is_504_within_the_read_timeout(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=1000, behaviour="stall_headers")
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, read_timeout_s=1, max_attempts=2
    )
    started = time.monotonic()
    status, headers, body = await fetch(running.url(f"/vod/a.mp4?token={TOKEN}"))
    elapsed = time.monotonic() - started
    assert (status, body) == (504, b"")
    assert headers["X-S3Proxy-Error"] == "upstream timed out"
    # two attempts of 1 s each, botocore's back-off between them (at most 2 s), slack
    assert elapsed < 2 * 1 + 2 + 1, f"took {elapsed:.1f}s"


async def test_upstream_stalling_mid_body_closes_the_connection(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=1 << 20, behaviour="stall_body")
    running = await start_with_origin(aiohttp_server, start_proxy, state, read_timeout_s=1)
    started = time.monotonic()
    received = b""
    async with aiohttp.ClientSession() as session:
        async with session.get(
            running.url(f"/vod/a.mp4?token={TOKEN}"), headers={"Range": "bytes=0-"}
        ) as response:
            assert response.status == 206
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in response.content.iter_any():
                    received += chunk
    assert 0 < len(received) < 1 << 20
    assert received == pattern(0, len(received)), "a short body, never wrong bytes"
    assert time.monotonic() - started < 5
    # the stall came after S3's headers: an error, not a success
    for _ in range(50):
        if running.metric("s3proxy_upstream_requests_total", op="get", outcome="error"):
            break
        await asyncio.sleep(0.02)
    assert running.metric("s3proxy_upstream_requests_total", op="get", outcome="error") == 1
    # the object's first block is fetched whole (no probe first): that GET is all there is
    assert running.metric("s3proxy_upstream_requests_total", op="get", outcome="ok") == 0


async def test_upstream_server_error_is_502(aiohttp_server: Any, start_proxy: StartProxy) -> None:
    running = await start_with_origin(
        aiohttp_server, start_proxy, OriginState(size=10, behaviour="error_500")
    )
    status, headers, body = await fetch(running.url(f"/vod/a.mp4?token={TOKEN}"))
    assert (status, body) == (502, b"")
    assert "500" in headers["X-S3Proxy-Error"]


async def test_upstream_denied_is_502_without_upstream_details(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    running = await start_with_origin(
        aiohttp_server, start_proxy, OriginState(size=10, behaviour="denied_403")
    )
    status, headers, body = await fetch(running.url(f"/vod/a.mp4?token={TOKEN}"))
    assert (status, body) == (502, b"")
    assert headers["X-S3Proxy-Error"] == "upstream refused the request (403)"


async def test_client_hangup_closes_the_upstream_get_at_once(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    # a 4 GiB object, made on the fly, sent at about 12 MiB/s
    state = OriginState(size=4 << 30, chunk_delay_s=0.005)
    running = await start_with_origin(aiohttp_server, start_proxy, state)
    reader, writer = await asyncio.open_connection(running.server.host, running.server.port)
    seek = 1 << 30  # (the object's first block would be finished for the cache: Mist comes back)
    writer.write(
        f"GET /t/{TOKEN}/big.mp4 HTTP/1.1\r\nHost: x\r\nRange: bytes={seek}-\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    got = 0
    while got < 256 * 1024:
        got += len(await reader.read(65536))
    writer.transport.abort()  # Mist at a seek: drop the connection
    hung_up_at = time.monotonic()
    await asyncio.wait_for(state.hung_up.wait(), 5)
    assert time.monotonic() - hung_up_at < 1.5
    assert state.bytes_sent < 3 << 20, "not even the read-ahead window was pulled"


async def test_a_write_to_a_closed_connection_is_logged_as_499_not_as_an_error(
    aiohttp_server: Any,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hang-up can land between aiohttp noticing it and the handler's cancellation:
    the handler's next write then raises ConnectionResetError (emulated here)."""
    state = OriginState(size=4096)
    running = await start_with_origin(aiohttp_server, start_proxy, state)

    async def closed(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionResetError("Cannot write to closing transport")

    monkeypatch.setattr(running.proxy.store, "stat", closed)
    caplog.set_level(logging.INFO)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await fetch(running.url(f"/t/{TOKEN}/a.mp4"))
    # (aiohttp's client retries an idempotent request once on such a disconnect)
    assert running.metric("s3proxy_requests_total", method="GET", status="499") >= 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_open_ended_read_holds_only_a_few_mib(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """bytes=0- of a 4 GiB object by a slow reader: S3 reads stay just ahead of the client
    and the heap (proxy, client and origin alike: one process) stays within the cache bound
    plus a few MiB."""
    state = OriginState(size=4 << 30)
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"max_bytes": "4MiB"}
    )
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        received = 0
        async with aiohttp.ClientSession() as session:
            async with session.get(
                running.url(f"/vod/big.mp4?token={TOKEN}"), headers={"Range": "bytes=0-"}
            ) as response:
                assert response.headers["Content-Length"] == str(4 << 30)
                while received < 48 << 20:
                    chunk = await response.content.read(64 * 1024)
                    assert chunk == pattern(received, len(chunk))
                    received += len(chunk)
                    if received % (8 << 20) < len(chunk):
                        await asyncio.sleep(0.2)  # a slow client: back-pressure builds up
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the 4 MiB cache, the client's run (1 + readahead_blocks), the read-ahead blocks, and
    # a few MiB of socket buffers in client, proxy and origin (all in this process)
    assert peak - baseline < (4 + 3 + 2 + 4) << 20, (
        f"heap grew by {(peak - baseline) / 2**20:.1f} MiB"
    )
    # What S3 sent beyond what the client took sits in loopback socket buffers (kernel).
    ahead = running.metric("s3proxy_upstream_bytes_total") - received
    assert ahead < 32 << 20, f"{ahead / 2**20:.1f} MiB read ahead of the client"
