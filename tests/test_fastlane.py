"""The fast lane: a plain GET whose bytes are in memory is answered from its head,
without aiohttp's request machinery, and the answer, the metrics and the access line are
the ones the usual way gives. Anything else goes the usual way. Real sockets, a real
emulator, two proxies side by side (fast lane on and off)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import time
from collections import deque
from typing import Any

import pytest
from aiohttp.http_parser import HttpRequestParser
from hypothesis import given, settings
from hypothesis import strategies as st

from s3proxy.fastlane import WRITE_SLICE, parse_head, send_now

from .conftest import Emulator, RunningProxy, StartProxy, make_token, put_object
from .test_connections import connect, statuses
from .test_observability import access_lines

MIB = 1 << 20
ASSET = "fast.mp4"
VARYING = re.compile(rb"\r\n(Date|X-Request-ID): [^\r]*")  # differ between any two answers


def head(path: str, *lines: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{h}\r\n" for h in lines)).encode() + (
        b"\r\n"
    )


async def exchange(running: RunningProxy, data: bytes, answers: int = 1) -> list[bytes]:
    """Send `data` (one or more heads) on one connection; the answers, in order."""
    reader, writer = await connect(running)
    writer.write(data)
    out = [await read_answer(reader) for _ in range(answers)]
    writer.close()
    return out


async def one_by_one(running: RunningProxy, heads: list[bytes]) -> list[bytes]:
    """Each head sent once the answer before it has arrived, on one connection."""
    reader, writer = await connect(running)
    out = []
    for data in heads:
        writer.write(data)
        out.append(await read_answer(reader))
    writer.close()
    return out


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    top = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    match = re.search(rb"\r\nContent-Length: (\d+)", top)
    length = int(match.group(1)) if match else 0
    return top + await asyncio.wait_for(reader.readexactly(length), 10)


def steady(answer: bytes) -> bytes:
    """The answer without what differs between any two answers (a multipart answer's
    boundary is random too)."""
    found = re.search(rb"boundary=(\w+)", answer)
    if found is not None:
        answer = answer.replace(found.group(1), b"BOUNDARY")
    return VARYING.sub(b"", answer)


def counters(running: RunningProxy) -> dict[str, float]:
    get = running.metric
    return {
        "206": get("s3proxy_requests_total", method="GET", status="206"),
        "200": get("s3proxy_requests_total", method="GET", status="200"),
        "bytes": get("s3proxy_response_bytes_total"),
        "memory hits": get("s3proxy_cache_hits_total", tier="memory"),
        "first bytes": get("s3proxy_time_to_first_byte_seconds_count", source="memory"),
        "durations": get("s3proxy_request_duration_seconds_count", method="GET"),
        "read-ahead": get("s3proxy_readahead_blocks_total"),
        "inflight": get("s3proxy_inflight_requests"),
    }


@pytest.fixture
async def pair(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> tuple[RunningProxy, RunningProxy]:
    """Two proxies on one bucket, the fast lane on and off, with the same blocks cached
    (blocks 0, 1 and 5 of a 6 MiB asset, each read alone: no read-ahead) and fresh
    metadata."""
    put_object(emulator, bucket, ASSET, os.urandom(6 * MIB), "video/mp4")
    overrides: dict[str, Any] = {"cache": {"readahead_blocks": 2}, "server": {"node_name": "n1"}}
    fast = await start_proxy(**overrides)
    usual = await start_proxy(fast_lane=False, **overrides)
    token = make_token("fast*")
    for running in (fast, usual):
        for block in (1, 0, 5):
            span = f"Range: bytes={block * MIB}-{(block + 1) * MIB - 1}"
            await exchange(running, head(f"/t/{token}/{ASSET}", span))
        await asyncio.sleep(0.2)  # the fetches have put their blocks in memory
    return fast, usual


# --- the answer -------------------------------------------------------------------


async def test_a_memory_hit_is_answered_by_the_fast_lane_as_the_usual_way_answers_it(
    pair: tuple[RunningProxy, RunningProxy], caplog: pytest.LogCaptureFixture
) -> None:
    fast, usual = pair
    token = make_token("fast*", sub="viewer-1", jti="j-9")
    path = f"/t/{token}/{ASSET}"
    asked = [
        head(path, "Range: bytes=0-99"),
        head(path, f"Range: bytes={6 * MIB - 1000}-", "User-Agent: Mist/3.10"),  # open-ended
        head(path, f"Range: bytes={MIB - 10}-{MIB + 9}"),  # across two blocks
        head(path, "Range: bytes=5-5,7-9,0-2"),  # several ranges: the usual way
        head(f"/vod/{ASSET}", f"Authorization: Bearer {token}", "Range: bytes=10-19"),
        head(path, "Range: bytes=0-99", "X-Request-ID: edge-1"),
        head(path, "Range: bytes=0-1048575", "Connection: keep-alive"),  # block 0 ...
        head(path, "Range: bytes=1048576-2097151"),  # ... then 1: read-ahead of 2 and 3
    ]
    caplog.set_level(logging.INFO, logger="s3proxy.access")
    sides = []
    for running in pair:
        before = counters(running)
        caplog.clear()
        answers = await one_by_one(running, asked)
        await asyncio.sleep(0.3)  # read-ahead lands
        after = counters(running)
        delta = {k: after[k] - before[k] for k in after}
        sides.append((answers, delta, access_lines(caplog)))
    (answers, delta, lines), (their_answers, their_delta, their_lines) = sides
    assert [steady(a) for a in answers] == [steady(a) for a in their_answers]
    assert b"X-Request-ID: edge-1\r\n" in answers[5]
    assert b"\r\nX-S3Proxy-Node: n1\r\n" in answers[0]
    assert fast.proxy.fast_answers == len(asked) - 1 and usual.proxy.fast_answers == 0
    assert delta == their_delta
    # the read across blocks 0 and 1 reads 2 and 3 ahead (block 1 alone, later, does not)
    assert delta["read-ahead"] == 2 and delta["memory hits"] == 11  # 3 for the 3 ranges
    ignored = {"duration_ms", "request_id"}
    assert len(lines) == len(their_lines) == len(asked)
    for mine, theirs in zip(lines, their_lines, strict=True):
        assert {k: v for k, v in mine.items() if k not in ignored} == {
            k: v for k, v in theirs.items() if k not in ignored
        }
    assert lines[0]["path"] == f"/t/-/{ASSET}" and lines[0]["sub"] == "viewer-1"
    assert lines[0]["cache"] == "hit" and lines[0]["upstream_ms"] == 0


async def test_a_new_version_s_memory_hits_carry_that_version_s_headers(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    """The fast lane keeps a version's header lines encoded: a new version of the same
    name (same size) gets its own, as the usual way gives them."""
    put_object(emulator, bucket, ASSET, b"a" * MIB, "video/mp4")
    fast = await start_proxy(cache={"metadata_ttl_s": 0.2, "readahead_blocks": 0})
    usual = await start_proxy(fast_lane=False, cache={"metadata_ttl_s": 0.2})
    path = f"/t/{make_token('fast*')}/{ASSET}"
    asked = head(path, "Range: bytes=0-1023")
    answers = []
    for body in (b"a", b"b"):
        if body == b"b":
            put_object(emulator, bucket, ASSET, body * MIB, "video/quicktime")
            await asyncio.sleep(0.3)  # the metadata is stale: the next read looks again
        await exchange(fast, asked)  # block 0 of this version into memory
        before = fast.proxy.fast_answers
        (answer,) = await exchange(fast, asked)
        assert fast.proxy.fast_answers == before + 1  # a fast-lane hit
        assert answer.endswith(body * 1024)
        (theirs,) = await exchange(usual, asked)
        assert steady(answer) == steady(theirs)
        answers.append(answer)
    etags = [re.search(rb"\r\nETag: ([^\r]*)", a) for a in answers]
    assert etags[0] is not None and etags[1] is not None
    assert etags[0].group(1) != etags[1].group(1)


@pytest.mark.parametrize(
    "lines",
    [
        ["If-None-Match: *"],
        ["Range: bytes=0-9", 'If-Range: "other"'],
        ["Range: bytes=9999999999-"],  # 416
        ["Range: bytes=0-9", "Range: bytes=10-19"],  # a repeated header
        ["Range: bytes=0-9", "Connection: close"],
        ["Range: bytes=0-9", "Content-Length: 0"],
        ["Range: bytes=0-9", "X-Folded: a", " b"],
    ],
)
async def test_what_the_fast_lane_leaves_gets_the_usual_answer(
    pair: tuple[RunningProxy, RunningProxy], lines: list[str]
) -> None:
    fast, _ = pair
    data = head(f"/t/{make_token('fast*')}/{ASSET}", *lines)
    mine, theirs = [await exchange(running, data) for running in pair]
    assert steady(mine[0]) == steady(theirs[0])
    assert fast.proxy.fast_answers == 0


@pytest.mark.parametrize(
    "request_line",
    [
        "GET /t/{token}/{asset} HTTP/1.0",
        "HEAD /t/{token}/{asset} HTTP/1.1",
        "GET /t/{token}/%66ast.mp4 HTTP/1.1",
        "GET /vod/{asset}?token={token} HTTP/1.1",
        "GET /t/{token}/./{asset} HTTP/1.1",
        "GET /t/not-a-token/{asset} HTTP/1.1",
        "GET /t/{other}/{asset} HTTP/1.1",
        "GET /t/{token}/missing.mp4 HTTP/1.1",
    ],
)
async def test_other_forms_and_refusals_go_the_usual_way(
    pair: tuple[RunningProxy, RunningProxy], request_line: str
) -> None:
    fast, _ = pair
    line = request_line.format(token=make_token("fast*"), other=make_token("x*"), asset=ASSET)
    data = f"{line}\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n".encode()
    mine, theirs = [await exchange_until_closed(running, data) for running in pair]
    assert steady(mine) == steady(theirs) and mine.startswith(b"HTTP/1.")
    assert fast.proxy.fast_answers == 0


CLOSING = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def exchange_until_closed(running: RunningProxy, data: bytes) -> bytes:
    """Everything the proxy sends for `data` and a request that closes the connection
    behind it (so the heads in `data` keep the connection alive themselves)."""
    reader, writer = await connect(running)
    writer.write(data + CLOSING)
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return out


# --- the connection ---------------------------------------------------------------


async def test_pipelined_answers_keep_their_order_across_the_two_ways(
    pair: tuple[RunningProxy, RunningProxy], emulator: Emulator, bucket: str
) -> None:
    fast, _ = pair
    cold = os.urandom(100_000)
    put_object(emulator, bucket, "fast-cold.mp4", cold)
    token = make_token("fast*")
    asked = b"".join(
        [
            head(f"/t/{token}/{ASSET}", "Range: bytes=0-99"),  # fast
            head(f"/t/{token}/fast-cold.mp4", "Range: bytes=0-99"),  # S3, the usual way
            head(f"/t/{token}/{ASSET}", "Range: bytes=100-199"),  # fast, behind it
            head(f"/t/{token}/fast-cold.mp4", "Range: bytes=100-199"),  # a hit by then
        ]
    )
    answers = await exchange(fast, asked, 4)
    expected = await exchange(pair[1], head(f"/t/{token}/{ASSET}", "Range: bytes=0-199"))
    body = expected[0].split(b"\r\n\r\n", 1)[1]
    assert [a.split(b"\r\n\r\n", 1)[1] for a in answers] == [
        body[:100],
        cold[:100],
        body[100:],
        cold[100:200],
    ]
    assert statuses(b"".join(answers)) == [206] * 4
    # the first, then aiohttp's turn: what was queued behind it stays with aiohttp
    assert fast.proxy.fast_answers == 1
    # a fast one sent while aiohttp waits on S3 for the one before waits its turn too
    reader, writer = await connect(fast)
    writer.write(head(f"/t/{token}/fast-cold.mp4", "Range: bytes=99000-99999"))
    await asyncio.sleep(0.005)
    writer.write(head(f"/t/{token}/{ASSET}", "Range: bytes=200-299"))
    first, second = await read_answer(reader), await read_answer(reader)
    writer.close()
    assert first.endswith(cold[99000:]) and second.endswith(body[:100]) is False
    assert (
        second.split(b"\r\n\r\n", 1)[1]
        == (await exchange(pair[1], head(f"/t/{token}/{ASSET}", "Range: bytes=200-299")))[0].split(
            b"\r\n\r\n", 1
        )[1]
    )


def slow_client(running: RunningProxy) -> socket.socket:
    """A client with a small receive window, so answers wait in the proxy's socket."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((running.server.host, running.server.port))
    return sock


# More than the kernel's send buffer takes (tcp_wmem's 4 MiB at most): the rest of
# the answers waits in the proxy until the client reads.
MANY = 4


async def test_a_slow_reader_gets_every_byte_and_the_next_answer_after_it(
    pair: tuple[RunningProxy, RunningProxy],
) -> None:
    fast, usual = pair
    token = make_token("fast*")
    whole = head(f"/t/{token}/{ASSET}", f"Range: bytes=0-{2 * MIB - 1}")
    then = head(f"/t/{token}/{ASSET}", "Range: bytes=0-9")
    reader, writer = await asyncio.open_connection(sock=slow_client(fast))
    writer.write(whole * MANY + then)
    await asyncio.sleep(0.3)
    # an answer is going out as the client reads: the heads behind it wait
    assert fast.metric("s3proxy_inflight_requests") == 1
    mine = [await read_answer(reader) for _ in range(MANY + 1)]
    writer.close()
    assert fast.metric("s3proxy_inflight_requests") == 0
    theirs = await exchange(usual, whole * MANY + then, MANY + 1)
    assert [steady(a) for a in mine] == [steady(a) for a in theirs]
    # the first went out as the client read; what came after a full socket buffer went
    # the usual way (aiohttp waits on the socket too)
    assert fast.proxy.fast_answers >= 1


async def test_a_client_gone_mid_answer_is_logged_with_what_it_got(
    pair: tuple[RunningProxy, RunningProxy], caplog: pytest.LogCaptureFixture
) -> None:
    fast, _ = pair
    caplog.set_level(logging.INFO, logger="s3proxy.access")
    sock = slow_client(fast)
    sock.sendall(head(f"/t/{make_token('fast*')}/{ASSET}", f"Range: bytes=0-{2 * MIB - 1}") * MANY)
    await asyncio.sleep(0.3)
    assert fast.metric("s3proxy_inflight_requests") == 1
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset, as a player that hangs up
    deadline = time.monotonic() + 5
    while fast.metric("s3proxy_inflight_requests") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert fast.metric("s3proxy_inflight_requests") == 0
    lines = [x for x in access_lines(caplog) if x["range"] == f"bytes=0-{2 * MIB - 1}"]
    *whole, cut = lines
    assert all(x["bytes"] == 2 * MIB and "error" not in x for x in whole)
    assert cut["status"] == 206 and 0 < cut["bytes"] < 2 * MIB
    assert cut["error"] == "client closed the connection"


async def test_an_idle_connection_after_a_fast_answer_closes_at_the_keepalive_timeout(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, ASSET, os.urandom(1000))
    running = await start_proxy(server={"keepalive_timeout_s": 1})
    token = make_token("fast*")
    await exchange(running, head(f"/t/{token}/{ASSET}", "Range: bytes=0-9"))
    await asyncio.sleep(0.2)
    reader, writer = await connect(running)
    writer.write(head(f"/t/{token}/{ASSET}", "Range: bytes=0-9"))
    await read_answer(reader)
    assert running.proxy.fast_answers == 1
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert 0.5 < time.monotonic() - started < 3
    writer.close()


# --- the head ---------------------------------------------------------------------

_NAMES = st.sampled_from(
    ["Host", "Range", "range", "User-Agent", "Accept", "X-Request-ID", "Connection",
     "Authorization", "If-Range", "Content-Length", "Transfer-Encoding", "X A", "X:A",
     "Upgrade", "Expect", "TE", "X-Ü"]
)  # fmt: skip
_VALUES = st.sampled_from(
    ["bytes=0-99", " keep-alive ", "close", "Upgrade", "a\tb", "", "\x01", "x\ry", "x\ny",
     "\u00e9", "chunked", "5", "Bearer abc.def.ghi", " ", "\x7f"]
)  # fmt: skip
_TARGETS = st.sampled_from(
    ["/t/a.b.c/x.mp4", "/vod/x.mp4", "/t/a/%2e%2e/x", "/t/a/../x", "/t/a/./x", "/t//x",
     "/vod/x?token=1", "/vod/x#f", "*", "http://h/vod/x", "/vod/x y", "/vod/\u00e9", "/t/a/x."]
)  # fmt: skip


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "GET", "HEAD", "get", "POST"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0"]))
    lines = [f"{method} {draw(_TARGETS)} {version}"]
    for _ in range(draw(st.integers(0, 5))):
        sep = draw(st.sampled_from([": ", ":", " : ", ":\t"]))
        lines.append(draw(_NAMES) + sep + draw(_VALUES))
    if draw(st.booleans()):
        lines.insert(1, draw(st.sampled_from([" folded", "\tfolded", "no-colon"])))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@settings(max_examples=400, deadline=None)
@given(heads())
def test_a_head_the_fast_lane_accepts_means_the_same_to_aiohttp(data: bytes) -> None:
    parsed = parse_head(data)
    if parsed is None:
        return
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(None, loop, 2**16, max_line_size=8190, max_field_size=16384)
        ((message, _payload),), upgraded, tail = parser.feed_data(data)
    finally:
        loop.close()
    assert (message.method, message.version, message.path) == ("GET", (1, 1), parsed.path)
    assert message.url.path == parsed.path and not message.url.query_string
    assert not message.should_close and not upgraded and not message.chunked and tail == b""
    assert {k.lower(): v for k, v in message.headers.items()} == parsed.headers
    assert len(message.headers) == len(parsed.headers)  # none repeated


def test_the_fast_lane_takes_the_plain_head_a_player_sends() -> None:
    parsed = parse_head(head("/t/a.b.c/x.mp4", "Range: bytes=0-", "User-Agent: Mist"))
    assert parsed is not None and parsed.path == "/t/a.b.c/x.mp4"
    assert parsed.headers == {"host": "x", "range": "bytes=0-", "user-agent": "Mist"}
    assert parse_head(head("/t/a.b.c/x.mp4")[:-2]) is None  # not a whole head


async def test_an_answer_still_going_out_is_not_cut_at_the_keepalive_timeout(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    data = os.urandom(2 * MIB)
    put_object(emulator, bucket, ASSET, data)
    running = await start_proxy(server={"keepalive_timeout_s": 1})
    whole = head(f"/t/{make_token('fast*')}/{ASSET}", f"Range: bytes=0-{2 * MIB - 1}")
    await exchange(running, whole)
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection(sock=slow_client(running))
    writer.write(whole * MANY)
    await asyncio.sleep(1.5)  # past the keep-alive timeout, the client not reading
    answers = [await read_answer(reader) for _ in range(MANY)]
    writer.close()
    assert all(a.endswith(b"\r\n\r\n" + data) for a in answers)
    assert running.proxy.fast_answers >= 1


async def test_a_client_that_resets_at_once_costs_no_writes_to_a_dead_socket(
    pair: tuple[RunningProxy, RunningProxy], caplog: pytest.LogCaptureFixture
) -> None:
    fast, _ = pair
    caplog.set_level(logging.WARNING, logger="asyncio")
    whole = head(f"/t/{make_token('fast*')}/{ASSET}", f"Range: bytes=0-{2 * MIB - 1}")
    for _ in range(20):
        sock = socket.create_connection((fast.server.host, fast.server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(whole)
        sock.close()  # a reset right behind the head: the proxy reads it, then can not send
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    assert fast.proxy.fast_answers >= 1  # (a head the reset overtook is never read)
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert fast.metric("s3proxy_inflight_requests") == 0


@pytest.mark.parametrize(
    "lines",
    [
        [b"Range: \x85bytes=0-9"],  # str.strip() would take \x85 for a space; aiohttp not
        [b"Range: bytes=0-9", b"User-Agent: caf\xc3\xa9"],
        [b"Range: bytes=0-9", b"Sec-WebSocket-Key1: x"],
        [b"Range: bytes=0-9"] + [b"X-Many-%d: x" % n for n in range(130)],
    ],
)
async def test_heads_aiohttp_reads_its_own_way_go_the_usual_way(
    pair: tuple[RunningProxy, RunningProxy], lines: list[bytes]
) -> None:
    fast, _ = pair
    data = head(f"/t/{make_token('fast*')}/{ASSET}")[:-2] + b"".join(x + b"\r\n" for x in lines)
    mine, theirs = [await exchange_until_closed(running, data + b"\r\n") for running in pair]
    assert steady(mine) == steady(theirs)
    assert fast.proxy.fast_answers == 0


async def test_a_bearer_token_behind_a_non_ascii_space_is_refused_as_the_usual_way_does(
    pair: tuple[RunningProxy, RunningProxy],
) -> None:
    fast, _ = pair
    data = f"GET /vod/{ASSET} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n".encode()
    data += b"Authorization: Bearer \xa0" + make_token("fast*").encode() + b"\r\n\r\n"
    mine, theirs = [await exchange(running, data) for running in pair]
    assert mine[0].startswith(b"HTTP/1.1 401") and steady(mine[0]) == steady(theirs[0])
    assert fast.proxy.fast_answers == 0


async def test_a_token_segment_the_routes_refuse_is_not_served_without_auth(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, ASSET, os.urandom(1000))
    running = await start_proxy(auth={"mode": "none", "keys": []})
    await exchange(running, head(f"/vod/{ASSET}", "Range: bytes=0-9"))
    await asyncio.sleep(0.2)
    (answer,) = await exchange(running, head(f"/t/{{x}}/{ASSET}", "Range: bytes=0-9"))
    assert answer.startswith(b"HTTP/1.1 404")
    assert running.proxy.fast_answers == 0


async def test_a_client_that_pipelines_without_reading_is_held_back(
    pair: tuple[RunningProxy, RunningProxy],
) -> None:
    fast, usual = pair
    small = head(f"/t/{make_token('fast*')}/{ASSET}", "Range: bytes=0-131071")
    reader, writer = await asyncio.open_connection(sock=slow_client(fast))
    writer.write(small * 2000)
    await asyncio.sleep(0.5)
    # what the socket took, and a little more; the rest waits in aiohttp's queue
    assert fast.proxy.fast_answers < 200
    mine = [await read_answer(reader) for _ in range(2000)]
    writer.close()
    expected = steady((await exchange(usual, small))[0])
    assert all(steady(a) == expected for a in mine)


async def test_pipelined_heads_behind_a_reset_are_not_answered(
    pair: tuple[RunningProxy, RunningProxy], caplog: pytest.LogCaptureFixture
) -> None:
    fast, _ = pair
    caplog.set_level(logging.WARNING, logger="asyncio")
    small = head(f"/t/{make_token('fast*')}/{ASSET}", "Range: bytes=0-99")
    for _ in range(10):
        sock = socket.create_connection((fast.server.host, fast.server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(small * 10)
        sock.close()
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert fast.metric("s3proxy_inflight_requests") == 0


async def test_a_head_begun_behind_a_body_is_read_by_aiohttp_to_its_end(
    pair: tuple[RunningProxy, RunningProxy],
) -> None:
    fast, _ = pair
    path = f"/t/{make_token('fast*')}/{ASSET}"
    with_body = head(path, "Range: bytes=0-9", "Content-Length: 5") + b"hello"
    begun = b"GET /junk HTTP/1.1\r\nX-A: "  # the start of a head, after the body
    looks_plain = head(path, "Range: bytes=10-19")  # ... which this one ends
    transcripts = []
    for running in pair:
        reader, writer = await connect(running)
        writer.write(with_body + begun)
        first = await read_answer(reader)
        writer.write(looks_plain)
        transcripts.append([steady(first), steady(await read_answer(reader))])
        writer.close()
    mine, theirs = transcripts
    assert mine == theirs and mine[1].startswith(b"HTTP/1.1 404")
    assert fast.proxy.fast_answers == 0


class _Writer(asyncio.Protocol):
    """A transport's protocol that says when its writer may go on."""

    def __init__(self) -> None:
        self.resumed = asyncio.Event()
        self.resumed.set()

    def pause_writing(self) -> None:
        self.resumed.clear()

    def resume_writing(self) -> None:
        self.resumed.set()


@pytest.mark.parametrize("seed", range(6))
async def test_send_now_hands_every_piece_over_in_order_through_a_full_socket(seed: int) -> None:
    """Pieces of random sizes, the socket's buffers small and the reader slow: whatever
    `send_now` hands over in each turn (one gathering sendmsg, then the transport's
    buffer once the socket is full) arrives whole and in order, and its count is exact."""
    rng = random.Random(seed)
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(_Writer, sock=ours)
    transport.set_write_buffer_limits(high=0)  # as GuardedHandler sets it
    sizes = [
        rng.choice([1, 17, 300, 4096, 65536, WRITE_SLICE]) for _ in range(rng.randrange(1, 40))
    ]
    data = [os.urandom(size) for size in sizes]
    pieces = deque(memoryview(piece) for piece in data)
    got = bytearray()

    async def read_slowly() -> None:
        while len(got) < sum(sizes):
            got.extend(await asyncio.wait_for(loop.sock_recv(theirs, rng.randrange(1, 50000)), 5))
            await asyncio.sleep(0.001 * rng.random())

    reading = asyncio.ensure_future(read_slowly())
    handed, turns = 0, 0
    while pieces:
        await asyncio.wait_for(protocol.resumed.wait(), 5)
        handed += send_now(transport, pieces)
        turns += 1
    await asyncio.wait_for(reading, 10)
    transport.close()
    theirs.close()
    assert handed == sum(sizes)
    assert bytes(got) == b"".join(data)
    assert turns > 1 or sum(sizes) < 8192  # the socket was full at least once
