"""The seam between the HTTP handlers and S3: object metadata and byte streams, served
from the cache tiers where possible.

Handlers call `stat`, `open`, `warm` and `put_sidecar`; this module composes the rest:
`metadata` (fresh, revalidated, missing), `tiers` (memory and file tiers), `fetch` (every
upstream read, checked, and the table of fetches in flight) and `plan` (what a reader
does next). The one place that handles "that version is gone" is `_version_gone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncGenerator
from contextlib import aclosing

from .. import mp4
from ..assets import SIDECAR_SUFFIX, object_key
from ..config import CacheConfig
from ..errors import AssetNotFound, ObjectChanged, RangeBeyondEnd, S3ProxyError, UpstreamInvalid
from ..metrics import Metrics
from ..upstream import Answer, NotModified, ObjectMeta, S3Upstream
from .blockfile import BlockSpan
from .blocks import Block, BlockKey, block_bounds, last_block
from .fetch import Fetch, FetchTable, checked
from .metadata import MetadataCache
from .reads import MemoryRead, ReadHistory, Reads, ReadStats
from .tiers import build_tiers

MAX_BOXES = 64  # top-level boxes walked by warm-up (Mist's walk stops far sooner)


class _Loading:
    """The blocks one warm-up loads, within its byte budget (whole blocks count)."""

    def __init__(self, store: ObjectStore, max_bytes: int) -> None:
        self._store = store
        self._budget = max_bytes
        self._sizes: dict[BlockKey, int] = {}
        self._used = 0  # of the budget: the sizes above, summed
        self.capped = False

    @property
    def keys(self) -> list[BlockKey]:
        return list(self._sizes)

    @property
    def room(self) -> bool:
        return self._used < self._budget

    def bytes_of(self, meta: ObjectMeta) -> int:
        return sum(n for k, n in self._sizes.items() if k.key == meta.key and k.etag == meta.etag)

    async def read(self, meta: ObjectMeta, start: int, length: int) -> bytes:
        """Bytes start..start+length of `meta` (fewer when the budget runs out)."""
        out = bytearray()
        await self._through(meta, start, length, out)
        return bytes(out)

    async def load(self, meta: ObjectMeta, start: int, length: int) -> int:
        """Load bytes start..start+length into the cache; how many of them it covers."""
        return await self._through(meta, start, length, None)

    async def _through(
        self, meta: ObjectMeta, start: int, length: int, out: bytearray | None
    ) -> int:
        end = self._admit(meta, start, length)
        if end < start:
            return 0
        async with aclosing(
            self._store.open(meta, start, end, probe=False, readahead=False)
        ) as chunks:
            async for chunk in chunks:
                assert not isinstance(chunk, BlockSpan)  # not asked for
                if out is not None:
                    out += chunk
        return end - start + 1

    def _admit(self, meta: ObjectMeta, start: int, length: int) -> int:
        """The last offset of the run that fits the budget (blocks already taken are
        free); the blocks admitted are counted."""
        end = min(start + length, meta.size) - 1
        if end < start:
            return end
        size = self._store.block_size
        last = start - 1
        for index in range(start // size, end // size + 1):
            key = BlockKey(self._store.bucket, meta.key, meta.etag, index)
            first, final = block_bounds(index, size, meta.size)
            if key not in self._sizes:
                if self._used + (final - first + 1) > self._budget:
                    self.capped = True
                    break
                self._used += final - first + 1
                self._sizes[key] = final - first + 1
            last = min(final, end)
        return last


class ObjectStore:
    def __init__(
        self,
        upstream: S3Upstream,
        prefix: str,
        cache: CacheConfig,
        metrics: Metrics,
        worker: int = 0,
        workers: int = 1,
        shared_dir: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.bucket = upstream.bucket
        self._prefix = prefix
        self._config = cache
        self._metrics = metrics
        self.block_size = int(cache.block_size)
        self.tiers = build_tiers(cache, metrics, self.bucket, worker, workers, shared_dir)
        self.meta = MetadataCache(cache.metadata_ttl_s, on_replaced=self._replaced)
        self.fetches = FetchTable()
        self.reads = Reads(self.bucket, cache, metrics, self.tiers, self.fetches, self._new_fetch)
        self._made: weakref.WeakSet[Fetch] = weakref.WeakSet()  # for close() to wait on
        self._side: set[asyncio.Task[None]] = set()  # sidecar look-ups beside an asset's

    async def start(self) -> None:
        await self.tiers.start()

    async def close(self) -> None:
        """Stop every look-up and fetch, and wait until they have stopped."""
        for side in list(self._side):
            side.cancel()
        await asyncio.gather(*self._side, return_exceptions=True)
        await self.meta.close()
        tasks = [f.task for f in list(self._made) if f.task is not None and not f.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.tiers.close()

    # --- metadata ---------------------------------------------------------------

    async def stat(
        self, asset: str, first_block: int | None = None, stats: ReadStats | None = None
    ) -> ObjectMeta:
        """Size, ETag, Last-Modified and type of the asset's current version.

        `first_block`: the block a GET will start with. When the metadata is not fresh
        and that block is not cached, its GET is sent at once and its answer supplies the
        metadata (one round trip instead of a HEAD and a GET). Otherwise a HEAD, carrying
        the ETag last seen in If-None-Match: a 304 keeps every cached block.
        """
        key = object_key(self._prefix, asset)
        fresh = self.meta.fresh(key)
        if fresh is not None:
            return fresh
        self._look_up_sidecar(asset)
        asked = time.monotonic()
        try:
            meta, revalidated = await self.meta.shared(key, lambda: self._look_up(key, first_block))
        finally:
            if stats is not None:
                stats.upstream_s += time.monotonic() - asked
        if stats is not None:
            stats.revalidated = revalidated
        return meta

    def _look_up_sidecar(self, asset: str) -> None:
        """An asset looked up for the first time: its `.dtsh` sidecar is looked up beside
        it, since Mist asks for that at every start, right after its first reads; its
        answer (found, or missing) is then remembered with its first block, and the
        start saves its round trips.
        Once per sidecar name: revalidations do not repeat it."""
        if asset.endswith(SIDECAR_SUFFIX) or self.meta.seen(
            object_key(self._prefix, asset + SIDECAR_SUFFIX)
        ):
            return

        async def look_up() -> None:
            with contextlib.suppress(S3ProxyError):  # missing, or S3 failing: asked again
                await self.stat(asset + SIDECAR_SUFFIX, 0)  # Mist's GET follows its HEAD

        task = asyncio.ensure_future(look_up())
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    async def _look_up(self, key: str, first_block: int | None) -> tuple[ObjectMeta, bool]:
        """The current version, and whether S3 confirmed the one known (revalidated)."""
        known = self.meta.known(key) or await self.tiers.known_version(key)
        if first_block is None or (known is not None and await self._held(known, first_block)):
            meta = await self._head(key, known)  # If-None-Match: a 304 keeps the blocks
            return meta, meta is known
        if known is not None:
            current = await self._confirm(known, first_block)
            if current is not None:
                return current, True
            known = None  # gone (412): the GET below tells the new version
        found = await self._discover(key, first_block)
        return (found, False) if found is not None else (await self._head(key, known), False)

    async def _confirm(self, known: ObjectMeta, index: int) -> ObjectMeta | None:
        """The block the read needs, fetched from the version last seen (If-Match), in the
        table before it is sent: its answer says the version is still current. None when
        it is gone (412), or the block is on its way already."""
        end = block_bounds(index, self.block_size, known.size)[1]
        fetch = self._new_fetch(known, index * self.block_size, end, keep=index == 0)
        if not fetch.start_in(self.fetches):
            return None
        await fetch.answered()
        if fetch.error is None:
            return self.meta.still_current(known)
        if isinstance(fetch.error, ObjectChanged | AssetNotFound):
            return None  # the fetch's end dropped what was known of it
        raise type(fetch.error)(str(fetch.error))

    async def _held(self, meta: ObjectMeta, index: int) -> bool:
        """Whether block `index` of that version is cached (here or by a peer) or being
        fetched, or lies past its end (a HEAD tells more then)."""
        key = BlockKey(self.bucket, meta.key, meta.etag, index)
        return (
            index > last_block(meta.size, self.block_size)
            or key in self.fetches
            or await self.tiers.holds(key)
        )

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
        # the first block is kept whatever its first reader does (the plan's rule: every
        # media client comes back to it; Mist's box walk reads 16 bytes and hangs up)
        fetch = self._new_fetch(
            meta, start, min(end, meta.size - 1), answer=answer, keep=index == 0
        )
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

    async def warm(self, asset: str, seconds: float, max_bytes: int) -> dict[str, object]:
        """Load what a Mist start reads into every worker's cache: the metadata, the
        sidecar, the MP4's top-level box headers and its `moov`, then the first `seconds`
        of media (from the `mdat`'s bitrate; without one, from the start) and as far
        again as the widest read-ahead window reading it can reach, never more than
        `max_bytes` in all.
        Returns what was loaded.

        Looks both up afresh: warm-up follows `prepare`, and a "not found" remembered
        from before the asset was ready must not outlive it."""
        for name in (asset, asset + ".dtsh"):
            self.meta.invalidate(object_key(self._prefix, name))
        meta = await self.stat(asset)
        loading = _Loading(self, max_bytes)
        sidecar: ObjectMeta | None
        try:
            sidecar = await self.stat(asset + ".dtsh")
        except AssetNotFound:
            sidecar = None  # remembered as missing: Mist's look-up costs nothing now
        if sidecar is not None:
            await loading.load(sidecar, 0, sidecar.size)
        boxes: list[mp4.Box] = []
        index: mp4.Box | None = None
        moov = b""
        offset = 0
        while offset < meta.size and len(boxes) < MAX_BOXES and loading.room:
            box = mp4.box_at(await loading.read(meta, offset, mp4.HEADER_BYTES), offset, meta.size)
            if box is None:
                break
            boxes.append(box)
            if box.kind == "moov":
                index, moov = box, await loading.read(meta, box.offset, box.size)
            offset = box.end
        duration = mp4.duration_s(moov) if moov else None
        media = mp4.media_extent(boxes, duration, seconds, max_bytes, meta.size)
        # and the read-ahead the start's own reads trigger at the end of that media
        # the widest read-ahead window a streaming reader's reads can reach past it
        margin = max(self._config.readahead_blocks, self._config.readahead_max_blocks)
        media_loaded = await loading.load(
            meta, media.offset, media.length + margin * self.block_size
        )
        covered = min(media_loaded, media.length)
        await self.tiers.share(loading.keys)
        asset_bytes = loading.bytes_of(meta)
        return {
            "asset": asset,
            "size": meta.size,
            "etag": meta.etag,
            "warmed_bytes": asset_bytes,
            "blocks": -(-asset_bytes // self.block_size),
            "sidecar": sidecar is not None,
            "sidecar_bytes": loading.bytes_of(sidecar) if sidecar is not None else 0,
            "index": None
            if index is None
            else {"box": "moov", "offset": index.offset, "bytes": index.size},
            "media": {
                "offset": media.offset,
                "bytes": covered,
                "readahead_bytes": media_loaded - covered,
                "seconds": round(covered * 8 / media.bitrate_bps, 1) if media.bitrate_bps else None,
                "bitrate_bps": round(media.bitrate_bps) if media.bitrate_bps else None,
            },
            "capped": loading.capped,
        }

    def _version_gone(self, meta: ObjectMeta, error: ObjectChanged) -> None:
        """An upstream read of `meta` found it gone (412), replaced, or answered with
        bytes that are not what was asked: the metadata goes, so the next look-up asks
        S3 afresh; when the version itself is gone, its blocks go too."""
        if isinstance(error, UpstreamInvalid) and not error.version_gone:
            self.meta.invalidate(meta.key)  # look again, keeping the validator
            return
        self.meta.forget(meta)
        self._replaced(meta)

    def _replaced(self, meta: ObjectMeta) -> None:
        version = (self.bucket, meta.key, meta.etag)
        self.tiers.drop_version(version)
        self.reads.version_dropped(version)

    # --- bytes ------------------------------------------------------------------

    def open(
        self,
        meta: ObjectMeta,
        start: int,
        end: int,
        *,
        open_ended: bool | None = None,
        history: ReadHistory | None = None,
        probe: bool = True,
        readahead: bool = True,
        stats: ReadStats | None = None,
        spans: bool = False,
    ) -> AsyncGenerator[Block | memoryview | BlockSpan, None]:
        """Bytes start..end (inclusive) of exactly the version `meta` describes.

        Raises ObjectChanged (before or during the stream) when that version is gone.
        Close the generator to stop: fetches nobody else reads stop with it.
        `open_ended`: the client asked with no last byte (Mist's `bytes=N-`), and may hang
        up at any point; None: when `end` is the object's last byte.
        `history`: the client connection's reads (sequential detection).
        `probe=False` (warm-up) always goes through whole, cached blocks;
        `readahead=False` (warm-up too) fetches no block past `end`.
        `stats`: what the read cost (first byte's source, blocks, time on S3).
        `spans`: a block a file tier holds, and the read takes whole, may come as a
        `BlockSpan` of its file, for the caller to send (`sendfile`) and close.
        """
        return self.reads.open(
            meta,
            start,
            end,
            open_ended=end == meta.size - 1 if open_ended is None else open_ended,
            history=history,
            probe=probe,
            readahead=readahead,
            stats=stats,
            spans=spans,
        )

    def fresh(self, asset: str) -> ObjectMeta | None:
        """The asset's metadata when it is fresh (no look-up needed); None when it is
        not, or the asset is known missing (`stat` answers that)."""
        try:
            return self.meta.fresh(object_key(self._prefix, asset))
        except AssetNotFound:
            return None

    def memory_read(
        self,
        meta: ObjectMeta,
        start: int,
        end: int,
        *,
        open_ended: bool,
        history: ReadHistory | None,
        stats: ReadStats,
    ) -> MemoryRead | None:
        """`open`, at once, when every block of the range is in memory (see
        `Reads.memory_read`); None when one is not."""
        return self.reads.memory_read(
            meta, start, end, open_ended=open_ended, history=history, stats=stats
        )

    @property
    def seek_grace_s(self) -> float:
        return self.reads.seek_grace_s

    @seek_grace_s.setter
    def seek_grace_s(self, seconds: float) -> None:
        self.reads.seek_grace_s = seconds

    def _new_fetch(
        self,
        meta: ObjectMeta,
        start: int,
        end: int,
        *,
        answer: Answer | None = None,
        keep: bool = False,
        background: bool = False,
    ) -> Fetch:
        """A fetch of bytes start..end of `meta`'s version: the GET carries If-Match, and
        its answer is checked against the version and range before any byte is used."""

        async def open_answer() -> Answer:
            got = await self.upstream.get(meta.key, start, end, if_match=meta.etag)
            if isinstance(got, NotModified):
                raise UpstreamInvalid("304 to a GET without If-None-Match")
            return checked(got, start, end, meta)

        fetch = Fetch(
            meta,
            self.bucket,
            self.block_size,
            start,
            end,
            open_answer,
            on_block=self._block_arrived,
            on_end=self._fetch_ended,
            answer=answer,
            keep=keep,
            background=background,
        )
        self._made.add(fetch)
        return fetch

    def _block_arrived(self, fetch: Fetch, index: int, block: Block) -> None:
        self.tiers.put(fetch.key(index), block, fetch.meta)
        if fetch.background:
            self.reads.block_landed(fetch.key(index), len(block))

    def _fetch_ended(self, fetch: Fetch, error: S3ProxyError | None) -> None:
        self.reads.fetch_ended(fetch)
        if isinstance(error, ObjectChanged):
            self._version_gone(fetch.meta, error)
        elif isinstance(error, AssetNotFound):  # deleted meanwhile
            self.meta.missing(fetch.meta.key)
