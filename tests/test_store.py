"""The store: right bytes whatever the origin does, one GET per block, revalidation
instead of re-downloads, and the file tiers (disk, restart)."""

from __future__ import annotations

import asyncio
import os
import random
from contextlib import aclosing
from pathlib import Path
from typing import Any

import aiohttp

from s3proxy.metrics import Metrics
from s3proxy.store.blocks import BlockKey
from s3proxy.store.disk import FileTier
from s3proxy.store.tiers import MAX_PENDING_WRITES, Tiers
from s3proxy.upstream import ObjectMeta

from .conftest import Emulator, RunningProxy, StartProxy, make_config, make_token, put_object
from .origin import OriginState, etag_of, pattern
from .test_cache import gets_for, seek, url, wait_cached
from .test_http import fetch
from .test_upstream import start_with_origin

TOKEN = make_token("**", ttl=3600)
KIB = 1024
MIB = 1 << 20


def outcome(running: RunningProxy, op: str, result: str) -> float:
    return running.metric("s3proxy_upstream_requests_total", op=op, outcome=result)


async def read_body(running: RunningProxy, asset: str, header: str) -> tuple[int, bytes, bool]:
    """Status, the bytes received, and whether the body came whole."""
    received = bytearray()
    async with aiohttp.ClientSession() as session:
        async with session.get(url(running, asset), headers={"Range": header}) as response:
            try:
                async for chunk in response.content.iter_any():
                    received += chunk
            except aiohttp.ClientPayloadError:
                return response.status, bytes(received), False
            return response.status, bytes(received), True


# --- version changes ------------------------------------------------------------


async def test_the_first_seek_after_an_overwrite_within_the_ttl_gets_the_new_version(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """The metadata is still fresh when the object is replaced: the seek's probe gets
    412, the old version goes, and the seek is served from the new one (no 502)."""
    state = OriginState(size=8 * MIB)
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"metadata_ttl_s": 30}
    )
    status, _, _ = await fetch(url(running, "a.mp4"), "HEAD")  # Mist's HEAD
    assert status == 200
    state.overwrite()
    offset = 5 * MIB + 1000
    body = await seek(running, offset, 4096)  # an open-ended read of a cold block
    assert body == pattern(offset, 4096, version=1)
    assert outcome(running, "get", "changed") == 1
    # later reads see the new version too, and its validator
    status, headers, body = await fetch(url(running, "a.mp4"), Range="bytes=0-99")
    assert (status, headers["ETag"], body) == (206, etag_of(1), pattern(0, 100, version=1))


async def test_an_origin_that_ignores_if_match_never_mixes_versions(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """Overwritten at the same size between two GETs of one response, by an origin that
    ignores If-Match: the second answer names another ETag and is discarded; the client
    gets a short body of the old version, never the new bytes under the old ETag, and
    nothing of it is cached."""
    state = OriginState(size=3 * MIB, honours_if_match=False)
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 0}
    )
    status, _, _ = await fetch(url(running, "a.mp4"), Range="bytes=0-99")  # block 0 cached
    assert status == 206
    state.overwrite()
    status, body, whole = await read_body(running, "a.mp4", f"bytes=0-{3 * MIB - 1}")
    assert status == 206 and not whole
    assert body == pattern(0, len(body)), "only version 0's bytes, cut short"
    assert outcome(running, "get", "invalid") == 1
    # a fresh read: all of version 1, none of version 0's cached block
    status, headers, body = await fetch(url(running, "a.mp4"), Range=f"bytes=0-{3 * MIB - 1}")
    assert (status, headers["ETag"]) == (206, etag_of(1))
    assert body == pattern(0, 3 * MIB, version=1)


async def test_answers_that_are_not_what_was_asked_are_discarded_and_counted(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """A 200 with the whole object, a shifted range, a short Content-Length: never
    served nor cached; the read starts over from fresh metadata (no byte went out)."""
    state = OriginState(size=4 * MIB)
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 0}
    )
    await fetch(url(running, "a.mp4"), "HEAD")
    for number, fault in enumerate(("whole_200", "shifted", "short_length"), start=1):
        state.faults = [fault]
        offset = number * MIB + 12345
        status, _, body = await fetch(
            url(running, "a.mp4"), Range=f"bytes={offset}-{offset + 9999}"
        )
        assert (status, body) == (206, pattern(offset, 10_000)), fault
        assert outcome(running, "get", "invalid") == number, fault
    # and the blocks cached are the right ones
    for number in (1, 2, 3):
        status, _, body = await fetch(
            url(running, "a.mp4"), Range=f"bytes={number * MIB}-{number * MIB + 99}"
        )
        assert (status, body) == (206, pattern(number * MIB, 100))


async def test_a_cold_read_whose_answer_is_a_200_falls_back_to_a_head(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=2 * MIB, faults=["whole_200"])
    running = await start_with_origin(aiohttp_server, start_proxy, state)
    status, _, body = await fetch(url(running, "a.mp4"), Range="bytes=100-199")
    assert (status, body) == (206, pattern(100, 100))
    assert outcome(running, "get", "invalid") == 1
    assert state.gets == 2, "the discarded GET, then the block's after a HEAD"


async def test_a_short_body_is_an_error_never_cached(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=2 * MIB, faults=["short_body"])
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 0}
    )
    status, body, whole = await read_body(running, "a.mp4", f"bytes=0-{MIB - 1}")
    assert status == 206 and not whole and body == pattern(0, len(body))
    assert outcome(running, "get", "error") == 1
    assert outcome(running, "get", "ok") == 0
    assert running.metric("s3proxy_cache_bytes", tier="memory") == 0
    status, _, body = await fetch(url(running, "a.mp4"), Range=f"bytes=0-{MIB - 1}")
    assert (status, body) == (206, pattern(0, MIB))


async def test_overwrites_while_mist_like_readers_seek_give_whole_versions_and_no_5xx(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=16 * MIB, chunk_delay_s=0.001)
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"metadata_ttl_s": 30}
    )
    running.proxy.store.seek_grace_s = 0.001
    rng = random.Random(5)
    results: list[tuple[int, bytes]] = []
    writing = True

    async def viewer() -> None:
        for _ in range(400):  # until the writer is done
            offset = rng.randrange(state.size - 300_000)
            amount = rng.choice([16, 4096, 200_000])
            try:
                body = await seek(running, offset, amount)  # asserts a 206
            except asyncio.IncompleteReadError as cut:  # changed mid-body: cut short
                body = cut.partial
            results.append((offset, body))
            if not writing:
                return

    async def writer() -> None:
        nonlocal writing
        for _ in range(6):
            await asyncio.sleep(0.05)
            state.overwrite()
        await asyncio.sleep(0.05)
        writing = False

    await asyncio.gather(writer(), *(viewer() for _ in range(4)))
    for offset, body in results:
        versions = [v for v in range(state.version + 1) if pattern(offset, len(body), v) == body]
        assert versions, f"bytes at {offset} are of no version"
    assert running.metric("s3proxy_requests_total", method="GET", status="502") == 0


# --- revalidation ---------------------------------------------------------------


async def test_a_resident_asset_is_revalidated_once_per_ttl_never_downloaded_again(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    data = os.urandom(3 * MIB)
    put_object(emulator, bucket, "r.mp4", data)
    ttl = 0.3
    running = await start_proxy(cache={"metadata_ttl_s": ttl, "readahead_blocks": 0})
    assert (await fetch(url(running, "r.mp4")))[2] == data  # the first fill
    gets = gets_for(emulator, bucket, "r.mp4")
    upstream_bytes = running.metric("s3proxy_upstream_bytes_total")
    heads_before = len([r for r in emulator.object_requests(bucket) if r.method == "HEAD"])
    for _ in range(10):
        await asyncio.sleep(ttl + 0.05)  # expired
        for header in ("bytes=0-199", "bytes=2000000-", f"bytes=0-{3 * MIB - 1}"):
            status, _, body = await fetch(url(running, "r.mp4"), Range=header)
            start, _, end = header[6:].partition("-")
            assert (status, body) == (206, data[int(start) : int(end) + 1 if end else None])
        # conditional requests from the client cost no block either
        status, _, _ = await fetch(
            url(running, "r.mp4"), Range="bytes=0-9", **{"If-Range": '"other"'}
        )
        assert status == 200
    assert gets_for(emulator, bucket, "r.mp4") == gets, "no block downloaded again"
    assert running.metric("s3proxy_upstream_bytes_total") == upstream_bytes
    heads = [r for r in emulator.object_requests(bucket) if r.method == "HEAD"][heads_before:]
    assert 10 <= len(heads) <= 12, "one conditional request per TTL (a slow loop: 1-2 more)"
    assert all(r.headers.get("If-None-Match") for r in heads)
    assert outcome(running, "head", "not_modified") == len(heads)


async def test_a_new_version_found_by_revalidation_replaces_the_old_blocks(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "v.mp4", b"a" * 100_000)
    running = await start_proxy(cache={"metadata_ttl_s": 0.1})
    assert (await fetch(url(running, "v.mp4"), Range="bytes=0-9"))[2] == b"a" * 10
    put_object(emulator, bucket, "v.mp4", b"b" * 100_000)
    await asyncio.sleep(0.15)
    assert (await fetch(url(running, "v.mp4"), Range="bytes=0-9"))[2] == b"b" * 10
    await wait_cached(running, 100_000)
    assert running.metric("s3proxy_cache_bytes", tier="memory") == 100_000, "old block gone"


async def test_a_block_in_flight_is_joined_not_fetched_again_when_metadata_expires(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=4 * MIB, chunk_delay_s=0.01)  # 1 MiB takes ~160 ms
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"metadata_ttl_s": 0, "readahead_blocks": 0}
    )
    first = asyncio.ensure_future(fetch(url(running, "a.mp4"), Range="bytes=0-99"))
    await asyncio.sleep(0.05)  # its GET of block 0 is under way; the metadata expired
    second = await fetch(url(running, "a.mp4"), Range=f"bytes=500000-{MIB - 1}")
    assert second[0] == 206 and second[2] == pattern(500_000, MIB - 500_000)
    assert (await first)[2] == pattern(0, 100)
    assert state.gets == 1, state.requests


# --- the file tiers -------------------------------------------------------------


def disk_config(emulator: Emulator, bucket: str, tmp_path: Path, **cache: Any) -> Any:
    return make_config(
        emulator.endpoint_url,
        bucket,
        cache={
            "block_size": "64KiB",
            "max_bytes": "64KiB",
            "readahead_blocks": 0,
            "disk": {"path": str(tmp_path / "blocks"), "max_bytes": "4MiB"},
            **cache,
        },
    )


async def wait_files(tmp_path: Path, count: int) -> list[Path]:
    for _ in range(100):
        files = sorted((tmp_path / "blocks").rglob("*.blk"))
        if len(files) >= count:
            return files
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} block files")


async def test_after_a_restart_a_first_block_on_disk_is_revalidated_not_fetched(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    data = os.urandom(4 * 64 * KIB)
    put_object(emulator, bucket, "d.mp4", data)
    config = disk_config(emulator, bucket, tmp_path)
    first = await start_proxy(config)
    assert (await fetch(url(first, "d.mp4")))[2] == data
    await wait_files(tmp_path, 3)  # blocks 0-2 evicted to disk, block 3 in memory
    gets = gets_for(emulator, bucket, "d.mp4")
    second = await start_proxy(config)  # a restart: a new process would see the same
    status, _, body = await fetch(url(second, "d.mp4"), Range="bytes=0-99")
    assert (status, body) == (206, data[:100])
    assert gets_for(emulator, bucket, "d.mp4") == gets, "block 0 came from disk"
    assert second.metric("s3proxy_cache_hits_total", tier="disk") == 1
    assert outcome(second, "head", "not_modified") == 1


async def test_blocks_cut_at_another_block_size_are_never_served(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    data = os.urandom(8 * 64 * KIB)
    put_object(emulator, bucket, "s.mp4", data)
    first = await start_proxy(disk_config(emulator, bucket, tmp_path))
    assert (await fetch(url(first, "s.mp4")))[2] == data
    await wait_files(tmp_path, 7)
    second = await start_proxy(disk_config(emulator, bucket, tmp_path, block_size="128KiB"))
    for header in (f"bytes={128 * KIB}-{128 * KIB + 99}", f"bytes=0-{len(data) - 1}"):
        start, _, end = header[6:].partition("-")
        status, _, body = await fetch(url(second, "s.mp4"), Range=header)
        assert (status, body) == (206, data[int(start) : int(end) + 1]), header


async def test_an_origin_without_etags_is_refused_not_cached(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=MIB, send_etag=False)
    running = await start_with_origin(aiohttp_server, start_proxy, state)
    for header in ("bytes=0-99", "bytes=5000-"):
        status, headers, body = await fetch(url(running, "a.mp4"), Range=header)
        assert (status, body) == (502, b""), header
        assert "no ETag" in headers["X-S3Proxy-Error"]
    assert running.metric("s3proxy_cache_bytes", tier="memory") == 0


async def test_blocks_read_back_from_disk_are_not_written_again(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    data = os.urandom(5 * 64 * KIB)
    put_object(emulator, bucket, "w.mp4", data)
    running = await start_proxy(disk_config(emulator, bucket, tmp_path))
    assert (await fetch(url(running, "w.mp4")))[2] == data
    files = await wait_files(tmp_path, 4)
    inodes = {f: f.stat().st_ino for f in files}
    for _ in range(2):  # each read evicts the block read before it, which came from disk
        assert (await fetch(url(running, "w.mp4")))[2] == data
    await asyncio.sleep(0.2)
    assert {f: f.stat().st_ino for f in files} == inodes, "no file was rewritten"


async def test_file_writes_past_the_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    files = FileTier(str(tmp_path), 64 * MIB, metrics, bucket="b", block_size=4096, tier="disk")
    files.load_index()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    write = files.write

    def slow_write(*args: Any) -> None:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        write(*args)

    files.write = slow_write  # type: ignore[method-assign]
    tiers = Tiers(4096, files, metrics)
    meta = ObjectMeta("k", 100 * 4096, '"e"', __import__("datetime").datetime.now(), None)
    for index in range(MAX_PENDING_WRITES + 5):  # each put evicts the one before
        tiers.put(BlockKey("b", "k", '"e"', index), bytes(4096), meta)
    dropped = metrics.registry.get_sample_value("s3proxy_cache_disk_writes_dropped_total")
    assert dropped == 5 - 1  # the last block is still in memory
    release.set()
    await tiers.close()
    assert len(list(tmp_path.rglob("*.blk"))) == MAX_PENDING_WRITES


async def test_a_disk_miss_the_index_does_not_hold_costs_no_thread(tmp_path: Path) -> None:
    files = FileTier(str(tmp_path), MIB, Metrics(), bucket="b", block_size=4096, tier="disk")
    files.load_index()

    def never(_key: BlockKey) -> None:
        raise AssertionError("read the disk for a block its index does not hold")

    files.read = never  # type: ignore[assignment,method-assign]
    assert await files.get(BlockKey("b", "k", '"e"', 0)) is None


def test_a_worker_drops_only_its_own_files(tmp_path: Path) -> None:
    meta = ObjectMeta("k", 8192, '"e"', __import__("datetime").datetime.now(), None)
    tiers = [
        FileTier(
            str(tmp_path),
            MIB,
            Metrics(),
            bucket="b",
            block_size=4096,
            tier="disk",
            worker=w,
            workers=2,
        )
        for w in (0, 1)
    ]
    key = BlockKey("b", "k", '"e"', 0)
    for tier in tiers:
        tier.load_index()
        tier.write(key, b"x" * 4096, meta)
    tiers[0].drop_version(key.version)
    assert not tiers[0].contains(key) and tiers[0].read(key) == b"x" * 4096, "the peer's"
    assert tiers[1].contains(key) and (tiers[1].root / tiers[1].relative(key)).exists()


async def test_close_waits_for_the_fetches_and_look_ups_it_cancels(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=64 * MIB, chunk_delay_s=0.05)
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 4}
    )
    store = running.proxy.store
    meta = await store.stat("a.mp4")
    reader = store.open(meta, 0, 8 * MIB - 1)
    await anext(reader)
    fetches = store.fetches.fetches()
    assert fetches
    await store.close()
    assert all(f.task is not None and f.task.done() for f in fetches)
    await reader.aclose()


# --- sequential detection is per reader -----------------------------------------


async def test_another_viewers_reads_do_not_make_a_seek_look_sequential(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=64 * MIB, chunk_delay_s=0.002)
    running = await start_with_origin(
        aiohttp_server, start_proxy, state, cache={"readahead_blocks": 2}
    )
    running.proxy.store.seek_grace_s = 0.5
    # viewer A reads block 4 whole
    status, _, body = await fetch(url(running, "a.mp4"), Range=f"bytes={4 * MIB}-{5 * MIB - 1}")
    assert (status, body) == (206, pattern(4 * MIB, MIB))
    await asyncio.sleep(0.3)
    sent = state.bytes_sent
    # viewer B seeks into block 5 on its own connection: a cold seek, so a probe
    offset = 5 * MIB + 1000
    assert await seek(running, offset, 16) == pattern(offset, 16)
    await asyncio.sleep(0.6)
    assert state.requests[-1] == ("GET", f"bytes={offset}-{offset + 64 * KIB - 1}"), (
        "a probe, not a block"
    )
    assert state.bytes_sent - sent <= 64 * KIB
    assert running.metric("s3proxy_readahead_blocks_total") == 0


async def test_a_warm_up_is_read_through_the_same_checked_fetches(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    data = os.urandom(3 * MIB)
    put_object(emulator, bucket, "warm.mp4", data)
    running = await start_proxy(cache={"warm_bytes": "2MiB"})
    async with aiohttp.ClientSession() as session:
        async with session.post(running.admin_url("/warm/warm.mp4")) as response:
            assert response.status == 200
    store = running.proxy.store
    meta = await store.stat("warm.mp4")
    got = bytearray()
    async with aclosing(store.open(meta, 0, 2 * MIB - 1)) as chunks:
        async for chunk in chunks:
            got += chunk
    assert bytes(got) == data[: 2 * MIB]
    assert gets_for(emulator, bucket, "warm.mp4") == 2


async def test_a_block_that_lands_during_a_file_tier_look_up_is_not_fetched_again(
    tmp_path: Path,
) -> None:
    """The look-up went to the file tier (a thread) while the block's fetch finished:
    the block is in memory by then, and must be found there, not fetched a second time."""
    import datetime

    metrics = Metrics()
    files = FileTier(
        str(tmp_path), MIB, metrics, bucket="b", block_size=4096, tier="disk", worker=0, workers=2
    )
    files.load_index()
    tiers = Tiers(MIB, files, metrics, write_through=True)
    key = BlockKey("b", "k", '"e"', 0)
    meta = ObjectMeta("k", 4096, '"e"', datetime.datetime.now(datetime.UTC), None)

    async def slow_get(_key: BlockKey, _whole: bool = False, keep: bool = False) -> bytes | None:
        tiers.put(key, b"z" * 4096, meta)  # the fetch in flight completes meanwhile
        return None

    files.get = slow_get  # type: ignore[method-assign]
    data, source = await tiers.lookup(key)
    assert (data, source) == (b"z" * 4096, "memory")
    await tiers.close()


async def test_a_closed_range_to_the_last_byte_is_one_whole_block_get(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    """Only a range without a last byte (`bytes=N-`) is a reader that may hang up at once
    (probed first); one that names the object's last byte asked for those bytes."""
    data = os.urandom(2 * MIB)
    put_object(emulator, bucket, "tail.mp4", data)
    running = await start_proxy(cache={"readahead_blocks": 0})
    token = make_token()
    assert (await fetch(running.url(f"/t/{token}/tail.mp4"), "HEAD"))[0] == 200  # known size
    before = len(emulator.requests_for(bucket))
    status, _, body = await fetch(
        running.url(f"/t/{token}/tail.mp4"), Range=f"bytes={MIB}-{2 * MIB - 1}"
    )
    assert status == 206 and body == data[MIB:]
    gets = [
        r.headers.get("Range")
        for r in emulator.requests_for(bucket)[before:]
        if r.method == "GET" and r.path.endswith("/tail.mp4")
    ]
    assert gets == [f"bytes={MIB}-{2 * MIB - 1}"], gets


async def test_a_cold_start_asks_s3_once_for_the_asset_and_once_for_its_sidecar(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    """Mist's start: HEAD, then `bytes=0-`; HEAD of the `.dtsh`, then its GET. A cold
    HEAD learns the metadata from the first block's GET (Mist reads that block next), and
    the sidecar is looked up the same way beside the asset: one S3 request each."""
    data, header = os.urandom(3 * MIB), b"DTSC" + os.urandom(5000)
    put_object(emulator, bucket, "start/a.mp4", data)
    put_object(emulator, bucket, "start/a.mp4.dtsh", header)
    running = await start_proxy()
    running.proxy.store.seek_grace_s = 0.5  # the hang-up must win even on a loaded machine
    before = len(emulator.object_requests(bucket))
    source = running.url(f"/t/{TOKEN}/start/a.mp4")
    status, headers, _ = await fetch(source, "HEAD")
    assert (status, headers["Content-Length"]) == (200, str(len(data)))
    assert await seek(running, 0, 4096, asset="start/a.mp4") == data[:4096]
    status, headers, _ = await fetch(source + ".dtsh", "HEAD")
    assert (status, headers["Content-Length"]) == (200, str(len(header)))
    assert (await fetch(source + ".dtsh"))[2] == header
    asked = [(r.method, r.path.rsplit("/", 1)[-1]) for r in emulator.object_requests(bucket)]
    assert sorted(asked[before:]) == [("GET", "a.mp4"), ("GET", "a.mp4.dtsh")], asked[before:]
