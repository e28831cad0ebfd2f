"""The seam between the HTTP handlers and S3: object metadata and byte streams, served
from the cache tiers where possible.

Handlers call `stat`, `open`, `warm` and `put_sidecar`; this module composes the rest:
`metadata` (fresh, revalidated, missing), `tiers` (memory and file tiers), `fetch` (every
upstream read, checked, and the table of fetches in flight) and `plan` (what a reader
does next). The one place that handles "that version is gone" is `_version_gone`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from contextlib import aclosing

from cachetools import LRUCache

from ..assets import object_key
from ..config import CacheConfig
from ..errors import (
    AssetNotFound,
    ObjectChanged,
    RangeBeyondEnd,
    S3ProxyError,
    UpstreamInvalid,
)
from ..metrics import Metrics
from ..upstream import Answer, NotModified, ObjectMeta, S3Upstream
from . import plan
from .blocks import Block, BlockKey, Version, block_bounds, block_span, last_block
from .disk import FileTier
from .fetch import Fetch, FetchTable, checked
from .metadata import MetadataCache
from .tiers import Tiers

# An open-ended read sends no GET past its first block (or probe), read-ahead included,
# until this long after its first bytes went out. Mist hangs up right after reading a
# box header; the hang-up cancels the request, and it must land before a GET is sent:
# once a GET is on its way, S3 bills whatever it sends, however soon it is abandoned
# (kernel buffers take megabytes a client never reads, so "the client took the bytes"
# proves nothing). A client that does keep reading has those first bytes meanwhile.
SEEK_GRACE_S = 0.005
# With several workers and no disk tier, each worker keeps this share of
# cache.max_bytes in its own memory; the rest is the shared tier all of them read.
SHARED_MEMORY_FRACTION = 4


class ReadHistory:
    """What one client connection has read: the last block per version, for a few
    versions. A reader is sequential by its own history, never by another client's."""

    SIZE = 8

    def __init__(self) -> None:
        self._last: OrderedDict[Version, int] = OrderedDict()

    def last(self, version: Version) -> int | None:
        return self._last.get(version)

    def read(self, version: Version, index: int) -> None:
        self._last[version] = index
        self._last.move_to_end(version)
        while len(self._last) > self.SIZE:
            self._last.popitem(last=False)


class _Progress:
    """One open read's own state: when its first bytes went out, whether it is held."""

    def __init__(self, held: bool) -> None:
        self.held = held
        self.first_out = 0.0

    def sent(self) -> None:
        if not self.first_out:
            self.first_out = time.monotonic()

    def grace_left(self, grace_s: float) -> float:
        return max(0.0, self.first_out + grace_s - time.monotonic())

    def update(self, grace_s: float) -> None:
        if self.held and self.first_out and self.grace_left(grace_s) == 0.0:
            self.held = False


def build_tiers(cache: CacheConfig, metrics: Metrics, bucket: str, worker: int,
                workers: int, shared_dir: str | None) -> Tiers:
    """The tiers of one worker; the configured byte bounds hold for the group.

    One worker: memory, then the disk tier if set (written on eviction). Several: the
    disk tier, or else a tier in shared memory (`shared_dir`, on tmpfs), is written as
    blocks arrive and read by every worker, so a block fetched by one is a hit for all;
    each worker's own memory then holds its share (a quarter of it without a disk tier).
    """
    total = int(cache.max_bytes)
    if cache.disk.path and cache.disk.max_bytes > 0:
        files = FileTier(cache.disk.path, int(cache.disk.max_bytes) // workers, metrics,
                         bucket=bucket, tier="disk", worker=worker, workers=workers)
        return Tiers(total // workers, files, metrics, write_through=workers > 1)
    if workers > 1 and shared_dir:
        memory = total // (SHARED_MEMORY_FRACTION * workers)
        files = FileTier(shared_dir, (total - memory * workers) // workers, metrics,
                         bucket=bucket, tier="shared", worker=worker, workers=workers,
                         inline=True)
        return Tiers(memory, files, metrics, write_through=True)
    return Tiers(total // workers, None, metrics)


class ObjectStore:
    def __init__(self, upstream: S3Upstream, prefix: str, cache: CacheConfig,
                 metrics: Metrics, worker: int = 0, workers: int = 1,
                 shared_dir: str | None = None) -> None:
        self.upstream = upstream
        self.bucket = upstream.bucket
        self._prefix = prefix
        self._config = cache
        self._metrics = metrics
        self.block_size = int(cache.block_size)
        self.tiers = build_tiers(cache, metrics, self.bucket, worker, workers, shared_dir)
        self.meta = MetadataCache(cache.metadata_ttl_s, on_replaced=self._replaced)
        self.fetches = FetchTable()
        self._probes: set[Fetch] = set()  # probes in flight (they own no block)
        self._probed: LRUCache[BlockKey, bool] = LRUCache(maxsize=65536)
        self._readahead_inflight = 0
        self.seek_grace_s = SEEK_GRACE_S

    async def start(self) -> None:
        await self.tiers.start()

    async def close(self) -> None:
        """Stop every look-up and fetch, and wait until they have stopped."""
        await self.meta.close()
        fetches = [*self.fetches.fetches(), *self._probes]
        tasks = [f.task for f in fetches if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.tiers.close()

    # --- metadata ---------------------------------------------------------------

    async def stat(self, asset: str, first_block: int | None = None) -> ObjectMeta:
        """Size, ETag, Last-Modified and type of the asset's current version.

        `first_block`: the block a GET will start with. When the metadata is not fresh
        and that block is not cached, its GET is sent at once and its answer supplies the
        metadata (one round trip instead of a HEAD and a GET). Otherwise a HEAD, carrying
        the ETag last seen in If-None-Match: a 304 keeps every cached block.
        """
        key = object_key(self._prefix, asset)
        meta = self.meta.fresh(key)
        if meta is not None:
            return meta
        return await self.meta.shared(key, lambda: self._look_up(key, first_block))

    async def _look_up(self, key: str, first_block: int | None) -> ObjectMeta:
        known = self.meta.known(key) or await self.tiers.known_version(key)
        if first_block is not None and not (known is not None
                                            and await self._held(known, first_block)):
            meta = await self._discover(key, first_block)
            if meta is not None:
                return meta
        return await self._head(key, known)

    async def _held(self, meta: ObjectMeta, index: int) -> bool:
        """Whether block `index` of that version is cached or being fetched (or lies
        past its end: a HEAD tells more then)."""
        key = BlockKey(self.bucket, meta.key, meta.etag, index)
        return (index > last_block(meta.size, self.block_size) or key in self.fetches
                or await self.tiers.holds(key))

    async def _head(self, key: str, known: ObjectMeta | None) -> ObjectMeta:
        try:
            found = await self.upstream.head(key, known.etag if known is not None else None)
        except AssetNotFound:
            self.meta.missing(key)
            raise
        if isinstance(found, NotModified):
            assert known is not None  # If-None-Match was sent
            return self.meta.still_current(known)
        return self.meta.remember(found)

    async def _discover(self, key: str, index: int) -> ObjectMeta | None:
        """The GET of the block a read starts with; its answer tells the version, and
        becomes that block's fetch. None: ask with a HEAD (the block lies past the end,
        or the answer could not be trusted)."""
        start = index * self.block_size
        end = start + self.block_size - 1
        try:
            answer = await self.upstream.get(key, start, end)
            if isinstance(answer, NotModified):
                return None  # no If-None-Match was sent: not an answer to this
            answer = checked(answer, start, end, None)
        except AssetNotFound:
            self.meta.missing(key)
            raise
        except (RangeBeyondEnd, UpstreamInvalid):
            return None
        meta = self.meta.remember(answer.meta)
        fetch = self._new_fetch(meta, start, min(end, meta.size - 1), answer=answer)
        if not fetch.start_in(self.fetches):
            answer.close()  # that block is on its way already
        return meta

    async def put_sidecar(self, asset: str, data: bytes) -> None:
        """Store a `.dtsh` sidecar (never anything else); the next read looks it up."""
        key = object_key(self._prefix, asset)
        if not key.endswith(".dtsh"):
            raise ValueError("only .dtsh sidecars are ever written")
        await self.upstream.put(key, data, "application/octet-stream")
        self.meta.invalidate(key)

    async def warm(self, asset: str, nbytes: int) -> dict[str, object]:
        """Load an asset's metadata, its sidecar and its first `nbytes` into the cache.

        Looks both up afresh: warm-up follows `prepare`, and a "not found" remembered
        from before the asset was ready must not outlive it."""
        for name in (asset, asset + ".dtsh"):
            self.meta.invalidate(object_key(self._prefix, name))
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

    def _version_gone(self, meta: ObjectMeta, error: ObjectChanged) -> None:
        """An upstream read of `meta` found it gone (412), replaced, or answered with
        bytes that are not what was asked: the metadata goes, so the next look-up asks
        S3 afresh; when the version itself is gone, its blocks go too."""
        self.meta.forget(meta)
        if not isinstance(error, UpstreamInvalid) or error.version_gone:
            self._replaced(meta)

    def _replaced(self, meta: ObjectMeta) -> None:
        self.tiers.drop_version((self.bucket, meta.key, meta.etag))

    # --- bytes ------------------------------------------------------------------

    async def open(self, meta: ObjectMeta, start: int, end: int, *,
                   history: ReadHistory | None = None, probe: bool = True
                   ) -> AsyncGenerator[Block | memoryview, None]:
        """Bytes start..end (inclusive) of exactly the version `meta` describes.

        Raises ObjectChanged (before or during the stream) when that version is gone.
        Close the generator to stop: fetches nobody else reads stop with it.
        `history`: the client connection's reads (sequential detection).
        `probe=False` (warm-up) always goes through whole, cached blocks.
        """
        if end < start:
            return
        bs = self.block_size
        version: Version = (self.bucket, meta.key, meta.etag)
        last_needed = end // bs
        open_ended = end == meta.size - 1  # Mist's `bytes=N-`
        # An open-ended read (Mist's, at every seek) is held: no GET past its first block
        # or probe until the seek grace after its first bytes went out.
        progress = _Progress(held=probe and open_ended)
        previous = history.last(version) if history is not None else None
        state_of = self._state_of(meta)
        attached: list[Fetch] = []
        completed = False
        try:
            for index in block_span(start, end, bs):
                for passed in [f for f in attached if f.last < index]:
                    attached.remove(passed)  # passed it: let its blocks go
                    passed.detach()
                first_byte, last_byte = block_bounds(index, bs, meta.size)
                lo, hi = max(start, first_byte) - first_byte, min(end, last_byte) - first_byte
                key = BlockKey(self.bucket, meta.key, meta.etag, index)
                data = await self.tiers.get(key)
                probed_here = False
                while lo <= hi:
                    progress.update(self.seek_grace_s)
                    reader = plan.Reader(
                        index=index, lo=lo, hi=hi, block_last=last_byte - first_byte,
                        open_ended=open_ended,
                        sequential=plan.is_sequential(index, start // bs, previous),
                        held=progress.held, sent=bool(progress.first_out),
                        probed_here=probed_here)
                    state = plan.BlockState(cached=data is not None,
                                            fetching=key in self.fetches,
                                            probed=key in self._probed)
                    step = plan.next_step(reader, state, state_of,
                                          self._config.readahead_blocks, last_needed)
                    if isinstance(step, plan.Probe):
                        async with aclosing(self._probe(meta, key, lo, step.stop)) as chunks:
                            async for chunk in chunks:
                                progress.sent()
                                yield chunk
                        lo, probed_here = step.stop + 1, True
                        data = self.tiers.memory.get(key)  # another's fetch may have landed
                        continue
                    if isinstance(step, plan.WaitGrace):
                        await asyncio.sleep(progress.grace_left(self.seek_grace_s))
                        progress.held = False
                        data = self.tiers.memory.get(key)
                        continue
                    # the block is read now: it counts for this connection's history
                    if history is not None:
                        history.read(version, index)
                    if isinstance(step, plan.Serve):
                        assert data is not None
                        if plan.wants_readahead(reader):
                            self._read_ahead(meta, index + 1)
                        progress.sent()
                        yield (memoryview(data)[lo:hi + 1]
                               if (lo, hi + 1) != (0, len(data)) else data)
                        break
                    fetch = self._fetch_for(meta, key, index, step)
                    if fetch not in attached:
                        fetch.attach()
                        attached.append(fetch)
                    if plan.wants_readahead(reader):  # after its own fetch has its blocks
                        self._read_ahead(meta, index + 1)
                    async with aclosing(fetch.read(index, lo, hi)) as pieces:
                        async for piece in pieces:
                            progress.sent()
                            yield piece
                    break
            completed = True
        finally:
            for fetch in attached:
                fetch.detach(abandoned=not completed)

    def _state_of(self, meta: ObjectMeta) -> plan.StateOf:
        def state_of(index: int) -> plan.BlockState:
            key = BlockKey(self.bucket, meta.key, meta.etag, index)
            return plan.BlockState(cached=self.tiers.has(key), fetching=key in self.fetches,
                                   probed=key in self._probed)
        return state_of

    def _fetch_for(self, meta: ObjectMeta, key: BlockKey, index: int,
                   step: plan.Join | plan.StartFetch) -> Fetch:
        joined = self.fetches.get(key)
        if joined is not None:
            self._metrics.coalesced_waits.inc()
            return joined
        assert isinstance(step, plan.StartFetch)
        end = block_bounds(step.last, self.block_size, meta.size)[1]
        fetch = self._new_fetch(meta, index * self.block_size, end, keep=step.keep)
        started = fetch.start_in(self.fetches)
        assert started, "the plan starts a fetch only for blocks nobody is fetching"
        return fetch

    async def _probe(self, meta: ObjectMeta, key: BlockKey, lo: int, hi: int
                     ) -> AsyncGenerator[memoryview, None]:
        """Bytes lo..hi of block `key` straight from S3, not cached; marks it probed."""
        self._probed[key] = True
        first_byte = key.block * self.block_size
        fetch = self._new_fetch(meta, first_byte + lo, first_byte + hi)
        fetch.start_in(None)  # it covers no whole block: nothing to claim or cache
        self._probes.add(fetch)
        fetch.attach()
        completed = False
        try:
            async with aclosing(fetch.read(key.block, lo, hi)) as pieces:
                async for piece in pieces:
                    yield piece
            completed = True
        finally:
            fetch.detach(abandoned=not completed)

    def _read_ahead(self, meta: ObjectMeta, after: int) -> None:
        """Fetch the next `readahead_blocks` blocks that nobody has or is fetching."""
        count = self._config.readahead_blocks
        if count == 0 or meta.size == 0:
            return
        runs = plan.readahead_runs(after, count, last_block(meta.size, self.block_size),
                                   self._state_of(meta), self._readahead_inflight,
                                   self._config.readahead_max_inflight)
        for first, last in runs:
            end = block_bounds(last, self.block_size, meta.size)[1]
            fetch = self._new_fetch(meta, first * self.block_size, end, background=True)
            if fetch.start_in(self.fetches):
                self._readahead_inflight += 1
                self._metrics.readahead_blocks.inc(last - first + 1)

    def _new_fetch(self, meta: ObjectMeta, start: int, end: int, *,
                   answer: Answer | None = None, keep: bool = False,
                   background: bool = False) -> Fetch:
        """A fetch of bytes start..end of `meta`'s version: the GET carries If-Match, and
        its answer is checked against the version and range before any byte is used."""

        async def open_answer() -> Answer:
            if answer is not None:
                return answer  # a cold read's GET, already checked
            got = await self.upstream.get(meta.key, start, end, if_match=meta.etag)
            if isinstance(got, NotModified):
                raise UpstreamInvalid("304 to a GET without If-None-Match")
            return checked(got, start, end, meta)

        return Fetch(meta, self.bucket, self.block_size, start, end, open_answer,
                     on_block=self._block_arrived, on_end=self._fetch_ended, keep=keep,
                     background=background)

    def _block_arrived(self, fetch: Fetch, index: int, block: Block) -> None:
        self.tiers.put(fetch.key(index), block, fetch.meta)

    def _fetch_ended(self, fetch: Fetch, error: S3ProxyError | None) -> None:
        self._probes.discard(fetch)
        if fetch.background:
            self._readahead_inflight -= 1
        if isinstance(error, ObjectChanged):
            self._version_gone(fetch.meta, error)

