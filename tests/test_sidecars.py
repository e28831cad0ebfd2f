"""`.dtsh` sidecars as Mist asks for them: both token forms, a cached 404, and PUT
refused at once or, when switched on, checked and stored next to the asset."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .conftest import Emulator, RunningProxy, StartProxy, make_token, put_object, stored_within
from .mistlike import put_header
from .test_http import fetch

TOKEN = make_token("movies/*")
DTSH = b"DTSC" + (12).to_bytes(4, "big") + b"\xe0" + b"x" * 11 + b"tail"


def lookups_for(emulator: Emulator, bucket: str, key: str) -> int:
    """S3 requests for the key: HEADs, and GETs of its first block that tell its metadata."""
    return sum(
        1
        for r in emulator.requests_for(bucket)
        if r.method in ("HEAD", "GET") and r.path == f"/{bucket}/{key}"
    )


async def raw(
    running: RunningProxy, request: bytes, body: bytes | None = None, wait_continue: bool = False
) -> bytes:
    reader, writer = await asyncio.open_connection(running.server.host, running.server.port)
    writer.write(request)
    await writer.drain()
    if wait_continue:
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if not interim.startswith(b"HTTP/1.1 100"):
            writer.close()
            return interim
    if body is not None:
        writer.write(body)
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    return head


@pytest.fixture
async def with_sidecar(emulator: Emulator, bucket: str, start_proxy: StartProxy) -> RunningProxy:
    put_object(emulator, bucket, "movies/a.mp4", b"MEDIA" * 1000)
    put_object(emulator, bucket, "movies/a.mp4.dtsh", DTSH)
    return await start_proxy()


async def test_sidecar_with_a_path_token(with_sidecar: RunningProxy) -> None:
    status, headers, body = await fetch(with_sidecar.url(f"/t/{TOKEN}/movies/a.mp4.dtsh"))
    assert (status, body) == (200, DTSH)
    status, headers, _ = await fetch(with_sidecar.url(f"/t/{TOKEN}/movies/a.mp4.dtsh"), "HEAD")
    assert (status, headers["Content-Length"]) == (200, str(len(DTSH)))


async def test_sidecar_with_mists_query_token_form(with_sidecar: RunningProxy) -> None:
    # Mist's source `/vod/movies/a.mp4?token=<jwt>` becomes `...?token=<jwt>.dtsh`
    url = with_sidecar.url(f"/vod/movies/a.mp4?token={TOKEN}.dtsh")
    assert (await fetch(url))[::2] == (200, DTSH)
    assert (await fetch(url, "HEAD"))[0] == 200
    media = with_sidecar.url(f"/vod/movies/a.mp4?token={TOKEN}")
    assert (await fetch(media))[2] == b"MEDIA" * 1000


async def test_a_token_for_another_asset_does_not_open_the_sidecar(
    with_sidecar: RunningProxy,
) -> None:
    other = make_token("shows/*")
    assert (await fetch(with_sidecar.url(f"/t/{other}/movies/a.mp4.dtsh")))[0] == 403
    assert (await fetch(with_sidecar.url(f"/vod/movies/a.mp4?token={other}.dtsh")))[0] == 403


async def test_missing_sidecar_is_a_cached_404(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "movies/b.mp4", b"B")
    running = await start_proxy(cache={"metadata_ttl_s": 30})
    for _ in range(10):  # Mist looks it up at every stream start
        for method in ("HEAD", "GET"):
            status, _, body = await fetch(
                running.url(f"/vod/movies/b.mp4?token={TOKEN}.dtsh"), method
            )
            assert (status, body) == (404, b"")
    assert lookups_for(emulator, bucket, "movies/b.mp4.dtsh") == 1


async def test_put_is_refused_at_once_by_default(
    with_sidecar: RunningProxy, emulator: Emulator
) -> None:
    head = await raw(
        with_sidecar,
        f"PUT /t/{TOKEN}/movies/a.mp4.dtsh HTTP/1.1\r\nHost: x\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(DTSH)}\r\n\r\n".encode(),
        wait_continue=True,
    )
    assert head.startswith(b"HTTP/1.1 405")


@pytest.fixture
async def accepting(emulator: Emulator, bucket: str, start_proxy: StartProxy) -> RunningProxy:
    put_object(emulator, bucket, "movies/a.mp4", b"MEDIA")
    return await start_proxy(sidecars={"accept_put": True, "max_bytes": "1KiB"})


async def test_put_of_a_sidecar_is_stored_next_to_the_asset(
    accepting: RunningProxy, emulator: Emulator, bucket: str
) -> None:
    # as Mist sends it: Expect: 100-continue, chunked body, query token form
    chunked = f"{len(DTSH):x}\r\n".encode() + DTSH + b"\r\n0\r\n\r\n"
    head = await raw(
        accepting,
        f"PUT /vod/movies/a.mp4?token={TOKEN}.dtsh HTTP/1.1\r\n"
        "Host: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n".encode(),
        chunked,
        wait_continue=True,
    )
    assert head.startswith(b"HTTP/1.1 204")
    stored = emulator.client().get_object(Bucket=bucket, Key="movies/a.mp4.dtsh")
    assert stored["Body"].read() == DTSH
    assert (await fetch(accepting.url(f"/t/{TOKEN}/movies/a.mp4.dtsh")))[2] == DTSH
    assert (
        emulator.client().get_object(Bucket=bucket, Key="movies/a.mp4")["Body"].read() == b"MEDIA"
    ), "media is never written"


async def test_put_with_a_path_token_and_a_length(
    accepting: RunningProxy, emulator: Emulator, bucket: str
) -> None:
    head = await raw(
        accepting,
        f"PUT /t/{TOKEN}/movies/a.mp4.dtsh HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(DTSH)}\r\n\r\n".encode(),
        DTSH,
    )
    assert head.startswith(b"HTTP/1.1 204")
    assert stored_sidecar(emulator, bucket) == DTSH


def stored_sidecar(emulator: Emulator, bucket: str) -> bytes:
    body: bytes = (
        emulator.client().get_object(Bucket=bucket, Key="movies/a.mp4.dtsh")["Body"].read()
    )
    return body


async def test_put_refusals_come_before_the_body(
    accepting: RunningProxy, emulator: Emulator, bucket: str
) -> None:
    cases = [
        (f"/t/{TOKEN}/movies/a.mp4", TOKEN, b"HTTP/1.1 405"),  # media, not .dtsh
        ("/vod/movies/a.mp4.dtsh", None, b"HTTP/1.1 401"),  # no token
        (f"/t/{make_token('shows/*')}/movies/a.mp4.dtsh", None, b"HTTP/1.1 403"),
    ]
    for path, _, expected in cases:
        head = await raw(
            accepting,
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue"
            f"\r\nContent-Length: {len(DTSH)}\r\n\r\n".encode(),
            wait_continue=True,
        )
        assert head.startswith(expected), (path, head)
    head = await raw(
        accepting,
        f"PUT /t/{TOKEN}/movies/a.mp4.dtsh HTTP/1.1\r\nHost: x\r\n"
        "Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n".encode(),
        wait_continue=True,
    )
    assert head.startswith(b"HTTP/1.1 413")
    puts = [
        r for r in emulator.requests_for(bucket) if r.method == "PUT" and r.path.endswith(".dtsh")
    ]
    assert puts == []


async def test_put_checks_the_content(accepting: RunningProxy) -> None:
    for body, expected in (
        (b"<Error>not a header</Error>", b"HTTP/1.1 400"),
        (b"DTSC\x00\x00\x10\x00short", b"HTTP/1.1 400"),  # length lies
        (b"x" * 2000, b"HTTP/1.1 413"),
    ):
        head = await raw(
            accepting,
            f"PUT /t/{TOKEN}/movies/a.mp4.dtsh HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode(),
            body,
        )
        assert head.startswith(expected), head


async def test_a_put_as_mist_sends_it_is_stored_without_the_terminator(
    accepting: RunningProxy, emulator: Emulator, bucket: str
) -> None:
    """Tiny chunks, no final chunk, and the socket closed without reading an answer."""
    header = b"DTSC" + (300).to_bytes(4, "big") + bytes(range(256)) + b"x" * 44
    log: list[Any] = []
    exchange = await put_header(
        accepting.server.host,
        accepting.server.port,
        f"/vod/movies/a.mp4?token={TOKEN}",
        header,
        log,
    )
    assert exchange.status == 100
    assert await stored_within(emulator, bucket, "movies/a.mp4.dtsh") == header
    assert (await fetch(accepting.url(f"/t/{TOKEN}/movies/a.mp4.dtsh")))[2] == header


async def test_a_put_cut_before_its_length_stores_nothing(
    accepting: RunningProxy, emulator: Emulator, bucket: str
) -> None:
    header = b"DTSC" + (300).to_bytes(4, "big") + b"y" * 300
    log: list[Any] = []
    await put_header(
        accepting.server.host,
        accepting.server.port,
        f"/vod/movies/a.mp4?token={TOKEN}",
        header[:200],
        log,
    )
    await asyncio.sleep(0.5)
    keys = [r.path for r in emulator.requests_for(bucket) if r.method == "PUT"]
    assert f"/{bucket}/movies/a.mp4.dtsh" not in keys


async def test_a_new_assets_sidecar_is_looked_up_beside_it_once(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    """Mist asks for the `.dtsh` right after its first reads: the answer is there already."""
    put_object(emulator, bucket, "movies/c.mp4", b"C" * 5000)
    put_object(emulator, bucket, "movies/d.mp4", b"D" * 5000)
    put_object(emulator, bucket, "movies/d.mp4.dtsh", DTSH)
    running = await start_proxy(cache={"metadata_ttl_s": 0.3})
    for name in ("c", "d"):
        assert (await fetch(running.url(f"/vod/movies/{name}.mp4?token={TOKEN}"), "HEAD"))[0] == 200
    for _ in range(50):
        if lookups_for(emulator, bucket, "movies/c.mp4.dtsh") and lookups_for(
            emulator, bucket, "movies/d.mp4.dtsh"
        ):
            break
        await asyncio.sleep(0.02)
    assert lookups_for(emulator, bucket, "movies/c.mp4.dtsh") == 1, "before Mist asks"
    assert lookups_for(emulator, bucket, "movies/d.mp4.dtsh") == 1
    missing = await fetch(running.url(f"/vod/movies/c.mp4?token={TOKEN}.dtsh"), "HEAD")
    found = await fetch(running.url(f"/vod/movies/d.mp4?token={TOKEN}.dtsh"))
    assert (missing[0], found[0], found[2]) == (404, 200, DTSH)
    assert lookups_for(emulator, bucket, "movies/c.mp4.dtsh") == 1, "answered from that look-up"
    assert lookups_for(emulator, bucket, "movies/d.mp4.dtsh") == 1, "its bytes came with it"
    await asyncio.sleep(0.4)  # past the TTL: the asset is revalidated, its sidecar is not
    assert (await fetch(running.url(f"/vod/movies/c.mp4?token={TOKEN}"), "HEAD"))[0] == 200
    await asyncio.sleep(0.2)
    assert lookups_for(emulator, bucket, "movies/c.mp4.dtsh") == 1
    assert lookups_for(emulator, bucket, "movies/c.mp4") == 2
