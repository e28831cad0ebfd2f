"""The adaptive read-ahead window, through the store against a slow origin: a sequential
reader's window grows and a seek starts it over; one byte budget bounds all windows
with 200 readers; a reader that hangs up starts no more read-ahead; every byte fetched
ahead is read, unread in memory or counted wasted (cut short, evicted, or its version
replaced). And the window's rule as a pure function."""

from __future__ import annotations

import asyncio
import math
from contextlib import aclosing
from typing import Any

import aiohttp
from hypothesis import given
from hypothesis import strategies as st

from s3proxy.store.blocks import BlockKey
from s3proxy.store.plan import readahead_window
from s3proxy.store.reads import ReadHistory

from .conftest import StartProxy, make_token
from .mistlike import Connection, Exchange
from .origin import OriginState, pattern
from .test_upstream import start_with_origin

BS = 64 * 1024
CACHE = {"block_size": "64KiB", "readahead_blocks": 2, "readahead_max_blocks": 32}


async def read(store: Any, key: str, start: int, end: int, history: ReadHistory | None) -> bytes:
    meta = await store.stat(key)
    out = bytearray()
    async with aclosing(store.open(meta, start, end, history=history)) as chunks:
        async for chunk in chunks:
            out += chunk
    return bytes(out)


async def test_a_streaming_reader_s_window_grows_and_a_seek_starts_it_over(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=96 * BS, chunk_delay_s=0.004)  # each GET: a pause per block
    running = await start_with_origin(aiohttp_server, start_proxy, state, cache=CACHE)
    store = running.proxy.store
    store.seek_grace_s = 0
    history = ReadHistory()
    assert await read(store, "a.mp4", 0, state.size - 1, history) == pattern(0, state.size)
    meta = await store.stat("a.mp4")
    version = (store.bucket, meta.key, meta.etag)
    grown = history.window(version)
    assert grown is not None and grown > 2, grown
    # a seek: a read that does not go on from where this connection left off
    await read(store, "a.mp4", 40 * BS + 5, 40 * BS + 100, history)
    assert history.window(version) == 2


async def test_one_byte_budget_bounds_the_windows_of_200_readers(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=24 * BS, chunk_delay_s=0.002)
    cache = {**CACHE, "readahead_max_bytes": "1MiB", "max_bytes": "256MiB"}
    running = await start_with_origin(aiohttp_server, start_proxy, state, cache=cache)
    store = running.proxy.store
    store.seek_grace_s = 0
    budget = store.reads.readahead_budget
    assert budget == 1 << 20
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, store.reads._readahead_bytes)
            await asyncio.sleep(0.001)

    watcher = asyncio.ensure_future(watch())
    bodies = await asyncio.gather(
        *(read(store, f"r{n}.mp4", 0, state.size - 1, ReadHistory()) for n in range(200))
    )
    done.set()
    await watcher
    assert all(body == pattern(0, state.size) for body in bodies), "exact bytes"
    assert 0 < peak <= budget, (peak, budget)
    assert running.metric("s3proxy_readahead_blocks_total") > 0


async def test_no_read_ahead_after_a_hang_up(aiohttp_server: Any, start_proxy: StartProxy) -> None:
    state = OriginState(size=256 * BS, chunk_delay_s=0.002)
    running = await start_with_origin(aiohttp_server, start_proxy, state, cache=CACHE)
    store = running.proxy.store
    store.seek_grace_s = 0
    meta = await store.stat("a.mp4")
    taken = 0
    async with aclosing(store.open(meta, 0, state.size - 1, history=ReadHistory())) as chunks:
        async for chunk in chunks:
            taken += len(chunk)
            if taken >= 20 * BS:
                break  # the viewer hangs up
    started = running.metric("s3proxy_readahead_blocks_total")
    assert started > 0 and store.reads._streams == 0
    await asyncio.sleep(0.3)
    assert running.metric("s3proxy_readahead_blocks_total") == started


def ahead_accounts(running: Any) -> tuple[float, float, float]:
    """(bytes received from S3, wasted read-ahead, unread read-ahead in memory)."""
    return (
        running.metric("s3proxy_upstream_bytes_total"),
        running.metric("s3proxy_readahead_wasted_bytes_total"),
        running.metric("s3proxy_readahead_unread_bytes"),
    )


async def within(condition: Any, seconds: float = 5) -> None:
    for _ in range(int(seconds / 0.001)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("not reached in time")


async def settled(store: Any) -> None:
    for _ in range(200):
        if store.reads._readahead_inflight == 0 and not len(store.fetches):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("read-ahead still in flight")


async def test_every_byte_fetched_ahead_is_read_unread_or_wasted(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    bs = 256 * 1024  # four of the origin's 64 KiB chunks: a GET can stop inside a block
    state = OriginState(size=40 * bs, chunk_delay_s=0.005)
    cache = {**CACHE, "block_size": "256KiB", "max_bytes": f"{16 * bs}"}
    running = await start_with_origin(aiohttp_server, start_proxy, state, cache=cache)
    store = running.proxy.store
    store.seek_grace_s = 0
    # read whole: whatever was fetched ahead was read
    assert await read(store, "whole.mp4", 0, state.size - 1, None) == pattern(0, state.size)
    await settled(store)
    assert running.metric("s3proxy_readahead_blocks_total") > 0
    assert ahead_accounts(running) == (state.size, 0, 0)

    # a viewer hangs up at a block's end, read-ahead in flight: what read-ahead had
    # received of blocks it did not finish is wasted, what it finished is unread
    meta = await store.stat("gone.mp4")
    taken = 0
    async with aclosing(store.open(meta, 0, state.size - 1, history=ReadHistory())) as chunks:
        async for chunk in chunks:
            taken += len(chunk)
            if taken == 2 * bs:
                # until a block fetched ahead has landed and another is half-way
                await within(
                    lambda: (
                        store.reads.unread_bytes > 0
                        and any(
                            0 < fetch.received(i) < bs
                            for fetch in store.fetches.fetches()
                            for i in fetch.whole
                        )
                    )
                )
                break
    await settled(store)
    received, wasted, unread = ahead_accounts(running)
    received -= state.size
    assert wasted > 0 and wasted % (64 * 1024) == 0, wasted  # whole chunks, not blocks
    assert unread > 0 and unread % bs == 0, unread
    assert received == taken + wasted + unread, (received, taken, wasted, unread)

    # memory evicts the unread blocks: they were fetched for nothing
    assert await read(store, "other.mp4", 0, state.size - 1, None) == pattern(0, state.size)
    await settled(store)
    received_after, wasted_after, unread_after = ahead_accounts(running)
    assert received_after == received + 2 * state.size and unread_after == 0
    assert wasted_after == wasted + unread, (wasted_after, wasted, unread)


async def test_read_ahead_of_a_version_replaced_before_it_was_read_is_wasted(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=24 * BS)
    cache = {**CACHE, "metadata_ttl_s": 0.05}
    running = await start_with_origin(aiohttp_server, start_proxy, state, cache=cache)
    store = running.proxy.store
    store.seek_grace_s = 0
    assert await read(store, "v.mp4", 0, 4 * BS - 1, ReadHistory()) == pattern(0, 4 * BS)
    await settled(store)
    _, wasted, unread = ahead_accounts(running)
    assert unread > 0 and wasted == 0  # fetched past the read's end, for the next one
    state.overwrite()
    await asyncio.sleep(0.1)
    assert (await store.stat("v.mp4")).etag == state.etag  # the old version's blocks go
    assert ahead_accounts(running)[1:] == (unread, 0)


@given(
    current=st.integers(1, 64),
    floor=st.integers(1, 8),
    ceiling=st.integers(0, 64),
    waited=st.booleans(),
    rate=st.floats(0, 1e9),
    latency=st.floats(0, 1),
    share=st.integers(1, 10_000),
)
def test_the_window_rule(
    current: int,
    floor: int,
    ceiling: int,
    waited: bool,
    rate: float,
    latency: float,
    share: int,
) -> None:
    window = readahead_window(
        current,
        floor,
        ceiling,
        waited=waited,
        rate_bps=rate,
        latency_s=latency,
        block_size=BS,
        share=share,
    )
    assert 1 <= window <= min(max(ceiling, floor), share)
    bound = min(max(ceiling, floor), share)
    if waited:
        assert window >= min(2 * current, bound)  # it waited: the window grows
    elif math.ceil(rate * latency * 2 / BS) + 1 <= current - 1:
        assert window <= max(current - 1, floor)  # blocks waited for it: it eases off
    assert (
        readahead_window(5, 0, 32, waited=True, rate_bps=1e9, latency_s=1, block_size=BS, share=99)
        == 0
    )


MOOV = 32  # a faststart MP4: ftyp (32 bytes), then the moov, then the mdat
MOOV_SIZE = 2 * BS + BS // 2


def faststart_head(size: int, moov_size: int = MOOV_SIZE) -> bytes:
    """The top-level boxes of a faststart MP4 of `size` bytes: ftyp, moov, mdat."""
    mdat = MOOV + moov_size
    return (
        (32).to_bytes(4, "big")
        + b"ftypisom"
        + bytes(20)
        + moov_size.to_bytes(4, "big")
        + b"moov"
        + bytes(moov_size - 8)
        + (size - mdat).to_bytes(4, "big")
        + b"mdat"
    )


async def seek_read(running: Any, source: str, start: int, take: int) -> None:
    """A seek of Mist's: `bytes=<start>-` on a new connection, of which it takes `take`
    bytes before hanging up."""
    conn = await Connection.open("127.0.0.1", running.server.port, [])
    exchange = await conn.request("GET", source, f"bytes={start}-")
    assert len(await conn.read(exchange, take)) == take
    conn.drop()


async def moov_read(running: Any, source: str, take: int) -> None:
    """Mist's start: a HEAD, the ftyp's header from `bytes=0-`, then `bytes=32-` on a new
    connection, of which it takes `take` bytes before hanging up."""
    port = running.server.port
    log: list[Exchange] = []
    conn = await Connection.open("127.0.0.1", port, log)
    assert (await conn.request("HEAD", source)).status == 200
    exchange = await conn.request("GET", source, "bytes=0-")
    assert len(await conn.read(exchange, 16)) == 16
    conn.drop()
    await seek_read(running, source, MOOV, take)


async def test_a_moov_reader_s_read_ahead_reaches_the_first_media_and_outlives_it(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """Mist reads the moov whole, hangs up and opens its media readers at the mdat: the
    moov reader's read-ahead goes `startup_blocks` past the moov, and those fetches go
    on after it hangs up (before, they stopped with it: the media readers then paid a
    round trip for their first blocks). Nothing further is fetched."""
    state = OriginState(size=64 * BS, chunk_delay_s=0.002)
    state.head = faststart_head(state.size)
    running = await start_with_origin(aiohttp_server, start_proxy, state, cache=CACHE)
    store = running.proxy.store
    source = f"/t/{make_token()}/movie.mp4"
    await moov_read(running, source, MOOV_SIZE)
    meta = await store.stat("movie.mp4")
    moov_last = (MOOV + MOOV_SIZE - 1) // BS
    reach = moov_last + store.reads.startup_blocks
    assert store.reads.startup_blocks == 8  # a quarter of the widest window
    keys = [BlockKey(store.bucket, meta.key, meta.etag, i) for i in range(reach + 1)]
    await within(lambda: all(store.tiers.memory.contains(key) for key in keys))
    await settled(store)
    ends = [int(r.partition("-")[2]) for m, r in state.requests if m == "GET" and r]
    assert max(ends) == (reach + 1) * BS - 1, state.requests
    async with aiohttp.ClientSession() as session:
        start = MOOV + MOOV_SIZE + 8  # where the media readers begin
        got = await session.get(running.url(source), headers={"Range": f"bytes={start}-"})
        assert await got.read() == state.content(start, state.size - start)


async def test_a_box_walker_that_hangs_up_at_the_moov_s_header_costs_no_more(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """A walker that takes the moov's 16-byte header and hangs up at once (within the
    seek grace) starts no GET past block 0, start-up read-ahead included."""
    state = OriginState(size=64 * BS, chunk_delay_s=0.002)
    state.head = faststart_head(state.size)
    running = await start_with_origin(aiohttp_server, start_proxy, state, cache=CACHE)
    running.proxy.store.seek_grace_s = 0.2  # a hang-up is in well within it
    await moov_read(running, f"/t/{make_token()}/movie.mp4", 16)
    await asyncio.sleep(0.3)
    assert [r for m, r in state.requests if m == "GET"] == [f"bytes=0-{BS - 1}"]


async def test_a_media_reader_of_a_moov_inside_block_0_streams_at_once(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """The moov lies inside block 0, so its reader is served from memory and hangs up
    within its seek grace, with no read-ahead; the walk then reads the mdat's header and
    hangs up, at no cost. A read from the mdat's payload is a media reader: its start-up
    read-ahead, the widest window, goes out at once, not after a seek grace (before, it
    waited the grace out, then grew from the narrowest). A read from elsewhere in the
    media is a seek, held as before."""
    moov_size = 4096
    state = OriginState(size=1024 * BS, chunk_delay_s=0.002)
    state.head = faststart_head(state.size, moov_size)
    running = await start_with_origin(aiohttp_server, start_proxy, state, cache=CACHE)
    store = running.proxy.store
    store.seek_grace_s = 5.0  # far longer than the test waits
    source = f"/t/{make_token()}/movie.mp4"

    def last_asked() -> int:
        return max(int(r.partition("-")[2]) for m, r in state.requests if m == "GET" and r)

    await moov_read(running, source, moov_size)
    mdat = MOOV + moov_size
    await seek_read(running, source, mdat, 16)
    await asyncio.sleep(0.05)
    assert last_asked() == BS - 1, state.requests
    reach = CACHE["readahead_max_blocks"]  # past the media's first block, 0
    assert isinstance(reach, int) and reach > store.reads.startup_blocks
    conn = await Connection.open("127.0.0.1", running.server.port, [])
    exchange = await conn.request("GET", source, f"bytes={mdat + 8}-")
    assert len(await conn.read(exchange, 1000)) == 1000
    await within(lambda: last_asked() >= (reach + 1) * BS - 1, seconds=1)
    conn.drop()
    await settled(store)
    elsewhere = 512 * BS + 100  # well past what the media reader's socket buffers took
    assert last_asked() < elsewhere
    await seek_read(running, source, elsewhere, 16)
    await asyncio.sleep(0.1)
    block_end = (elsewhere // BS + 1) * BS - 1
    assert state.requests[-1] == ("GET", f"bytes={elsewhere}-{block_end}")  # a probe alone
