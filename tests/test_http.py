"""HTTP semantics of /vod and /t: ranges, conditionals, headers, errors, byte for byte."""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import os
import random
import re

import aiohttp
import pytest
import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Emulator, RunningProxy, StartProxy, make_token, put_object

TOKEN = make_token("**", ttl=3600)


async def fetch(
    url: str, method: str = "GET", **headers: str
) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        # encoded=True: send the path exactly as written (no client-side normalising)
        async with session.request(
            method, yarl.URL(url, encoded=True), headers=headers
        ) as response:
            body = await response.read()
            return response.status, response.headers, body


def blob(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
async def served(emulator: Emulator, bucket: str, start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy()


def vod(running: RunningProxy, asset: str) -> str:
    return running.url(f"/vod/{asset}?token={TOKEN}")


async def test_full_get_returns_the_object_with_entity_headers(
    emulator: Emulator, served: RunningProxy
) -> None:
    data = blob(300_001)
    put_object(emulator, served.bucket, "movies/a.mp4", data)
    status, headers, body = await fetch(vod(served, "movies/a.mp4"))
    assert status == 200
    assert body == data
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Length"] == str(len(data))
    assert headers["Content-Type"] == "video/mp4"
    assert re.fullmatch(r'"[0-9a-f]{32}"', headers["ETag"])
    assert headers["Last-Modified"].endswith("GMT")


async def test_head_carries_length_and_accept_ranges_and_no_body(
    emulator: Emulator, served: RunningProxy
) -> None:
    put_object(emulator, served.bucket, "a.ts", blob(5000))
    status, headers, body = await fetch(vod(served, "a.ts"), "HEAD", Range="bytes=0-9")
    assert status == 200
    assert headers["Content-Length"] == "5000"
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "video/mp2t"
    assert body == b""


async def test_uploaded_content_type_wins_over_the_extension(
    emulator: Emulator, served: RunningProxy
) -> None:
    put_object(emulator, served.bucket, "a.mp4", b"xyz", content_type="video/quicktime")
    _, headers, _ = await fetch(vod(served, "a.mp4"))
    assert headers["Content-Type"] == "video/quicktime"


@pytest.mark.parametrize(
    "header, expected",
    [
        ("bytes=0-", (0, 999)),
        ("bytes=0-0", (0, 0)),
        ("bytes=10-19", (10, 19)),
        ("bytes=990-5000", (990, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-5000", (0, 999)),
        ("bytes=999-", (999, 999)),
    ],
)
async def test_single_range_is_206_with_exact_bytes(
    emulator: Emulator, served: RunningProxy, header: str, expected: tuple[int, int]
) -> None:
    data = blob(1000)
    put_object(emulator, served.bucket, "r.mp4", data)
    status, headers, body = await fetch(vod(served, "r.mp4"), Range=header)
    start, end = expected
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end}/1000"
    assert headers["Content-Length"] == str(end - start + 1)
    assert body == data[start : end + 1]


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
async def test_unsatisfiable_range_is_416_with_star_content_range(
    emulator: Emulator, served: RunningProxy, header: str
) -> None:
    put_object(emulator, served.bucket, "r.mp4", blob(1000))
    status, headers, body = await fetch(vod(served, "r.mp4"), Range=header)
    assert status == 416
    assert headers["Content-Range"] == "bytes */1000"
    assert body == b""


@pytest.mark.parametrize(
    "header", ["bytes=5-1", "bytes=abc", "items=0-5", "bytes=", "0-5", "bytes=1-2-3", "bytes=--5"]
)
async def test_invalid_range_is_ignored(
    emulator: Emulator, served: RunningProxy, header: str
) -> None:
    data = blob(1000)
    put_object(emulator, served.bucket, "r.mp4", data)
    status, _, body = await fetch(vod(served, "r.mp4"), Range=header)
    assert status == 200
    assert body == data


@pytest.mark.parametrize("size", [0, 1])
@pytest.mark.parametrize("cold_first", [False, True])
async def test_tiny_objects(
    emulator: Emulator, served: RunningProxy, size: int, cold_first: bool
) -> None:
    data = blob(size)
    put_object(emulator, served.bucket, "tiny.bin", data)
    if cold_first:  # a closed range first: metadata comes from that GET, not a HEAD
        status, _, body = await fetch(vod(served, "tiny.bin"), Range="bytes=0-10")
        assert (status, body) == ((416, b"") if size == 0 else (206, data))
    status, headers, body = await fetch(vod(served, "tiny.bin"))
    assert (status, body, headers["Content-Length"]) == (200, data, str(size))
    status, headers, _ = await fetch(vod(served, "tiny.bin"), "HEAD")
    assert (status, headers["Content-Length"]) == (200, str(size))
    status, headers, body = await fetch(vod(served, "tiny.bin"), Range="bytes=0-")
    if size == 0:
        assert (status, headers["Content-Range"]) == (416, "bytes */0")
    else:
        assert (status, headers["Content-Range"], body) == (206, "bytes 0-0/1", data)
    status, _, body = await fetch(vod(served, "tiny.bin"), Range="bytes=-10")
    assert (status, body) == ((416, b"") if size == 0 else (206, data))
    status, headers, body = await fetch(vod(served, "tiny.bin"), Range="bytes=0-10")
    if size == 0:
        assert (status, headers["Content-Range"], body) == (416, "bytes */0", b"")
    else:
        assert (status, headers["Content-Range"], body) == (206, "bytes 0-0/1", data)


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    assert message.is_multipart()
    return [(part["Content-Range"], part.get_payload(decode=True)) for part in message.iter_parts()]


async def test_several_ranges_are_multipart_byteranges(
    emulator: Emulator, served: RunningProxy
) -> None:
    data = blob(10_000)
    put_object(emulator, served.bucket, "m.mp4", data)
    status, headers, body = await fetch(vod(served, "m.mp4"), Range="bytes=0-9, 100-199, -5")
    assert status == 206
    assert headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    assert headers["Content-Length"] == str(len(body))
    parts = parse_multipart(headers["Content-Type"], body)
    assert parts == [
        ("bytes 0-9/10000", data[0:10]),
        ("bytes 100-199/10000", data[100:200]),
        ("bytes 9995-9999/10000", data[9995:]),
    ]


async def test_too_many_or_overlapping_ranges_get_the_whole_body(
    emulator: Emulator, served: RunningProxy
) -> None:
    data = blob(5000)
    put_object(emulator, served.bucket, "m.mp4", data)
    many = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(17))
    status, _, body = await fetch(vod(served, "m.mp4"), Range=many)
    assert (status, body) == (200, data)
    status, _, body = await fetch(vod(served, "m.mp4"), Range="bytes=0-100,50-150")
    assert (status, body) == (200, data)


async def test_multirange_with_one_satisfiable_range_is_a_single_part(
    emulator: Emulator, served: RunningProxy
) -> None:
    data = blob(100)
    put_object(emulator, served.bucket, "m.mp4", data)
    status, headers, body = await fetch(vod(served, "m.mp4"), Range="bytes=10-19,500-600")
    assert (status, headers["Content-Range"], body) == (206, "bytes 10-19/100", data[10:20])


async def validated(emulator: Emulator, served: RunningProxy) -> tuple[bytes, str, str, str]:
    """An uploaded object: its bytes, its URL, and the ETag and Last-Modified a HEAD gave."""
    data = blob(2000)
    put_object(emulator, served.bucket, "c.mp4", data)
    url = vod(served, "c.mp4")
    _, headers, _ = await fetch(url, "HEAD")
    return data, url, headers["ETag"], headers["Last-Modified"]


async def test_conditionals(emulator: Emulator, served: RunningProxy) -> None:
    _, url, etag, modified = await validated(emulator, served)

    status, h, body = await fetch(url, **{"If-None-Match": etag})
    assert (status, body, h["ETag"]) == (304, b"", etag)
    assert (await fetch(url, **{"If-None-Match": "W/" + etag}))[0] == 304
    assert (await fetch(url, **{"If-None-Match": '"other"'}))[0] == 200
    assert (await fetch(url, **{"If-Modified-Since": modified}))[0] == 304
    assert (await fetch(url, **{"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}))[0] == 200
    assert (await fetch(url, "HEAD", **{"If-None-Match": "*"}))[0] == 304

    status, h, body = await fetch(url, **{"If-Match": '"other"'})
    assert (status, body) == (412, b"")
    assert h["X-S3Proxy-Error"]
    assert (await fetch(url, **{"If-Match": etag}))[0] == 200
    assert (await fetch(url, **{"If-Match": "*"}))[0] == 200
    assert (await fetch(url, **{"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}))[0] == 412
    assert (await fetch(url, **{"If-Unmodified-Since": modified}))[0] == 200


async def test_if_range(emulator: Emulator, served: RunningProxy) -> None:
    data, url, etag, modified = await validated(emulator, served)
    for validator in (etag, modified):
        status, _, body = await fetch(url, Range="bytes=5-9", **{"If-Range": validator})
        assert (status, body) == (206, data[5:10])
    for validator in ('"stale"', "W/" + etag, "Thu, 01 Jan 1970 00:00:00 GMT"):
        status, _, body = await fetch(url, Range="bytes=5-9", **{"If-Range": validator})
        assert (status, body) == (200, data)


@pytest.mark.parametrize("range_header", [None, "bytes=0-99", "bytes=100-", "bytes=-5"])
async def test_missing_object_is_404_with_empty_body(
    served: RunningProxy, range_header: str | None
) -> None:
    extra = {"Range": range_header} if range_header else {}
    status, headers, body = await fetch(vod(served, "nope.mp4"), **extra)
    assert (status, body) == (404, b"")
    assert headers["X-S3Proxy-Error"] == "object not found"


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_are_405_and_never_reach_s3(
    emulator: Emulator, served: RunningProxy, method: str
) -> None:
    put_object(emulator, served.bucket, "a.mp4", b"data")
    before = len(emulator.object_requests(served.bucket))
    status, headers, body = await fetch(vod(served, "a.mp4"), method)
    assert (status, headers["Allow"], body) == (405, "GET, HEAD", b"")
    assert len(emulator.object_requests(served.bucket)) == before


async def test_put_with_expect_continue_is_refused_before_the_body(served: RunningProxy) -> None:
    import asyncio

    reader, writer = await asyncio.open_connection(served.server.host, served.server.port)
    writer.write(
        f"PUT /t/{TOKEN}/a.mp4.dtsh HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 405 ")
    assert b"100 Continue" not in head


@pytest.mark.parametrize(
    "path",
    [
        "/vod/a/../b.mp4",
        "/vod/a/%2e%2e/b.mp4",
        "/vod/%2E%2E/x.mp4",
        "/vod/./a.mp4",
        "/vod/a//b.mp4",
        "/vod/a%5cb.mp4",
        "/vod/a%00b.mp4",
        "/vod/a%0ab.mp4",
        "/vod/" + "x" * 1025,
    ],
)
async def test_bad_asset_names_are_400_before_auth_or_s3(
    emulator: Emulator, served: RunningProxy, path: str
) -> None:
    status, headers, body = await fetch(served.url(path))  # no token at all
    assert (status, body) == (400, b"")
    assert headers["X-S3Proxy-Error"]
    assert emulator.object_requests(served.bucket) == []


async def test_percent_encoded_names_are_decoded_once(
    emulator: Emulator, served: RunningProxy
) -> None:
    put_object(emulator, served.bucket, "dir/a b%20.mp4", b"spaces")
    status, _, body = await fetch(vod(served, "dir%2Fa%20b%2520.mp4"))
    assert (status, body) == (200, b"spaces")


async def test_prefix_is_prepended_to_the_key(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "vod/prefixed.mp4", b"prefixed")
    running = await start_proxy(s3={"prefix": "vod/"})
    status, _, body = await fetch(vod(running, "prefixed.mp4"))
    assert (status, body) == (200, b"prefixed")


# --- property-based: random sizes and Range headers, compared with Python slicing ------

range_spec = st.one_of(
    st.tuples(st.integers(0, 5000), st.integers(0, 5000)).map(lambda t: f"{min(t)}-{max(t)}"),
    st.integers(0, 5000).map(lambda a: f"{a}-"),
    st.integers(0, 6000).map(lambda n: f"-{n}"),
)


def expected_ranges(specs: list[str], size: int) -> list[tuple[int, int]] | None:
    """An independent model of RFC 9110 range selection (None: 416)."""
    out = []
    for spec in specs:
        first, last = spec.split("-")
        if first == "":
            n = int(last)
            if n > 0 and size > 0:
                out.append((max(0, size - n), size - 1))
        elif int(first) < size:
            out.append((int(first), size - 1 if last == "" else min(int(last), size - 1)))
    return out or None


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(0, 4000),
    specs=st.lists(range_spec, min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
async def test_random_ranges_match_python_slicing(
    emulator: Emulator, served: RunningProxy, size: int, specs: list[str], seed: int
) -> None:
    data = blob(size, seed)
    key = f"prop/{size}-{seed}.bin"
    put_object(emulator, served.bucket, key, data)
    status, headers, body = await fetch(vod(served, key), Range="bytes=" + ", ".join(specs))
    expected = expected_ranges(specs, size)
    if expected is None:
        assert (status, headers["Content-Range"]) == (416, f"bytes */{size}")
        return
    ordered = sorted(expected)
    overlapping = any(b[0] <= a[1] for a, b in itertools.pairwise(ordered))
    if len(expected) > 1 and overlapping:
        assert (status, body) == (200, data)
    elif len(expected) == 1:
        ((start, end),) = expected
        assert status == 206
        assert headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert body == data[start : end + 1]
    else:
        assert status == 206
        parts = parse_multipart(headers["Content-Type"], body)
        assert parts == [(f"bytes {s}-{e}/{size}", data[s : e + 1]) for s, e in expected]


async def test_large_object_streams_byte_for_byte(emulator: Emulator, served: RunningProxy) -> None:
    data = os.urandom(6 * 1024 * 1024 + 123)
    put_object(emulator, served.bucket, "big.bin", data)
    status, _, body = await fetch(vod(served, "big.bin"), Range="bytes=1000000-")
    assert (status, body) == (206, data[1_000_000:])
