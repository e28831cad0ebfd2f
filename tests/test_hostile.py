"""Hostile input gets a clean 4xx or is ignored, never a 500: bytes no token may hold,
claims and dates too large for a number or a datetime, Range offsets of any length, and
"not found" remembered cheaply."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import jwt

from s3proxy.errors import AssetNotFound
from s3proxy.metrics import Metrics
from s3proxy.ranges import RangeNotSatisfiable, parse_http_date, parse_range_header
from s3proxy.store.metadata import MetadataCache

from .conftest import SECRET, Emulator, RunningProxy, StartProxy, make_token, put_object
from .test_http import fetch

HUGE = "9" * 5000  # more digits than int() takes


async def raw(running: RunningProxy, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(running.server.host, running.server.port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


async def test_a_token_with_bytes_no_token_holds_is_401_before_any_crypto(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy()
    for credentials in (b"\xff", b"a.b.\xff", "é.é.é".encode(), b"a.b", b"a." * 5000 + b"b"):
        head = await raw(
            running,
            b"GET /vod/a.mp4 HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + credentials + b"\r\n\r\n",
        )
        assert head.startswith(b"HTTP/1.1 401"), (credentials[:20], head)
    # a NUL is refused by the HTTP parser itself, before any handler
    head = await raw(
        running, b"GET /vod/a.mp4 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \x00x.y.z\r\n\r\n"
    )
    assert head.split(b" ")[1] == b"400"
    status, _, _ = await fetch(running.url("/t/%C3%A9.%C3%A9.%C3%A9/a.mp4"))
    assert status == 401
    assert running.metric("s3proxy_requests_total", method="GET", status="500") == 0


async def test_numeric_claims_too_large_for_a_time_are_refused(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "a.mp4", b"x" * 100)
    running = await start_proxy()
    now = int(time.time())
    for claims in (
        {"exp": int("9" * 400)},
        {"exp": now + 600, "nbf": -int("9" * 400)},
        {"exp": now + 600, "iat": -int("9" * 400)},
        {"exp": 1e308},
    ):
        token = jwt.encode(
            {"assets": ["**"], **claims}, SECRET, algorithm="HS256", headers={"kid": "k1"}
        )
        status, _, _ = await fetch(running.url(f"/t/{token}/a.mp4"))
        assert status in (200, 401), (claims, status)
        assert status == 401 or "exp" not in claims or claims["exp"] == now + 600
    assert running.metric("s3proxy_requests_total", method="GET", status="500") == 0


async def test_dates_that_do_not_fit_are_ignored(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "a.mp4", b"x" * 100)
    running = await start_proxy()
    url = running.url(f"/t/{make_token()}/a.mp4")
    for bad in (
        "Mon, 01 Jan 2020 99999999999999999999:00:00 GMT",
        "Mon, 99999999999999999999 Jan 2020 00:00:00 GMT",
        "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
        "Mon, 01 Jan 2020 00:00:00 +99999999999999999999",
        "Fri, 31 Dec 9999 23:59:59 -2359",  # fits as written, not once in UTC
        "x" * 10_000,
    ):
        assert parse_http_date(bad) is None
        for header in ("If-Modified-Since", "If-Unmodified-Since"):
            status, _, body = await fetch(url, **{header: bad})
            assert (status, body) == (200, b"x" * 100), header
        status, _, body = await fetch(url, Range="bytes=0-9", **{"If-Range": bad})
        assert (status, body) == (200, b"x" * 100), "If-Range that does not parse: whole body"


def test_range_offsets_of_any_length_compare_correctly() -> None:
    size = 1000
    for header in (f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}", f"bytes=1{'0' * 30}-"):
        try:
            parse_range_header(header, size)
        except RangeNotSatisfiable:
            continue
        raise AssertionError(f"{header[:40]}: past the end is unsatisfiable")
    (whole,) = parse_range_header(f"bytes=0-{HUGE}", size) or []
    assert (whole.start, whole.end) == (0, size - 1)
    (tail,) = parse_range_header(f"bytes=-{HUGE}", size) or []
    assert (tail.start, tail.end) == (0, size - 1)
    assert parse_range_header(f"bytes={HUGE}-{HUGE[:-1]}", size) is None, "last < first"
    (padded,) = parse_range_header(f"bytes={'0' * 50}5-{'0' * 50}9", size) or []
    assert (padded.start, padded.end) == (5, 9)


async def test_huge_range_offsets_through_the_proxy(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "a.mp4", b"y" * 100)
    running = await start_proxy()
    url = running.url(f"/t/{make_token()}/a.mp4")
    status, headers, _ = await fetch(url, Range=f"bytes={HUGE}-")
    assert (status, headers["Content-Range"]) == (416, "bytes */100")
    status, _, body = await fetch(url, Range=f"bytes=10-{HUGE}")
    assert (status, body) == (206, b"y" * 90)


def test_a_remembered_not_found_is_small() -> None:
    cache = MetadataCache(30, on_replaced=lambda _meta: None)
    names = [f"movies/missing-{i:06d}.mp4" for i in range(2000)]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for name in names:
        cache.missing(name)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown / len(names) < 1024, f"{grown / len(names):.0f} bytes per entry"
    try:
        cache.fresh(names[0])
    except AssertionError:
        raise
    except AssetNotFound:
        pass
    else:
        raise AssertionError("a missing object is remembered as missing")
    Metrics()  # the module imports cleanly beside a cache (no global state)
