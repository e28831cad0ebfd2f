"""The seam between the HTTP handlers and S3: object metadata and byte streams, served
from the block cache where possible.

Handlers only ever call `stat` and `open`. Behind them:
- metadata is cached for `cache.metadata_ttl_s` (missing objects too), and concurrent
  look-ups of one key share one HEAD;
- bytes come in aligned blocks keyed by (bucket, key, ETag, index): from memory, then the
  disk tier, else from one ranged GET per run of missing blocks (`RunFetch`), which every
  concurrent reader of those blocks shares and which streams to them as it arrives;
- a reader moving sequentially gets the next `cache.readahead_blocks` blocks fetched in
  the background (at most `cache.readahead_max_inflight` such fetches at once);
- a fetch whose last reader hung up is cancelled (unless it is read-ahead, or a second
  seek's block), so an open-ended range never pulls the rest of the object; one whose
  readers got all they asked for finishes its blocks for the cache;
- an open-ended read (Mist's, at every seek) of a cold block starts with a small probe
  streamed straight from S3, and goes further only if its client is still there a few
  milliseconds after its first bytes went out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_right
from collections.abc import AsyncGenerator, Coroutine
from contextlib import aclosing
from typing import Any

from cachetools import LRUCache, TTLCache

from .assets import object_key
from .cache import Block, BlockKey, MemoryTier, block_bounds, block_span
from .config import CacheConfig
from .disk import DiskTier
from .errors import AssetNotFound, ObjectChanged, S3ProxyError, UpstreamUnavailable
from .metrics import Metrics
from .upstream import ObjectMeta, S3Upstream

log = logging.getLogger("s3proxy.store")

Version = tuple[str, str, str]

# What a cold seek (an open-ended read, not sequential, of a block never probed) gets
# straight from S3, uncached, instead of its block: at most this much, and never past
# the block's end. Enough for Mist's box-header reads, little to waste when the client
# hangs up at once.
PROBE_BYTES = 64 * 1024
# An open-ended read sends no GET past its first block (or probe), read-ahead included,
# until this long after its first bytes went out. Mist hangs up right after reading a
# box header; the hang-up cancels the request, and it must land before a GET is sent:
# once a GET is on its way, S3 bills whatever it sends, however soon it is abandoned
# (kernel buffers take megabytes a client never reads, so "the client took the bytes"
# proves nothing). A client that does keep reading has those first bytes meanwhile.
SEEK_GRACE_S = 0.005
MAX_PENDING_DISK_WRITES = 16


class RunFetch:
    """One upstream GET for blocks first..last of one object version.

    Bytes are cut into blocks as they arrive; each finished block goes to the cache.
    Readers follow along through `read`, so the first bytes reach a client as soon as S3
    sends them: they get the chunks as S3 sent them until the block is whole, then slices
    of the block joined from them for the cache (no copy for readers, and no block to
    allocate before the first byte, which cost a cold read ~0.3 ms of page faults).
    """

    def __init__(self, store: ObjectStore, meta: ObjectMeta, first: int, last: int,
                 background: bool, keep: bool = False,
                 stream: AsyncGenerator[bytes, None] | None = None) -> None:
        self._store = store
        self._stream = stream  # a GET already under way (see ObjectStore._discover)
        self.meta = meta
        self.first, self.last = first, last
        self.background = background
        self.keep = background or keep  # finish and cache it even if every reader leaves
        size, bs = meta.size, store.block_size
        self.expected = {i: block_bounds(i, bs, size)[1] - i * bs + 1 for i in range(first, last + 1)}
        # per block: the pieces received so far and where each starts in the block
        self.parts: dict[int, list[memoryview]] = {i: [] for i in self.expected}
        self.starts: dict[int, list[int]] = {i: [] for i in self.expected}
        self.filled = dict.fromkeys(self.expected, 0)
        self.error: S3ProxyError | None = None
        self.done = False
        self.readers = 0
        self._progress = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def key(self, index: int) -> BlockKey:
        return BlockKey(self._store.bucket, self.meta.key, self.meta.etag, index)

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def run(self) -> None:
        bs = self._store.block_size
        start = self.first * bs
        end = block_bounds(self.last, bs, self.meta.size)[1]
        index = self.first
        try:
            stream = self._stream or self._store.upstream.read(
                self.meta.key, start, end, self.meta.etag)
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        filled = self.filled[index]
                        take = min(len(view), self.expected[index] - filled)
                        self.parts[index].append(view[:take])
                        self.starts[index].append(filled)
                        self.filled[index] = filled + take
                        view = view[take:]
                        if self.filled[index] == self.expected[index]:
                            block = b"".join(self.parts[index])
                            # readers go on from the block; the chunks can go
                            self.parts[index], self.starts[index] = [memoryview(block)], [0]
                            self._store._block_arrived(self.key(index), block)
                            index += 1
                    self._notify()
        except ObjectChanged as exc:
            self.error = exc
            self._store.version_changed(self.meta)
        except S3ProxyError as exc:
            self.error = exc
        except asyncio.CancelledError:
            self.error = UpstreamUnavailable("fetch abandoned")
            raise
        except Exception as exc:  # never leave readers waiting on a fetch that died
            log.exception("block fetch failed")
            self.error = UpstreamUnavailable(f"fetch failed ({type(exc).__name__})")
        finally:
            self.done = True
            self._store._fetch_finished(self)
            self._notify()

    def attach(self) -> None:
        self.readers += 1

    def detach(self, abandoned: bool = False) -> None:
        """A reader is done with this fetch. One that got all it asked for leaves the
        fetch to finish its blocks for the cache; when the last reader left early (its
        client hung up), the fetch stops pulling bytes nobody will read."""
        self.readers -= 1
        if self.readers == 0 and abandoned and not self.keep and not self.done and self.task:
            self.task.cancel()
            self._store._forget(self)  # nobody may join a fetch on its way out

    async def read(self, index: int, lo: int, hi: int) -> AsyncGenerator[bytes | memoryview, None]:
        """Bytes lo..hi (inclusive, block-relative) of block `index`, as they arrive."""
        offset = lo
        while offset <= hi:
            if self.filled[index] > offset:
                # the piece holding `offset` (bytes below `filled` are final: shared)
                at = bisect_right(self.starts[index], offset) - 1
                piece, first = self.parts[index][at], self.starts[index][at]
                stop = min(first + len(piece), hi + 1)
                yield piece[offset - first:stop - first]
                offset = stop
                continue
            if self.error is not None:
                raise type(self.error)(str(self.error))
            if self.done:
                raise UpstreamUnavailable("upstream body ended early")
            await self._progress.wait()


class ObjectStore:
    def __init__(self, upstream: S3Upstream, prefix: str, cache: CacheConfig,
                 metrics: Metrics, worker: int = 0, workers: int = 1) -> None:
        self.upstream = upstream
        self.bucket = upstream.bucket
        self._prefix = prefix
        self._config = cache
        self._metrics = metrics
        self.block_size = int(cache.block_size)
        self._meta: TTLCache[str, ObjectMeta | AssetNotFound] = TTLCache(
            maxsize=65536, ttl=cache.metadata_ttl_s)
        self._etags: LRUCache[str, str] = LRUCache(maxsize=65536)  # last ETag seen per key
        self._heads: dict[str, asyncio.Task[ObjectMeta]] = {}
        # With several workers each holds its share, so the bounds hold for the group.
        self.disk = (DiskTier(cache.disk.path, int(cache.disk.max_bytes) // workers, metrics,
                              worker, workers)
                     if cache.disk.path and cache.disk.max_bytes > 0 else None)
        self.memory = MemoryTier(int(cache.max_bytes) // workers, on_evict=self._evicted)
        self._fetches: dict[BlockKey, RunFetch] = {}
        self._probed: LRUCache[BlockKey, bool] = LRUCache(maxsize=65536)
        self.seek_grace_s = SEEK_GRACE_S
        self._disk_writes = 0
        self._readahead_inflight = 0
        self._last_read: LRUCache[Version, int] = LRUCache(maxsize=4096)
        self._background: set[asyncio.Task[None]] = set()
        metrics.cache_max_bytes.labels(tier="memory").set(self.memory.max_bytes)
        metrics.cache_max_bytes.labels(tier="disk").set(self.disk.max_bytes if self.disk else 0)

    async def start(self) -> None:
        if self.disk is not None:
            await asyncio.to_thread(self.disk.load_index)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for fetch in {id(f): f for f in self._fetches.values()}.values():
            if fetch.task is not None:
                fetch.task.cancel()

    # --- metadata ---------------------------------------------------------------

    async def stat(self, asset: str, first_block: int | None = None) -> ObjectMeta:
        """Size, ETag, Last-Modified and type of the asset's current version.

        `first_block`: the block a GET will start with. When the metadata is not known,
        that block's GET is sent at once and its answer supplies the metadata: one round
        trip to S3 instead of a HEAD and then a GET.
        """
        key = object_key(self._prefix, asset)
        cached = self._meta.get(key)
        if isinstance(cached, AssetNotFound):
            raise AssetNotFound(str(cached))
        if cached is not None:
            return cached
        task = self._heads.get(key)
        if task is None:  # the first asker does the look-up; the others wait for it
            task = asyncio.ensure_future(
                self._head(key) if first_block is None else self._discover(key, first_block))
            self._heads[key] = task
            task.add_done_callback(self._head_done)
        return await asyncio.shield(task)

    def _head_done(self, task: asyncio.Task[ObjectMeta]) -> None:
        for key, pending in list(self._heads.items()):
            if pending is task:
                del self._heads[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _head(self, key: str) -> ObjectMeta:
        try:
            meta = await self.upstream.head(key)
        except AssetNotFound as exc:
            self._meta[key] = exc
            raise
        self._remember(meta)
        return meta

    async def _discover(self, key: str, block: int) -> ObjectMeta:
        """Metadata from the GET of the block a request starts with; that GET becomes the
        block's fetch, which the request (and anyone else) then reads."""
        start = block * self.block_size
        try:
            found = await self.upstream.read_unseen(key, start, start + self.block_size - 1)
        except AssetNotFound as exc:
            self._meta[key] = exc
            raise
        if found is None:  # starts beyond the end: the HEAD says how big it is
            return await self._head(key)
        meta, stream = found
        self._remember(meta)
        last = min(block, (meta.size - 1) // self.block_size)
        fetch = RunFetch(self, meta, block, last, background=False, stream=stream)
        for index in range(block, last + 1):
            self._fetches[fetch.key(index)] = fetch
        fetch.task = asyncio.ensure_future(fetch.run())
        return meta

    def _remember(self, meta: ObjectMeta) -> None:
        previous = self._etags.get(meta.key)
        if previous is not None and previous != meta.etag:
            self._drop_version((self.bucket, meta.key, previous))
        self._etags[meta.key] = meta.etag
        self._meta[meta.key] = meta

    async def put_sidecar(self, asset: str, data: bytes) -> None:
        """Store a `.dtsh` sidecar (never anything else) and forget what was known of it."""
        key = object_key(self._prefix, asset)
        if not key.endswith(".dtsh"):
            raise ValueError("only .dtsh sidecars are ever written")
        await self.upstream.put(key, data, "application/octet-stream")
        self._meta.pop(key, None)
        previous = self._etags.pop(key, None)
        if previous is not None:
            self._drop_version((self.bucket, key, previous))

    async def warm(self, asset: str, nbytes: int) -> dict[str, object]:
        """Load an asset's metadata, its sidecar and its first `nbytes` into the cache.

        Looks both up afresh: warm-up follows `prepare`, and a "not found" remembered
        from before the asset was ready must not outlive it."""
        for name in (asset, asset + ".dtsh"):
            self._meta.pop(object_key(self._prefix, name), None)
        meta = await self.stat(asset)
        loaded = 0
        if meta.size and nbytes:
            async with aclosing(self.open(meta, 0, min(meta.size, nbytes) - 1,
                                          probe=False)) as chunks:
                async for chunk in chunks:
                    loaded += len(chunk)
        sidecar: ObjectMeta | None
        try:
            sidecar = await self.stat(asset + ".dtsh")
        except AssetNotFound:
            sidecar = None  # remembered as missing: Mist's look-up costs nothing now
        if sidecar is not None and sidecar.size:
            async with aclosing(self.open(sidecar, 0, sidecar.size - 1, probe=False)) as chunks:
                async for _ in chunks:
                    pass
        return {"asset": asset, "size": meta.size, "etag": meta.etag, "warmed_bytes": loaded,
                "blocks": -(-loaded // self.block_size),
                "sidecar": sidecar is not None,
                "sidecar_bytes": sidecar.size if sidecar is not None else 0}

    def version_changed(self, meta: ObjectMeta) -> None:
        """S3 said 412 to If-Match: forget the version's metadata and blocks."""
        cached = self._meta.get(meta.key)
        if isinstance(cached, ObjectMeta) and cached.etag == meta.etag:
            del self._meta[meta.key]
        self._drop_version((self.bucket, meta.key, meta.etag))

    def _drop_version(self, version: Version) -> None:
        self.memory.drop_version(version)
        if self.disk is not None:
            self._spawn(asyncio.to_thread(self.disk.drop_version, version))
        self._update_gauges()

    # --- bytes ------------------------------------------------------------------

    async def open(self, meta: ObjectMeta, start: int, end: int, *, probe: bool = True
                   ) -> AsyncGenerator[Block | memoryview, None]:
        """Bytes start..end (inclusive) of exactly the version `meta` describes.

        Raises ObjectChanged (before or during the stream) when that version is gone.
        Close the generator to stop: fetches nobody else reads stop with it.
        `probe=False` (warm-up) always goes through whole, cached blocks.
        """
        if end < start:
            return
        bs = self.block_size
        version: Version = (self.bucket, meta.key, meta.etag)
        last_needed = end // bs
        attached: list[RunFetch] = []
        # An open-ended read (Mist's, at every seek) is held: no GET past its first block
        # or probe until `seek_grace_s` after its first bytes went out (SEEK_GRACE_S).
        held = probe and self._open_ended(meta, last_needed)
        first_out = 0.0  # when this read's first bytes went out
        probed: BlockKey | None = None
        completed = False

        def released() -> bool:
            nonlocal held
            if held and first_out and time.monotonic() >= first_out + self.seek_grace_s:
                held = False
            return not held

        try:
            for index in block_span(start, end, bs):
                for fetch in [f for f in attached if f.last < index]:
                    attached.remove(fetch)  # passed it: let its blocks go
                    fetch.detach()
                first_byte, last_byte = block_bounds(index, bs, meta.size)
                lo, hi = max(start, first_byte) - first_byte, min(end, last_byte) - first_byte
                sequential = index > start // bs or self._last_read.get(version) == index - 1
                key = BlockKey(self.bucket, meta.key, meta.etag, index)
                data = await self._cached(key)
                stop = min(hi, lo + PROBE_BYTES - 1)
                if (data is None and held and not sequential and key not in self._fetches
                        and key not in self._probed
                        and (lo, stop) != (0, last_byte - first_byte)):
                    # A cold seek (Mist reads a box header and hangs up): a probe streamed
                    # straight from S3 first. A block is probed once: the next seek to it
                    # (at the same time or later) fetches the whole block, to the end
                    # even if its client leaves, so a popular block ends up cached.
                    async with aclosing(self._probe(meta, key, first_byte + lo,
                                                    first_byte + stop)) as probe_bytes:
                        async for chunk in probe_bytes:
                            first_out = first_out or time.monotonic()
                            yield chunk
                    lo = stop + 1
                    if lo > hi:
                        continue  # the probe took the rest of the block
                    probed = key  # the rest of it is this read's, not a second seek's
                    data = self.memory.get(key)  # another reader's fetch may have landed
                if data is None and key not in self._fetches and held and first_out:
                    # this read would send a GET: not before the grace is over
                    await asyncio.sleep(max(0.0, first_out + self.seek_grace_s
                                            - time.monotonic()))
                    held = False
                    data = self.memory.get(key)
                self._last_read[version] = index
                if data is not None:
                    if sequential and released():
                        self._read_ahead(meta, index + 1)
                    first_out = first_out or time.monotonic()
                    yield memoryview(data)[lo:hi + 1] if (lo, hi + 1) != (0, len(data)) else data
                    continue
                joined = self._fetches.get(key)
                if joined is not None:
                    self._metrics.coalesced_waits.inc()
                    fetch = joined
                else:
                    fetch = self._start_fetch(
                        meta, index, self._run_end(meta, index, last_needed), background=False,
                        keep=held and key in self._probed and key != probed)
                if fetch not in attached:
                    fetch.attach()
                    attached.append(fetch)
                if sequential and released():
                    self._read_ahead(meta, index + 1)
                async with aclosing(fetch.read(index, lo, hi)) as pieces:
                    async for piece in pieces:
                        first_out = first_out or time.monotonic()
                        yield piece
            completed = True
        finally:
            for fetch in attached:
                fetch.detach(abandoned=not completed)

    async def _cached(self, key: BlockKey) -> Block | None:
        """The block from memory, else from disk (counted per tier), else None."""
        data: Block | None = self.memory.get(key)
        if data is not None:
            self._metrics.cache_hits.labels(tier="memory").inc()
            return data
        self._metrics.cache_misses.labels(tier="memory").inc()
        return await self._from_disk(key)

    async def _probe(self, meta: ObjectMeta, key: BlockKey, first: int, last: int
                     ) -> AsyncGenerator[bytes, None]:
        """Bytes first..last straight from S3, not cached; marks the block as probed."""
        self._probed[key] = True
        async with aclosing(self.upstream.read(meta.key, first, last, meta.etag)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _open_ended(self, meta: ObjectMeta, last_needed: int) -> bool:
        return last_needed == (meta.size - 1) // self.block_size

    def _run_end(self, meta: ObjectMeta, index: int, last_needed: int) -> int:
        """Where a client's own GET from block `index` stops: the blocks it asked for, at
        most `readahead_blocks` past this one. An open-ended read gets this block alone
        (Mist opens `bytes=N-` at every seek and mostly reads a few KiB before it hangs
        up); if it keeps reading, read-ahead, shared and bounded per process, fetches
        what follows, so each such reader holds at most one block of its own."""
        if self._open_ended(meta, last_needed):
            return index
        return min(last_needed, index + self._config.readahead_blocks)

    async def _from_disk(self, key: BlockKey) -> bytes | None:
        if self.disk is None:
            return None
        data = await self.disk.get(key)
        if data is None:
            self._metrics.cache_misses.labels(tier="disk").inc()
            return None
        self._metrics.cache_hits.labels(tier="disk").inc()
        self.memory.put(key, data)
        self._update_gauges()
        return data

    def _missing(self, key: BlockKey) -> bool:
        return (not self.memory.contains(key) and key not in self._fetches
                and (self.disk is None or not self.disk.contains(key)))

    def _start_fetch(self, meta: ObjectMeta, first: int, last: int,
                     background: bool, keep: bool = False) -> RunFetch:
        """One GET for the run of missing blocks from `first`, up to `last`."""
        end = first
        while end < last and self._missing(BlockKey(self.bucket, meta.key, meta.etag, end + 1)):
            end += 1
        fetch = RunFetch(self, meta, first, end, background, keep)
        for index in range(first, end + 1):
            self._fetches[fetch.key(index)] = fetch
        if background:
            self._readahead_inflight += 1
            self._metrics.readahead_blocks.inc(end - first + 1)
        fetch.task = asyncio.ensure_future(fetch.run())
        return fetch

    def _read_ahead(self, meta: ObjectMeta, after: int) -> None:
        """Fetch the next `readahead_blocks` blocks that nobody has or is fetching."""
        count = self._config.readahead_blocks
        if count == 0 or meta.size == 0:
            return
        stop = min((meta.size - 1) // self.block_size, after + count - 1)
        index = after
        while index <= stop:
            key = BlockKey(self.bucket, meta.key, meta.etag, index)
            if not self._missing(key):
                index += 1
                continue
            if self._readahead_inflight >= self._config.readahead_max_inflight:
                return
            fetch = self._start_fetch(meta, index, stop, background=True)
            index = fetch.last + 1

    def _block_arrived(self, key: BlockKey, data: Block) -> None:
        self._fetches.pop(key, None)
        self.memory.put(key, data)
        self._update_gauges()

    def _forget(self, fetch: RunFetch) -> None:
        for index in range(fetch.first, fetch.last + 1):
            if self._fetches.get(fetch.key(index)) is fetch:
                del self._fetches[fetch.key(index)]

    def _fetch_finished(self, fetch: RunFetch) -> None:
        self._forget(fetch)
        if fetch.background:
            self._readahead_inflight -= 1

    def _evicted(self, key: BlockKey, data: Block) -> None:
        self._metrics.cache_evictions.labels(tier="memory").inc()
        # A disk slower than the eviction rate must not pile blocks up in memory.
        if self.disk is not None and self._disk_writes < MAX_PENDING_DISK_WRITES:
            self._disk_writes += 1
            self._spawn(self._write_to_disk(key, data))

    async def _write_to_disk(self, key: BlockKey, data: Block) -> None:
        assert self.disk is not None
        try:
            await self.disk.put(key, data)
        finally:
            self._disk_writes -= 1

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _update_gauges(self) -> None:
        self._metrics.cache_bytes.labels(tier="memory").set(self.memory.used_bytes)
