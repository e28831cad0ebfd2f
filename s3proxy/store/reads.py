"""Bytes of one object version, block by block, as `plan` decides: from the tiers, a
probe, a fetch in flight, or a new fetch; and read-ahead for sequential readers.

The seek grace: an open-ended read sends no GET past its first block (or probe),
read-ahead included, until `SEEK_GRACE_S` after its first bytes went out. Mist hangs up
right after reading a box header; the hang-up cancels the request, and it must land
before a GET is sent: once a GET is on its way, S3 bills whatever it sends, however soon
it is abandoned (kernel buffers take megabytes a client never reads, so "the client took
the bytes" proves nothing). A client that does keep reading has those first bytes
meanwhile.

The start-up read-ahead: a reader of a faststart MP4's `moov` (a read that begins at the
`moov` box block 0 shows) reads it whole, and a player's media reads from the `mdat`
right after it follow at once (Mist's two greedy readers, ../shared/mist.md). Its
read-ahead therefore reaches past the `moov` into the first media, and those fetches are
kept when it hangs up: the media readers that replace it find them in flight or landed,
a round trip sooner than their own first GETs would bring them.

A media reader (a read that begins at the payload of the `mdat` after that `moov`) is
not held: Mist's box walk reads the `mdat`'s header, never its payload, so a read from
there is one of the greedy readers, which take tens of MB. It streams from its first
block, and its read-ahead reaches the widest window past that block at once. When the
`moov` lies inside block 0 that is the only start-up read-ahead: the `moov` reader,
served from memory, hangs up within its grace.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

from cachetools import LRUCache

from .. import mp4
from ..config import CacheConfig
from ..metrics import Metrics
from ..upstream import ObjectMeta
from . import plan
from .blockfile import BlockSpan
from .blocks import Block, BlockKey, Version, block_bounds, block_span, last_block
from .fetch import Fetch, FetchTable
from .tiers import Tiers

SEEK_GRACE_S = 0.005


class NewFetch(Protocol):
    """Makes a (not yet started) fetch of bytes start..end of a version."""

    def __call__(
        self,
        meta: ObjectMeta,
        start: int,
        end: int,
        *,
        keep: bool = False,
        background: bool = False,
    ) -> Fetch: ...


FIRST_LATENCY_S = 0.05  # S3's first-byte latency, until one is measured
LATENCY_WEIGHT = 0.2  # of each new measurement in the moving average
MIN_RATE_S = 0.02  # a reader's rate is measured once it has streamed this long


class ReadHistory:
    """What one client connection has read: the last block per version, for a few
    versions. A reader is sequential by its own history, never by another client's."""

    SIZE = 8

    def __init__(self) -> None:
        self._last: OrderedDict[Version, int] = OrderedDict()
        self._windows: dict[Version, int] = {}

    def last(self, version: Version) -> int | None:
        return self._last.get(version)

    def window(self, version: Version) -> int | None:
        """The read-ahead window this connection's reads of `version` had reached."""
        return self._windows.get(version)

    def keep_window(self, version: Version, blocks: int) -> None:
        self._windows[version] = blocks
        for gone in [v for v in self._windows if v not in self._last]:
            del self._windows[gone]

    def read(self, version: Version, index: int) -> None:
        self._last[version] = index
        self._last.move_to_end(version)
        while len(self._last) > self.SIZE:
            self._last.popitem(last=False)


@dataclass
class ReadStats:
    """What one request's reads cost, for its access line and metrics."""

    first_source: str | None = None  # where its first byte came from: memory, disk, upstream
    blocks_cached: int = 0  # blocks (or parts) served from a tier
    blocks_upstream: int = 0  # ... from S3 (a fetch or a probe)
    upstream_s: float = 0.0  # time spent waiting on S3 (look-ups and bytes)
    revalidated: bool = False  # the metadata was confirmed by S3 (304 or If-Match)

    def took(self, source: str) -> None:
        if self.first_source is None:
            self.first_source = source
        if source == "upstream":
            self.blocks_upstream += 1
        else:
            self.blocks_cached += 1

    @property
    def outcome(self) -> str | None:
        """`hit`, `miss`, `partial` or `revalidated` (None: no block was read)."""
        if not self.blocks_cached and not self.blocks_upstream:
            return None
        if self.blocks_upstream:
            return "partial" if self.blocks_cached else "miss"
        return "revalidated" if self.revalidated else "hit"


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


class Reads:
    """Carries out the plan for every open read of one store."""

    def __init__(
        self,
        bucket: str,
        cache: CacheConfig,
        metrics: Metrics,
        tiers: Tiers,
        fetches: FetchTable,
        new_fetch: NewFetch,
    ) -> None:
        self.bucket = bucket
        self.block_size = int(cache.block_size)
        self._config = cache
        self._metrics = metrics
        self.tiers = tiers
        self.fetches = fetches
        self._new_fetch = new_fetch
        self._probed: LRUCache[BlockKey, bool] = LRUCache(maxsize=65536)
        # each version's `moov` as its block 0 shows it (None: not a faststart MP4)
        self._indexes: LRUCache[Version, mp4.Box | None] = LRUCache(maxsize=4096)
        # where each such version's media begins (None: no `mdat` where the headers
        # after its `moov` are)
        self._media: LRUCache[Version, int | None] = LRUCache(maxsize=4096)
        # media blocks past the `moov` its reader's read-ahead reaches at start-up
        self.startup_blocks = max(cache.readahead_blocks, cache.readahead_max_blocks // 4)
        self._readahead_inflight = 0
        self._readahead_bytes = 0  # of read-ahead GETs in flight
        budget = cache.readahead_max_bytes
        self.readahead_budget = int(budget) if budget is not None else int(cache.max_bytes) // 4
        self._streams = 0  # readers streaming with a read-ahead window now
        self.latency_s = FIRST_LATENCY_S  # S3 first-byte latency, a moving average
        # blocks fetched ahead that nobody has read: 0 while in flight, their size once
        # in memory (counted in `unread_bytes`); a read, an eviction or the end of the
        # fetch that was to bring it takes a block out
        self._ahead: dict[BlockKey, int] = {}
        self.unread_bytes = 0
        tiers.on_evict = self._evicted
        self.seek_grace_s = SEEK_GRACE_S

    def fetch_ended(self, fetch: Fetch) -> None:
        if not fetch.background:
            return
        self._readahead_inflight -= 1
        self._readahead_bytes -= (fetch.last - fetch.first + 1) * self.block_size
        wasted = 0
        for index in fetch.whole:  # cut short: its unread blocks never landed
            key = fetch.key(index)
            if self._ahead.get(key) == 0:
                del self._ahead[key]
                wasted += fetch.received(index)
        self._wasted(wasted)

    def block_landed(self, key: BlockKey, size: int) -> None:
        """A fetched block is in memory: if it was fetched ahead and is unread, it
        counts as unread read-ahead until a reader takes it or memory evicts it."""
        if self._ahead.get(key) != 0:
            return
        if self.tiers.memory.contains(key):
            self._ahead[key] = size
            self._unread(size)
        else:  # memory did not keep it (a file tier may have): not followed further
            del self._ahead[key]

    def _taken(self, key: BlockKey) -> int:
        """The block is no longer followed as read-ahead (a reader read it, or it left
        memory): the bytes it held unread in memory, now no longer counted there."""
        size = self._ahead.pop(key, None)
        if size:
            self._unread(-size)
        return size or 0

    def _evicted(self, key: BlockKey, size: int) -> None:
        self._wasted(self._taken(key))  # fetched ahead, in memory, never read

    def version_dropped(self, version: Version) -> None:
        """Its blocks are gone from the tiers (the version changed upstream): those
        fetched ahead and unread were fetched for nothing."""
        for key in [k for k in self._ahead if k.version == version]:
            self._wasted(self._taken(key))

    def _wasted(self, size: int) -> None:
        if size:
            self._metrics.readahead_wasted_bytes.inc(size)

    def _unread(self, change: int) -> None:
        self.unread_bytes += change
        self._metrics.readahead_unread_bytes.set(self.unread_bytes)

    def _moov(self, meta: ObjectMeta) -> mp4.Box | None:
        """The `moov` of a faststart MP4 whose block 0 is in memory (as it is by the time
        a read asks for read-ahead); None for any other object, or while not known."""
        version: Version = (self.bucket, meta.key, meta.etag)
        if version in self._indexes:
            return self._indexes[version]
        head = self.tiers.memory.get(BlockKey(self.bucket, meta.key, meta.etag, 0))
        if head is None:
            return None  # not known yet: no guess
        moov = self._indexes[version] = mp4.index_at_start(head, meta.size)
        return moov

    def _media_start(self, meta: ObjectMeta, moov: mp4.Box) -> int | None:
        """Where the media after `moov` begins, once the block holding the headers after
        the `moov` is in memory (Mist's walk reads them before its media readers come)."""
        version: Version = (self.bucket, meta.key, meta.etag)
        if version in self._media:
            return self._media[version]
        index = moov.end // self.block_size
        data = self.tiers.memory.get(BlockKey(self.bucket, meta.key, meta.etag, index))
        if data is None:
            return None
        media = self._media[version] = mp4.media_start(
            moov, data, index * self.block_size, meta.size
        )
        return media

    def _at_media(self, meta: ObjectMeta, start: int) -> bool:
        """A read from where a faststart MP4's media begins is a media reader: Mist's
        greedy readers start there, and its box walk reads the `mdat`'s header instead."""
        moov = self._moov(meta) if start else None
        return moov is not None and start == self._media_start(meta, moov)

    def _startup(self, meta: ObjectMeta, start: int) -> tuple[int, bool] | None:
        """The start-up read-ahead of a read beginning at `start`: the last block it
        reaches, and whether it is kept when the reader hangs up. A `moov` reader's goes
        `startup_blocks` past the `moov`, kept: Mist hangs up once it has the `moov`
        and opens its media readers, which then find their first blocks on the way. A
        media reader's goes the widest window (`cache.readahead_max_blocks`) past its
        first block: Mist's greedy readers take some 78 MB of media whatever the asset,
        so it needs no growing into, and an origin far away costs one round trip for it,
        not one per doubling. It is not kept: a probing client (ffprobe) that hangs up
        there stops it. None for any other read."""
        moov = self._moov(meta) if start else None
        if moov is None:
            return None
        if moov.offset == start:
            first, blocks, keep = (moov.end - 1) // self.block_size, self.startup_blocks, True
        elif start == self._media_start(meta, moov):
            first, blocks, keep = start // self.block_size, self._config.readahead_max_blocks, False
        else:
            return None
        return min(first + blocks, last_block(meta.size, self.block_size)), keep

    def _measured(self, seconds: float) -> None:
        self.latency_s += (seconds - self.latency_s) * LATENCY_WEIGHT

    async def open(
        self,
        meta: ObjectMeta,
        start: int,
        end: int,
        *,
        open_ended: bool,
        history: ReadHistory | None = None,
        probe: bool = True,
        readahead: bool = True,
        stats: ReadStats | None = None,
        spans: bool = False,
    ) -> AsyncGenerator[Block | memoryview | BlockSpan, None]:
        """See `ObjectStore.open`."""
        if end < start:
            return
        stats = stats if stats is not None else ReadStats()
        bs = self.block_size
        version: Version = (self.bucket, meta.key, meta.etag)
        last_needed = end // bs
        # An open-ended read (Mist's, at every seek) is held: no GET past its first block
        # or probe until the seek grace after its first bytes went out; but a media
        # reader streams from its first block.
        at_once = open_ended and self._at_media(meta, start)
        progress = _Progress(held=probe and open_ended and not at_once)
        previous = history.last(version) if history is not None else None
        floor = self._config.readahead_blocks if readahead else 0
        ahead = self._window(history, version, previous, start // bs, floor)
        attached: list[Fetch] = []
        completed = False
        unsent: BlockSpan | None = None  # a span of a block file taken, not yet yielded
        peers_known: set[BlockKey] = set()  # blocks a peer's files held, when asked before
        try:
            for index in block_span(start, end, bs):
                for passed in [f for f in attached if f.last < index]:
                    attached.remove(passed)  # passed it: let its blocks go
                    passed.detach()
                first_byte, last_byte = block_bounds(index, bs, meta.size)
                lo, hi = max(start, first_byte) - first_byte, min(end, last_byte) - first_byte
                key = BlockKey(self.bucket, meta.key, meta.etag, index)
                sequential = at_once or plan.is_sequential(index, start // bs, previous)
                # a block in memory is served at once: `next_step` of a cached block is Serve
                data: Block | BlockSpan | None
                data, source = self.tiers.memory_hit(key), "memory"
                if data is None:
                    whole = spans and lo == 0 and hi == last_byte - first_byte
                    data, source = await self.tiers.lookup(key, whole)
                    if isinstance(data, BlockSpan):
                        unsent = data  # closed below unless it is handed on
                state_of: plan.StateOf | None = None
                if data is None:
                    state_of = await self._ahead_state(meta, index, True, peers_known)
                probed_here = False
                while data is None and lo <= hi:  # until it is in the cache, or read from S3
                    assert state_of is not None  # asked above, as the block was missing
                    progress.update(self.seek_grace_s)
                    reader = plan.Reader(
                        index=index,
                        lo=lo,
                        hi=hi,
                        block_last=last_byte - first_byte,
                        open_ended=open_ended,
                        sequential=sequential,
                        held=progress.held,
                        sent=bool(progress.first_out),
                        probed_here=probed_here,
                    )
                    state = plan.BlockState(
                        cached=False, fetching=key in self.fetches, probed=key in self._probed
                    )
                    step = plan.next_step(
                        reader, state, state_of, self._config.readahead_blocks, last_needed
                    )
                    if isinstance(step, plan.Probe):
                        stats.took("upstream")
                        async with aclosing(self._probe(meta, key, lo, step.stop)) as chunks:
                            async for chunk in _timed(chunks, stats):
                                progress.sent()
                                yield chunk
                        lo, probed_here = step.stop + 1, True
                        data, source = self.tiers.memory.get(key), "memory"  # may have landed
                        continue
                    if isinstance(step, plan.WaitGrace):
                        await asyncio.sleep(progress.grace_left(self.seek_grace_s))
                        progress.held = False
                        data, source = self.tiers.memory.get(key), "memory"
                        continue
                    assert not isinstance(step, plan.Serve)  # it is not cached
                    # the block is read now: it counts for this connection's history
                    if history is not None:
                        history.read(version, index)
                    fetch = self._fetch_for(meta, key, index, step)
                    if fetch not in attached:
                        fetch.attach()
                        attached.append(fetch)
                    # read-ahead after its own fetch has its blocks
                    if floor and plan.wants_readahead(reader):
                        # it waited on S3 for this block: the window was too small
                        window = ahead.next(True)
                        attached += self._ahead_of(meta, start, index, state_of, window)
                    stats.took("upstream")
                    self._taken(key)
                    asked = time.monotonic()
                    async with aclosing(fetch.read(index, lo, hi)) as pieces:
                        async for piece in _timed(pieces, stats):
                            if asked and isinstance(step, plan.StartFetch):
                                self._measured(time.monotonic() - asked)
                            asked = 0.0
                            progress.sent()
                            ahead.served += len(piece)
                            yield piece
                    lo = hi + 1
                if data is None or lo > hi:
                    continue  # read from S3 (or probed to its end)
                # served from the cache
                progress.update(self.seek_grace_s)
                if history is not None:
                    history.read(version, index)
                stats.took(source)
                if floor and sequential and not progress.held:  # plan.wants_readahead
                    if state_of is None:
                        state_of = await self._ahead_state(meta, index, True, peers_known)
                    window = ahead.next(False)
                    attached += self._ahead_of(meta, start, index, state_of, window)
                self._taken(key)
                ahead.served += hi - lo + 1
                progress.sent()
                if isinstance(data, BlockSpan):
                    unsent = None
                    yield data  # whole: the reader sends and closes it
                else:
                    yield memoryview(data)[lo : hi + 1] if (lo, hi + 1) != (0, len(data)) else data
            completed = True
        finally:
            if unsent is not None:
                unsent.close()
            _finish(attached, completed, ahead, history, version, floor)

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
        """What `open` yields when every block of start..end is in memory, taken at once
        (no await): the same hits, history, statistics and read-ahead. None, with nothing
        changed, when a block is not in memory or its read-ahead would need a file tier
        shared with peers (asking it is I/O). Call `MemoryRead.done` once the bytes are
        out, or the client has gone."""
        if end < start:
            return None
        bs, bucket, name, etag = self.block_size, self.bucket, meta.key, meta.etag
        version: Version = (bucket, name, etag)
        first, last = start // bs, end // bs
        keys = [BlockKey(bucket, name, etag, i) for i in range(first, last + 1)]
        contains = self.tiers.memory.contains
        for key in keys:
            if not contains(key):
                return None
        previous = history.last(version) if history is not None else None
        floor = self._config.readahead_blocks
        # as in `open`: an open-ended read is held (no read-ahead) through its first
        # bytes; another reads ahead at each block where it is sequential, so at its
        # last block if at any
        streams = floor > 0 and not open_ended
        if streams and self.tiers.disk_peers and plan.is_sequential(last, first, previous):
            return None
        ahead = self._window(history, version, previous, first, floor)
        state_of: plan.StateOf | None = None  # made at the first read-ahead
        attached: list[Fetch] = []
        read = MemoryRead(lambda done: _finish(attached, done, ahead, history, version, floor))
        views = read.views
        for index, key in zip(range(first, last + 1), keys, strict=True):
            data = self.tiers.memory_hit(key)
            assert data is not None  # contains() above, and nothing ran since
            first_byte, last_byte = block_bounds(index, bs, meta.size)
            lo, hi = max(start, first_byte) - first_byte, min(end, last_byte) - first_byte
            if history is not None:
                history.read(version, index)
            stats.took("memory")
            if streams and plan.is_sequential(index, first, previous):
                if state_of is None:
                    state_of = self._state_of(meta, frozenset())
                window = ahead.next(False)
                attached += self._ahead_of(meta, start, index, state_of, window)
            self._taken(key)
            ahead.served += hi - lo + 1
            views.append(memoryview(data)[lo : hi + 1])
        return read

    def _window(
        self,
        history: ReadHistory | None,
        version: Version,
        previous: int | None,
        first: int,
        floor: int,
    ) -> _Window:
        """A read's window: a connection that goes on where it left off (its `previous`
        block is the one before `first`) keeps its window; a seek starts over."""
        kept = history.window(version) if history is not None else None
        return _Window(self, kept if kept is not None and previous == first - 1 else floor)

    async def _ahead_state(
        self, meta: ObjectMeta, index: int, ask_peers: bool, peers_known: set[BlockKey]
    ) -> plan.StateOf:
        """What the cache knows of the blocks after `index`; blocks a peer keeps on disk
        are not fetched again (a stat, in a thread, asked only when it can matter)."""
        held: frozenset[BlockKey] = frozenset()
        if self.tiers.disk_peers and ask_peers:
            held = await self.tiers.peer_held(
                [
                    BlockKey(self.bucket, meta.key, meta.etag, i)
                    for i in range(index + 1, index + self._config.readahead_blocks + 1)
                ]
            )
        return self._state_of(meta, held, peers_known)

    def _state_of(
        self,
        meta: ObjectMeta,
        peer_held: frozenset[BlockKey],
        peers_known: set[BlockKey] | None = None,
    ) -> plan.StateOf:
        """`peers_known`: see `Tiers.has`, kept for one read."""

        def state_of(index: int) -> plan.BlockState:
            key = BlockKey(self.bucket, meta.key, meta.etag, index)
            fetching = key in self.fetches
            # a block in flight is not looked up (a stat of each peer's file, for every
            # block of a window each time a block is served): joining it serves it too
            return plan.BlockState(
                cached=(not fetching and self.tiers.has(key, peers_known)) or key in peer_held,
                fetching=fetching,
                probed=key in self._probed,
            )

        return state_of

    def _fetch_for(
        self, meta: ObjectMeta, key: BlockKey, index: int, step: plan.Join | plan.StartFetch
    ) -> Fetch:
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

    async def _probe(
        self, meta: ObjectMeta, key: BlockKey, lo: int, hi: int
    ) -> AsyncGenerator[memoryview, None]:
        """Bytes lo..hi of block `key` straight from S3, not cached; marks it probed."""
        self._probed[key] = True
        first_byte = key.block * self.block_size
        fetch = self._new_fetch(meta, first_byte + lo, first_byte + hi)
        fetch.start_in(None)  # it covers no whole block: nothing to claim or cache
        fetch.attach()
        completed = False
        try:
            async with aclosing(fetch.read(key.block, lo, hi)) as pieces:
                async for piece in pieces:
                    yield piece
            completed = True
        finally:
            fetch.detach(abandoned=not completed)

    def _ahead_of(
        self, meta: ObjectMeta, start: int, index: int, state_of: plan.StateOf, window: int
    ) -> list[Fetch]:
        """Read-ahead after block `index` of a read that began at `start`: the reader's
        window; for a `moov` or media reader short of its start-up read-ahead's reach,
        through it (see `_startup`), and the rest of a wider window beyond, as usual."""
        startup = self._startup(meta, start)
        if startup is None or index >= startup[0]:
            return self._read_ahead(meta, index + 1, state_of, window)
        reach, keep = startup
        started = self._read_ahead(meta, index + 1, state_of, reach - index, keep)
        if window > reach - index:
            started += self._read_ahead(meta, reach + 1, state_of, window - (reach - index))
        return started

    def _read_ahead(
        self,
        meta: ObjectMeta,
        after: int,
        state_of: plan.StateOf,
        window: int,
        keep: bool = False,
    ) -> list[Fetch]:
        """Fetch the next `window` blocks that nobody has or is fetching, within the
        process-wide budget of read-ahead bytes in flight. The fetches started come back
        attached to the reader: they stop if it hangs up before anyone else joins, unless
        `keep`."""
        started: list[Fetch] = []
        if window == 0 or meta.size == 0:
            return started
        runs = plan.readahead_runs(
            after,
            window,
            last_block(meta.size, self.block_size),
            state_of,
            self._readahead_inflight,
            self._config.readahead_max_inflight,
            min_run=max(1, window // 4),
        )
        for first, last in runs:
            room = (self.readahead_budget - self._readahead_bytes) // self.block_size
            last = min(last, first + room - 1)
            if last < first:
                break
            end = block_bounds(last, self.block_size, meta.size)[1]
            fetch = self._new_fetch(meta, first * self.block_size, end, keep=keep, background=True)
            if fetch.start_in(self.fetches):
                self._readahead_inflight += 1
                self._readahead_bytes += (last - first + 1) * self.block_size
                self._metrics.readahead_blocks.inc(last - first + 1)
                for index in range(first, last + 1):
                    self._ahead[BlockKey(self.bucket, meta.key, meta.etag, index)] = 0
                fetch.attach()
                started.append(fetch)
        return started


class MemoryRead:
    """The pieces of a read served from memory at once, and what ends it."""

    def __init__(self, finish: Callable[[bool], None]) -> None:
        self.views: list[memoryview] = []
        self._finish: Callable[[bool], None] | None = finish

    def done(self, completed: bool) -> None:
        """The read is over (`completed`: every byte went out); read-ahead it started
        stops when the client left early, as an abandoned `open` does. Idempotent."""
        finish, self._finish = self._finish, None
        if finish is not None:
            finish(completed)


def _finish(
    attached: list[Fetch],
    completed: bool,
    ahead: _Window,
    history: ReadHistory | None,
    version: Version,
    floor: int,
) -> None:
    """The end of a read: its fetches let go (stopped when it ended early and nobody
    else reads them), its window kept for the connection's next read."""
    for fetch in attached:
        fetch.detach(abandoned=not completed)
    ahead.close()
    if history is not None and floor:
        history.keep_window(version, ahead.blocks)


class _Window:
    """One read's read-ahead window, and what sizes it: the bytes it has taken since it
    began streaming. While it streams it counts among the readers sharing the budget."""

    def __init__(self, reads: Reads, blocks: int) -> None:
        self._reads = reads
        self.blocks = blocks
        self.served = 0
        self._began: float | None = None

    def next(self, waited: bool) -> int:
        """The window for the next read-ahead (`waited`: this block came from S3)."""
        reads = self._reads
        if self._began is None:
            self._began = time.monotonic()
            reads._streams += 1
        elapsed = time.monotonic() - self._began
        self.blocks = plan.readahead_window(
            self.blocks,
            reads._config.readahead_blocks,
            reads._config.readahead_max_blocks,
            waited=waited,
            rate_bps=self.served / elapsed if elapsed > MIN_RATE_S else 0.0,
            latency_s=reads.latency_s,
            block_size=reads.block_size,
            share=max(1, reads.readahead_budget // reads.block_size // max(1, reads._streams)),
        )
        return self.blocks

    def close(self) -> None:
        if self._began is not None:
            self._reads._streams -= 1
            self._began = None


async def _timed(
    pieces: AsyncGenerator[memoryview, None], stats: ReadStats
) -> AsyncGenerator[memoryview, None]:
    """The pieces, adding the time spent waiting for each (on S3) to `stats`."""
    while True:
        asked = time.monotonic()
        try:
            piece = await anext(pieces)
        except StopAsyncIteration:
            return
        finally:
            stats.upstream_s += time.monotonic() - asked
        yield piece
