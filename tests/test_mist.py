"""Mist's access pattern, reproduced (tests/mistlike.py): exact bytes, 206 wherever a
range was asked, empty error bodies, low egress, and warm-up turning start-up into hits."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import (
    Emulator,
    RunningProxy,
    StartProxy,
    make_token,
    put_object,
    require_tool,
    stored_within,
)
from .mistlike import Connection, Exchange, mp4_start_up
from .test_http import fetch
from .test_sidecars import DTSH as WITH_TAIL

# a header exactly as long as it says it is (as Mist's are)
DTSH = WITH_TAIL[: 8 + int.from_bytes(WITH_TAIL[4:8], "big")]

SAMPLE = resources.files("s3proxy").joinpath("data", "sample.mp4").read_bytes()
TOKEN = make_token("movies/*")


def check_start_up(running: RunningProxy, start: object, sidecar: bytes | None) -> None:
    from .mistlike import StartUp

    assert isinstance(start, StartUp)
    assert start.size == len(SAMPLE)
    assert [kind for kind, _, _ in start.boxes][:2] == ["ftyp", "moov"]
    moov_offset = start.boxes[1][1]
    assert start.moov == SAMPLE[moov_offset : moov_offset + len(start.moov)]
    for exchange in start.exchanges:
        if exchange.method == "GET" and exchange.range and exchange.range != f"bytes={start.size}-":
            first = int(exchange.range[6:-1])
            assert exchange.status == 206, exchange
            assert exchange.headers["content-range"].startswith(f"bytes {first}-")
            assert exchange.body == SAMPLE[first : first + len(exchange.body)]
    final = [e for e in start.exchanges if e.range == f"bytes={start.size}-"]
    assert final[0].status == 416
    assert final[0].headers["content-range"] == f"bytes */{start.size}"
    assert final[0].headers["content-length"] == "0", "error bodies are empty"
    if sidecar is None:
        assert start.sidecar_status == 404
    else:
        assert (start.sidecar_status, start.sidecar) == (200, sidecar)


async def test_mist_start_up_with_a_path_token(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "movies/sample.mp4", SAMPLE, content_type="video/mp4")
    running = await start_proxy()
    start = await mp4_start_up(
        running.server.host, running.server.port, f"/t/{TOKEN}/movies/sample.mp4", put_sidecar=DTSH
    )
    check_start_up(running, start, sidecar=None)
    assert start.exchanges[-1].status == 405, "PUT refused unless sidecars.accept_put"
    await asyncio.sleep(0.1)
    upstream = running.metric("s3proxy_upstream_bytes_total")
    sent = running.metric("s3proxy_response_bytes_total")
    assert upstream / sent < 1.5, (upstream, sent)


async def test_mist_start_up_with_a_query_token_and_a_sidecar(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "movies/sample.mp4", SAMPLE, content_type="video/mp4")
    running = await start_proxy(sidecars={"accept_put": True})
    source = f"/vod/movies/sample.mp4?token={TOKEN}"
    first = await mp4_start_up(running.server.host, running.server.port, source, put_sidecar=DTSH)
    check_start_up(running, first, sidecar=None)
    assert first.exchanges[-1].status == 100, "Mist sent its header (and left at once)"
    await stored_within(emulator, bucket, "movies/sample.mp4.dtsh")
    second = await mp4_start_up(running.server.host, running.server.port, source)
    check_start_up(running, second, sidecar=DTSH)
    stored = emulator.client().get_object(Bucket=bucket, Key="movies/sample.mp4.dtsh")
    assert stored["Body"].read() == DTSH


async def test_warm_up_turns_start_up_reads_into_hits(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "movies/sample.mp4", SAMPLE, content_type="video/mp4")
    put_object(emulator, bucket, "movies/sample.mp4.dtsh", DTSH)
    running = await start_proxy()
    # looked up before it was ready: the 404 is remembered, and warm-up looks again
    put_object(emulator, bucket, "movies/late.mp4.dtsh", DTSH)
    assert (await fetch(running.url(f"/t/{TOKEN}/movies/late.mp4")))[0] == 404
    put_object(emulator, bucket, "movies/late.mp4", SAMPLE)
    assert (await fetch(running.url(f"/t/{TOKEN}/movies/late.mp4")))[0] == 404
    async with aiohttp.ClientSession() as session:
        async with session.post(running.admin_url("/warm/movies/late.mp4")) as response:
            assert response.status == 200
    assert (await fetch(running.url(f"/t/{TOKEN}/movies/late.mp4")))[0] == 200
    async with aiohttp.ClientSession() as session:
        async with session.post(running.admin_url("/warm/movies/sample.mp4")) as response:
            assert response.status == 200
            report = await response.json()
    assert report["warmed_bytes"] == len(SAMPLE) and report["sidecar"] is True
    assert report["seconds"] >= 0
    reads_before = len(emulator.object_requests(bucket))
    misses_before = running.metric("s3proxy_cache_misses_total", tier="memory")
    start = await mp4_start_up(
        running.server.host, running.server.port, f"/t/{TOKEN}/movies/sample.mp4"
    )
    check_start_up(running, start, sidecar=DTSH)
    assert len(emulator.object_requests(bucket)) == reads_before, "no S3 request at all"
    assert running.metric("s3proxy_cache_misses_total", tier="memory") == misses_before


@pytest.fixture(scope="module")
def long_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """150 s of H.264 + AAC at about 500 kb/s: index first, and index last."""
    root = tmp_path_factory.mktemp("long")
    fast, last = root / "fast.mp4", root / "last.mp4"
    ffmpeg = require_tool("ffmpeg")
    sources = ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25:duration=150"]
    sources += ["-f", "lavfi", "-i", "sine=frequency=300:duration=150"]
    codecs = ["-c:v", "libx264", "-preset", "ultrafast", "-b:v", "450k", "-c:a", "aac"]
    run = [ffmpeg, "-v", "error", "-y"]
    subprocess.run([*run, *sources, *codecs, "-movflags", "+faststart", str(fast)], check=True)
    subprocess.run([*run, "-i", str(fast), "-c", "copy", str(last)], check=True)
    return {"faststart": fast.read_bytes(), "moov_at_end": last.read_bytes()}


@pytest.mark.parametrize("layout", ["faststart", "moov_at_end"])
async def test_warm_up_covers_a_mist_start_and_no_more(
    emulator: Emulator,
    bucket: str,
    start_proxy: StartProxy,
    long_assets: dict[str, bytes],
    layout: str,
) -> None:
    data = long_assets[layout]
    for name in ("cold.mp4", "warm.mp4"):
        put_object(emulator, bucket, f"movies/{name}", data, content_type="video/mp4")
    running = await start_proxy(cache={"block_size": "256KiB", "readahead_max_blocks": 4})
    host, port = running.server.host, running.server.port
    cold = await mp4_start_up(host, port, f"/t/{TOKEN}/movies/cold.mp4")
    assert 60 * 450_000 / 8 < cold.media_bytes < len(data) / 2, "70 s of 150"
    assert len(emulator.object_requests(bucket)) > 0
    async with aiohttp.ClientSession() as session:
        async with session.post(running.admin_url("/warm/movies/warm.mp4")) as response:
            assert response.status == 200
            report = await response.json()
    assert report["index"]["box"] == "moov"
    moov = next(offset for kind, offset, _ in cold.boxes if kind == "moov")
    assert report["index"]["offset"] == moov
    assert 70 <= report["media"]["seconds"] <= 75, report  # whole blocks: a little more
    assert report["media"]["readahead_bytes"] <= 4 * 256 * 1024
    assert report["warmed_bytes"] < len(data) * 0.75, "the start, not the whole asset"
    assert not report["capped"]
    reads = len(emulator.object_requests(bucket))
    warm = await mp4_start_up(host, port, f"/t/{TOKEN}/movies/warm.mp4")
    # No byte the start read came from S3. What the proxy sent past it (into the socket
    # buffers, which Mist goes on reading) has its read-ahead GETs, past the warm range.
    read = [
        (int(e.range[6:-1]), int(e.range[6:-1]) + len(e.body))  # type: ignore[index]
        for e in warm.exchanges
        if e.body
    ]
    later = [
        [int(n) for n in r.headers["Range"][6:].split("-")]
        for r in emulator.object_requests(bucket)[reads:]
    ]
    assert not [(a, b) for a, b in later for lo, hi in read if a < hi and b >= lo], (read, later)
    assert warm.media_bytes == cold.media_bytes and warm.moov == cold.moov
    for exchange in warm.exchanges:
        if exchange.method == "GET" and exchange.status == 206:
            first = int(exchange.range[6:-1])  # type: ignore[index]
            assert exchange.body == data[first : first + len(exchange.body)]


async def test_warm_up_stops_at_warm_bytes(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, long_assets: dict[str, bytes]
) -> None:
    put_object(emulator, bucket, "movies/capped.mp4", long_assets["faststart"])
    running = await start_proxy(cache={"block_size": "256KiB", "warm_bytes": "1MiB"})
    async with aiohttp.ClientSession() as session:
        async with session.post(running.admin_url("/warm/movies/capped.mp4")) as response:
            report = await response.json()
    assert report["capped"] and report["warmed_bytes"] <= 1 << 20
    gets = [r for r in emulator.object_requests(bucket) if r.method == "GET"]
    assert sum(1 for r in gets if r.path.endswith("/movies/capped.mp4")) <= 4


async def test_warm_command_asks_the_running_proxy(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    put_object(emulator, bucket, "movies/sample.mp4", SAMPLE)
    running = await start_proxy()
    config = tmp_path / "s3proxy.yaml"
    config.write_text(
        json.dumps(
            {"s3": {"bucket": bucket}, "admin": {"host": "127.0.0.1", "port": running.admin.port}}
        )
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "s3proxy",
        "warm",
        "movies/sample.mp4",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err
    assert json.loads(out)["warmed_bytes"] == len(SAMPLE)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "s3proxy",
        "warm",
        "movies/missing.mp4",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert err.decode().strip() == "s3proxy: warm movies/missing.mp4: 404 object not found"


async def test_the_first_block_is_fetched_once_though_the_box_walk_hangs_up_before_it_lands(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """Mist's HEAD fetches block 0 with the metadata; its box walk reads 16 bytes of it
    and hangs up, then seeks (a new connection) to the next box, in block 0 still. From a
    far origin the block is not whole yet when the first reader leaves: it must go on
    being fetched, for the next read, not be fetched again (a round trip more at start)."""
    from .origin import OriginState, pattern
    from .test_upstream import start_with_origin

    state = OriginState(size=4 << 20, chunk_delay_s=0.01)  # 1 MiB blocks: 160 ms each
    running = await start_with_origin(aiohttp_server, start_proxy, state)
    port = running.server.port
    assert port is not None
    source = f"/t/{make_token()}/movie.mp4"
    log: list[Exchange] = []
    conn = await Connection.open("127.0.0.1", port, log)
    head = await conn.request("HEAD", source)
    assert head.status == 200
    for offset in (0, 32, 64):  # box headers, each read from a new connection
        exchange = await conn.request("GET", source, f"bytes={offset}-")
        assert await conn.read(exchange, 16) == pattern(offset, 16)
        conn.drop()
        conn = await Connection.open("127.0.0.1", port, log)
    conn.drop()
    gets = [r for r in state.requests if r == ("GET", "bytes=0-1048575")]
    assert len(gets) == 1, state.requests
