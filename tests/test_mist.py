"""Mist's access pattern, reproduced (tests/mistlike.py): exact bytes, 206 wherever a
range was asked, empty error bodies, low egress, and warm-up turning start-up into hits."""

from __future__ import annotations

import asyncio
import json
import sys
from importlib import resources
from pathlib import Path

import aiohttp

from .conftest import Emulator, RunningProxy, StartProxy, make_token, put_object, stored_within
from .mistlike import mp4_start_up
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
