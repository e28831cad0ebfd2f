"""The block cache never serves a wrong byte: eviction pressure, overwrites, coalescing,
read-ahead, failed fetches and the disk tier, against the emulator and a scriptable
origin."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import socket
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from s3proxy.config import Config
from s3proxy.store.blocks import BlockKey

from .conftest import Emulator, RunningProxy, StartProxy, make_config, make_token, put_object
from .origin import OriginState, pattern
from .test_http import fetch, parse_multipart
from .test_upstream import start_with_origin

TOKEN = make_token("**", ttl=3600)
KIB = 1024
MIB = 1024 * KIB


def url(running: RunningProxy, asset: str) -> str:
    return running.url(f"/t/{TOKEN}/{asset}")


def gets_for(emulator: Emulator, bucket: str, key: str) -> int:
    return sum(
        1
        for r in emulator.requests_for(bucket)
        if r.method == "GET" and r.path == f"/{bucket}/{key}"
    )


async def concurrent_reads(
    running: RunningProxy, asset: str, header: str, clients: int, amount: int | None = None
) -> list[bytes]:
    """`clients` GETs of `asset` with one Range header at once, each reading `amount`
    bytes (None: the whole body)."""
    async with aiohttp.ClientSession() as session:

        async def one() -> bytes:
            async with session.get(url(running, asset), headers={"Range": header}) as response:
                assert response.status == 206
                if amount is None:
                    return await response.read()
                return await response.content.readexactly(amount)

        return await asyncio.gather(*(one() for _ in range(clients)))


async def wait_cached(running: RunningProxy, nbytes: int) -> None:
    """Until the memory tier holds `nbytes` (a fetch finishes in the background), or 2 s."""
    for _ in range(100):
        if running.metric("s3proxy_cache_bytes", tier="memory") == nbytes:
            return
        await asyncio.sleep(0.02)


async def test_random_ranges_under_eviction_pressure_match_byte_for_byte(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    data = random.Random(1).randbytes(600 * KIB + 7)
    put_object(emulator, bucket, "pressure.bin", data)
    running = await start_proxy(
        cache={"block_size": "16KiB", "max_bytes": "64KiB", "readahead_blocks": 2}
    )
    rng = random.Random(42)
    limit = asyncio.Semaphore(16)
    peak = 0.0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal peak
        start = rng.randrange(len(data))
        end = min(len(data) - 1, start + rng.randrange(1, 80 * KIB))
        header = rng.choice(
            [f"bytes={start}-{end}", f"bytes={start}-", f"bytes=-{end - start + 1}"]
        )
        async with (
            limit,
            session.get(url(running, "pressure.bin"), headers={"Range": header}) as response,
        ):
            body = await response.read()
        first, _, last = header[6:].partition("-")
        if first == "":
            expected = data[-int(last) :]
        else:
            expected = data[int(first) : int(last) + 1] if last else data[int(first) :]
        assert response.status == 206
        assert body == expected, header
        peak = max(peak, running.metric("s3proxy_cache_bytes", tier="memory"))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session) for _ in range(300)))
    assert running.metric("s3proxy_cache_evictions_total", tier="memory") > 0
    assert 0 < peak <= running.metric("s3proxy_cache_max_bytes", tier="memory") == 64 * KIB


async def test_fifty_cold_requests_for_one_block_make_one_get(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    data = os.urandom(3 << 20)
    put_object(emulator, bucket, "hot.mp4", data)
    running = await start_proxy(cache={"readahead_blocks": 0})
    bodies = await concurrent_reads(running, "hot.mp4", "bytes=1048576-1049599", 50)
    assert all(body == data[1 << 20 : (1 << 20) + 1024] for body in bodies)
    assert gets_for(emulator, bucket, "hot.mp4") == 1
    heads = [
        r
        for r in emulator.object_requests(bucket)
        if r.method == "HEAD" and r.path == f"/{bucket}/hot.mp4"
    ]
    assert heads == [], "the metadata came with that one GET"
    # all 50 joined the GET that the first look-up started while learning the metadata
    assert running.metric("s3proxy_coalesced_waits_total") == 50
    # they got all they asked for and left: the GET went on to the block's end, for the
    # cache, and the rest of the block is a hit
    await wait_cached(running, 1 << 20)
    status, _, body = await fetch(url(running, "hot.mp4"), Range="bytes=2000000-2000999")
    assert (status, body) == (206, data[2_000_000:2_001_000])
    assert gets_for(emulator, bucket, "hot.mp4") == 1


async def test_many_cold_open_ended_reads_share_one_probe_and_one_block_fetch(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    data = os.urandom(3 << 20)
    put_object(emulator, bucket, "start.mp4", data)
    running = await start_proxy(cache={"readahead_blocks": 0})
    # Mist at stream start: `bytes=0-`, then a box header
    bodies = await concurrent_reads(running, "start.mp4", "bytes=0-", 30, 200_000)
    assert all(body == data[:200_000] for body in bodies)
    assert gets_for(emulator, bucket, "start.mp4") <= 3  # a probe, block 0, block 1


async def test_a_waiter_hanging_up_does_not_cancel_the_fetch_for_the_others(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=8 << 20, chunk_delay_s=0.01)  # 1 MiB takes ~160 ms
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 0}
    )
    reader, writer = await asyncio.open_connection(running.server.host, running.server.port)
    writer.write(
        f"GET /t/{TOKEN}/a.mp4 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1048575\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    async with aiohttp.ClientSession() as session:
        async with session.get(
            url(running, "a.mp4"), headers={"Range": "bytes=0-1048575"}
        ) as response:
            writer.transport.abort()  # the first reader leaves
            body = await response.read()
    assert body == pattern(0, 1 << 20)
    assert state.gets == 1 and state.hangups == 0


async def test_a_reader_arriving_as_the_last_one_leaves_gets_a_fetch_of_its_own(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """The last reader of a fetch leaves (its cancellation is under way) and, in the same
    turn of the event loop, another asks for that block: it must not join the dying
    fetch and be cut short."""
    state = OriginState(size=8 << 20, chunk_delay_s=0.01)
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 0}
    )
    store = running.proxy.store
    meta = await store.stat("a.mp4")
    leaving = store.open(meta, 0, (1 << 20) - 1)
    await anext(leaving)
    await leaving.aclose()  # cancels the GET; nothing awaited since, so it is not gone yet
    got = bytearray()
    async with aclosing(store.open(meta, 0, (1 << 20) - 1)) as chunks:
        async for chunk in chunks:
            got += chunk
    assert bytes(got) == pattern(0, 1 << 20)


async def test_a_failed_fetch_fails_its_waiters_and_caches_nothing(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=4 << 20, behaviour="get_error_500")
    running = await start_with_origin(aiohttp_server, start_proxy, state)
    results = await asyncio.gather(
        *(fetch(url(running, "a.mp4"), Range="bytes=0-99") for _ in range(10))
    )
    assert all(status == 502 and body == b"" for status, _, body in results)
    assert running.metric("s3proxy_cache_bytes", tier="memory") == 0
    state.behaviour = "ok"
    status, _, body = await fetch(url(running, "a.mp4"), Range="bytes=0-99")
    assert (status, body) == (206, pattern(0, 100))


async def test_overwrites_never_mix_versions(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    size = 256 * KIB
    versions = [bytes([v]) * 16 + random.Random(v).randbytes(size - 16) for v in range(4)]
    put_object(emulator, bucket, "live.mp4", versions[0])
    running = await start_proxy(
        cache={
            "block_size": "16KiB",
            "max_bytes": "1MiB",
            "metadata_ttl_s": 0,
            "readahead_blocks": 2,
        }
    )
    rng = random.Random(7)
    outcomes = {"whole": 0, "cut": 0}

    async def reader(session: aiohttp.ClientSession) -> None:
        for _ in range(25):
            start = rng.randrange(0, size // 2)
            end = start + rng.randrange(32 * KIB, size // 2)
            try:
                async with session.get(
                    url(running, "live.mp4"), headers={"Range": f"bytes={start}-{end}"}
                ) as response:
                    body = await response.read()
            except aiohttp.ClientPayloadError:
                outcomes["cut"] += 1  # changed mid-body: the connection was closed
                continue
            assert response.status == 206
            matches = [v for v in versions if v[start : end + 1] == body]
            assert len(matches) == 1, "a response is wholly one version"
            outcomes["whole"] += 1

    async def writer() -> None:
        for version in versions[1:]:
            await asyncio.sleep(0.15)
            await asyncio.to_thread(put_object, emulator, bucket, "live.mp4", version)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(writer(), *(reader(session) for _ in range(6)))
    assert outcomes["whole"] > 100
    status, _, body = await fetch(url(running, "live.mp4"))
    assert (status, body) == (200, versions[-1]), "later reads see the new version"


async def test_a_new_etag_from_head_drops_the_old_blocks(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "v.mp4", b"a" * 100_000)
    running = await start_proxy(cache={"metadata_ttl_s": 0})
    assert (await fetch(url(running, "v.mp4")))[2] == b"a" * 100_000
    assert running.metric("s3proxy_cache_bytes", tier="memory") == 100_000
    put_object(emulator, bucket, "v.mp4", b"b" * 50_000)
    assert (await fetch(url(running, "v.mp4")))[2] == b"b" * 50_000
    assert running.metric("s3proxy_cache_bytes", tier="memory") == 50_000


async def test_sequential_reader_gets_read_ahead_and_then_hits(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    data = os.urandom(8 * 64 * KIB)
    put_object(emulator, bucket, "seq.mp4", data)
    running = await start_proxy(cache={"block_size": "64KiB", "readahead_blocks": 2})
    async with aiohttp.ClientSession() as session:  # one player, one connection
        for index in range(8):
            start = index * 64 * KIB
            async with session.get(
                url(running, "seq.mp4"), headers={"Range": f"bytes={start}-{start + 64 * KIB - 1}"}
            ) as response:
                assert (response.status, await response.read()) == (
                    206,
                    data[start : start + 64 * KIB],
                )
            await asyncio.sleep(0.05)  # let the read-ahead land
    assert running.metric("s3proxy_readahead_blocks_total") >= 6
    # blocks 2..7 were fetched ahead of the reader: its own requests found them in memory
    # (block 0 too, when its GET finished before the first request read it)
    assert running.metric("s3proxy_cache_hits_total", tier="memory") >= 6
    assert gets_for(emulator, bucket, "seq.mp4") <= 8


async def seek(running: RunningProxy, offset: int, amount: int, asset: str = "a.mp4") -> bytes:
    """Mist at a seek: `bytes=N-` on a new connection, `amount` bytes read, hang up."""
    reader, writer = await asyncio.open_connection(running.server.host, running.server.port)
    try:
        writer.write(
            f"GET /t/{TOKEN}/{asset} HTTP/1.1\r\nHost: x\r\nRange: bytes={offset}-\r\n\r\n".encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 206"), head
        return await reader.readexactly(amount)
    finally:
        writer.transport.abort()


async def test_a_cold_seek_that_reads_a_box_header_costs_only_its_probe(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """The proxy streams a small probe first; the block would follow only if the client
    were still there after the seek grace, and Mist hangs up at once. The object's first
    block is the exception: fetched whole and kept, since every start comes back to it."""
    state = OriginState(size=1 << 30, chunk_delay_s=0.01)  # an origin some way off
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 2}
    )
    running.proxy.store.seek_grace_s = 0.5  # the hang-up must win even on a loaded machine
    mib = 1 << 20
    # mid-block, 20 KiB before a block's end (the probe takes the rest of it: nothing
    # may follow into the next block), and the start
    for offset in (5_000_000, 123 * mib - 20 * KIB, 0):
        assert await seek(running, offset, 16) == pattern(offset, 16)
        await asyncio.sleep(0.05)
    await wait_cached(running, mib)  # block 0, though its client left at once
    await asyncio.sleep(0.3)
    assert state.gets == 3, state.requests
    assert state.bytes_sent <= (64 + 20) * KIB + mib, state.bytes_sent
    assert running.metric("s3proxy_cache_bytes", tier="memory") == mib
    # logged with the status that went out, as nginx does (499 only before any)
    assert running.metric("s3proxy_requests_total", method="GET", status="206") == 3
    gets = state.gets
    assert await seek(running, 32, 16) == pattern(32, 16)  # the index, right after: a hit
    assert state.gets == gets


async def test_a_second_seek_to_a_probed_block_caches_it(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=64 << 20, chunk_delay_s=0.01)  # 1 MiB takes ~160 ms
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 2}
    )
    running.proxy.store.seek_grace_s = 0.5
    offset = 9_500_000  # in block 9
    assert await seek(running, offset, 16) == pattern(offset, 16)  # a probe
    # the second seek fetches block 9, which is finished and cached though its client left
    assert await seek(running, offset + 4096, 16) == pattern(offset + 4096, 16)
    await wait_cached(running, 1 << 20)
    assert running.metric("s3proxy_cache_bytes", tier="memory") == 1 << 20
    gets = state.gets
    assert await seek(running, offset - 50_000, 4096) == pattern(offset - 50_000, 4096)
    await asyncio.sleep(0.6)  # past the grace: the client left long before
    assert state.gets == gets, "the third seek was a hit, and fetched nothing more"
    assert running.metric("s3proxy_readahead_blocks_total") == 0


async def test_cold_seeks_that_keep_reading_stream_on_across_blocks(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=16 << 20, chunk_delay_s=0.002)
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 2}
    )
    size = 3 << 20
    # just before a block's end (the probe takes the rest of it), mid-block, and two at
    # once (one probes, the other fetches the block; then both share what follows)
    for offsets in ((3 * (1 << 20) - 1000,), (7_654_321,), (12_345_678, 12_345_678 + 10)):
        bodies = await asyncio.gather(*(seek(running, offset, size) for offset in offsets))
        for offset, body in zip(offsets, bodies, strict=True):
            assert body == pattern(offset, size), offset


def one_block_in_memory(root: Path, disk_bytes: str) -> dict[str, Any]:
    """64 KiB blocks, memory for one of them and no read-ahead: every block a read
    passes goes to the disk tier at `root` when the next one arrives."""
    return {
        "block_size": "64KiB",
        "max_bytes": "64KiB",
        "readahead_blocks": 0,
        "disk": {"path": str(root), "max_bytes": disk_bytes},
    }


async def spill_to_disk(
    start_proxy: StartProxy, config: Config, asset: str, data: bytes, root: Path
) -> list[Path]:
    """Read `asset` whole through a new proxy; the block files its evictions wrote."""
    first = await start_proxy(config)
    assert (await fetch(url(first, asset)))[2] == data
    await asyncio.sleep(0.3)  # evicted blocks are written in the background
    files = sorted(root.rglob("*.blk"))
    assert len(files) == len(data) // (64 * KIB) - 1, "all but the block still in memory"
    return files


async def test_disk_tier_survives_restart_and_discards_damaged_blocks(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    data = os.urandom(6 * 64 * KIB)
    put_object(emulator, bucket, "d.mp4", data)
    config = make_config(
        emulator.endpoint_url, bucket, cache=one_block_in_memory(tmp_path / "blocks", "1MiB")
    )
    files = await spill_to_disk(start_proxy, config, "d.mp4", data, tmp_path / "blocks")
    gets_before = gets_for(emulator, bucket, "d.mp4")

    second = await start_proxy(config)  # a restart: a new process would see the same
    assert (await fetch(url(second, "d.mp4")))[2] == data
    assert second.metric("s3proxy_cache_hits_total", tier="disk") == 5
    assert gets_for(emulator, bucket, "d.mp4") == gets_before + 1  # only the memory block

    raw = bytearray(files[0].read_bytes())
    raw[100] ^= 0xFF
    files[0].write_bytes(bytes(raw))  # corrupted
    files[1].write_bytes(files[1].read_bytes()[:1000])  # truncated
    third = await start_proxy(config)
    assert (await fetch(url(third, "d.mp4")))[2] == data, "damaged blocks are refetched"
    assert third.metric("s3proxy_cache_corrupt_blocks_total", tier="disk") == 2


async def test_disk_tier_keeps_block_files_of_the_earlier_crc32_format(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """An upgrade keeps its hits: files with the earlier header (magic S3PB, CRC-32,
    length) are read and checked as before, never counted corrupt; a damaged one is."""
    data = os.urandom(6 * 64 * KIB)
    put_object(emulator, bucket, "old.mp4", data)
    config = make_config(
        emulator.endpoint_url, bucket, cache=one_block_in_memory(tmp_path / "blocks", "1MiB")
    )
    files = await spill_to_disk(start_proxy, config, "old.mp4", data, tmp_path / "blocks")
    for path in files:  # rewritten as the earlier format spelled them
        block = path.read_bytes()[20:]
        path.write_bytes(struct.pack(">4sIQ", b"S3PB", zlib.crc32(block), len(block)) + block)
    raw = bytearray(files[0].read_bytes())
    raw[100] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    gets_before = gets_for(emulator, bucket, "old.mp4")

    second = await start_proxy(config)
    assert (await fetch(url(second, "old.mp4")))[2] == data
    assert second.metric("s3proxy_cache_hits_total", tier="disk") == 4
    assert second.metric("s3proxy_cache_corrupt_blocks_total", tier="disk") == 1
    assert gets_for(emulator, bucket, "old.mp4") == gets_before + 2  # memory's, the damaged


async def test_a_file_tier_that_can_not_write_counts_the_blocks_and_logs_within_a_budget(
    emulator: Emulator,
    bucket: str,
    start_proxy: StartProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tier whose every write fails (its file system full, say) serves on from S3,
    counts each block it could not write, and logs a warning a second, not one a block."""
    data = os.urandom(24 * 64 * KIB)
    put_object(emulator, bucket, "full.mp4", data)
    root = tmp_path / "blocks"
    cache = one_block_in_memory(root, "4MiB")
    running = await start_proxy(make_config(emulator.endpoint_url, bucket, cache=cache))
    shutil.rmtree(root / "w0")
    (root / "w0").write_bytes(b"")  # no directory can be made in it: every write fails
    caplog.set_level(logging.WARNING, logger="s3proxy.disk")
    for start in range(0, len(data), 64 * KIB):  # a block a request: 23 evictions
        ranged = f"bytes={start}-{start + 64 * KIB - 1}"
        assert (await fetch(url(running, "full.mp4"), Range=ranged))[2] == (
            data[start : start + 64 * KIB]
        )
    for _ in range(100):  # evicted blocks are written in the background
        if running.metric("s3proxy_cache_disk_writes_dropped_total") >= 23:
            break
        await asyncio.sleep(0.05)
    assert running.metric("s3proxy_cache_disk_writes_dropped_total") == 23
    warnings = [r for r in caplog.records if r.getMessage() == "cache tier write failed"]
    assert 1 <= len(warnings) <= 3, "a warning a second (the test takes about a second)"
    assert running.metric("s3proxy_cache_bytes", tier="disk") == 0


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A shared tier's directory on tmpfs, as `s3proxy serve` makes one for its workers."""
    path = tempfile.mkdtemp(prefix="s3proxy-test-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def fetched_by_a_peer(
    start_proxy: StartProxy,
    emulator: Emulator,
    bucket: str,
    shared_dir: str,
    asset: str,
    data: bytes,
    cache: dict[str, Any],
) -> RunningProxy:
    """Worker 1 of a group of 2 sharing `shared_dir`, once worker 0 has read `asset`
    (holding `data`) whole, so its blocks are in worker 0's shared files."""
    put_object(emulator, bucket, asset, data)
    config = make_config(emulator.endpoint_url, bucket, cache=cache)
    first = await start_proxy(config, group=(0, 2, shared_dir))
    second = await start_proxy(config, group=(1, 2, shared_dir))
    assert (await fetch(url(first, asset)))[2] == data
    return second


async def test_a_peer_block_read_whole_is_sent_from_its_shared_file_and_checked(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, shared_dir: str
) -> None:
    """Worker 1 of 2 sends blocks worker 0 fetched from their files in shared memory
    (`sendfile`), not copying them into its own memory; a block asked for again, or in
    part, is read and kept there (the fast lane answers it next time). Every file is
    checked: a damaged or cut one is counted and fetched again."""
    data = os.urandom(6 * 64 * KIB)
    cache = {"block_size": "64KiB", "max_bytes": "2MiB", "readahead_blocks": 0}
    second = await fetched_by_a_peer(
        start_proxy, emulator, bucket, shared_dir, "s.mp4", data, cache
    )
    gets = gets_for(emulator, bucket, "s.mp4")

    status, headers, body = await fetch(url(second, "s.mp4"), Range="bytes=0-65535,131072-196607")
    assert status == 206
    assert parse_multipart(headers["Content-Type"], body) == [
        (f"bytes 0-65535/{len(data)}", data[: 64 * KIB]),
        (f"bytes 131072-196607/{len(data)}", data[2 * 64 * KIB : 3 * 64 * KIB]),
    ]
    assert second.metric("s3proxy_cache_hits_total", tier="shared") == 2
    assert second.metric("s3proxy_cache_bytes", tier="memory") == 0, "sent from the files"
    four = await fetch(url(second, "s.mp4"), Range=f"bytes=0-{4 * 64 * KIB - 1}")
    assert four[2] == data[: 4 * 64 * KIB]
    assert second.metric("s3proxy_cache_bytes", tier="memory") == 2 * 64 * KIB, "asked again"
    part = await fetch(url(second, "s.mp4"), Range=f"bytes={64 * KIB + 100}-{64 * KIB + 199}")
    assert (part[0], part[2]) == (206, data[64 * KIB + 100 : 64 * KIB + 200])
    assert second.metric("s3proxy_cache_bytes", tier="memory") == 3 * 64 * KIB, "in part"
    assert gets_for(emulator, bucket, "s.mp4") == gets

    files = sorted(Path(shared_dir, "w0").rglob("*.blk"), key=lambda f: int(f.stem))
    raw = bytearray(files[4].read_bytes())
    raw[5000] ^= 0xFF
    files[4].write_bytes(bytes(raw))  # damaged
    files[5].write_bytes(files[5].read_bytes()[:1000])  # cut short
    rest = await fetch(url(second, "s.mp4"), Range=f"bytes={4 * 64 * KIB}-")
    assert rest[2] == data[4 * 64 * KIB :], "damaged blocks are fetched again"
    assert second.metric("s3proxy_cache_corrupt_blocks_total", tier="shared") == 2
    assert gets_for(emulator, bucket, "s.mp4") == gets + 2


async def test_a_read_looks_up_each_block_of_a_peer_once_not_once_a_block_served(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, shared_dir: str
) -> None:
    """The read plan asks after every block of its window each time it serves one; a
    block a peer's shared-memory files hold is a stat there, made once per read."""
    data = os.urandom(32 * 64 * KIB)
    cache = {"block_size": "64KiB", "max_bytes": "16MiB"}
    second = await fetched_by_a_peer(
        start_proxy, emulator, bucket, shared_dir, "p.mp4", data, cache
    )
    files = second.proxy.store.tiers.files
    assert files is not None
    looked_up: list[int] = []
    peer_holds = files.peer_holds

    def counted(key: BlockKey) -> bool:
        looked_up.append(key.block)
        return peer_holds(key)

    files.peer_holds = counted  # type: ignore[method-assign]
    assert (await fetch(url(second, "p.mp4"), Range="bytes=0-"))[2] == data
    assert second.metric("s3proxy_cache_hits_total", tier="shared") == 32
    assert len(looked_up) == len(set(looked_up)) <= 32


async def test_a_client_hanging_up_during_a_sendfile_leaves_no_file_open(
    emulator: Emulator,
    bucket: str,
    start_proxy: StartProxy,
    shared_dir: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The access line counts what went out before the hang-up; the block file is
    closed, and the worker serves on."""
    data = os.urandom(16 * MIB)
    cache = {"block_size": "1MiB", "max_bytes": "64MiB", "readahead_blocks": 0}
    second = await fetched_by_a_peer(
        start_proxy, emulator, bucket, shared_dir, "h.mp4", data, cache
    )
    caplog.set_level(logging.INFO, logger="s3proxy.access")

    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)  # the body waits
    client.connect((second.server.host, second.server.port))
    reader, writer = await asyncio.open_connection(sock=client)
    writer.write(f"GET /t/{TOKEN}/h.mp4 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readexactly(64 * KIB)
    writer.transport.abort()
    for _ in range(100):
        lines = [
            r.fields  # type: ignore[attr-defined]
            for r in caplog.records
            if r.name == "s3proxy.access" and r.fields["worker"] == 1  # type: ignore[attr-defined]
        ]
        if lines:
            break
        await asyncio.sleep(0.05)
    (line,) = lines
    assert line["status"] == 200 and 0 < line["bytes"] < len(data)
    open_files = [os.readlink(f) for f in Path("/proc/self/fd").iterdir() if f.exists()]
    assert not [f for f in open_files if f.startswith(shared_dir)]
    assert (await fetch(url(second, "h.mp4"), Range="bytes=-10"))[2] == data[-10:]


async def test_disk_tier_stays_within_its_bound(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    data = os.urandom(20 * 16 * KIB)
    put_object(emulator, bucket, "b.mp4", data)
    running = await start_proxy(
        cache={
            "block_size": "16KiB",
            "max_bytes": "32KiB",
            "readahead_blocks": 0,
            "disk": {"path": str(tmp_path / "blocks"), "max_bytes": "100KiB"},
        }
    )
    assert (await fetch(url(running, "b.mp4")))[2] == data
    await asyncio.sleep(0.3)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "blocks").rglob("*.blk"))
    assert 0 < on_disk <= 100 * KIB
    assert running.metric("s3proxy_cache_bytes", tier="disk") == on_disk
    assert running.metric("s3proxy_cache_evictions_total", tier="disk") > 0
    assert (await fetch(url(running, "b.mp4")))[2] == data
