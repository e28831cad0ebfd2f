"""The cache tiers behind the store: memory, then a file tier (disk, or shared memory
between workers), with their metrics and the bounded queue of file writes.

- A look-up tries memory, then the file tier; the file tier is asked (in a thread, for
  disk) only when its index holds the block or peers might.
- A block read back from the file tier is never written to it again. One sent whole
  goes out from its file (`sendfile`) and is not copied into memory, unless it is asked
  for again soon after (see `lookup`).
- With `write_through` (several workers), every block fetched goes to the file tier at
  once, so the other workers find it; otherwise a block goes there when memory evicts it.
- Writes in flight are bounded: a file tier slower than the eviction rate must not pile
  blocks up in memory. What is dropped is counted.
- A write to tmpfs is done inline, like a read there: it is a copy, and in a thread
  the hand-offs of the interpreter lock with the event loop cost more than the copy
  (54 futex calls per block written).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from cachetools import LRUCache

from ..config import CacheConfig
from ..metrics import Metrics
from ..upstream import ObjectMeta
from .blockfile import BlockSpan
from .blocks import Block, BlockKey, Version
from .disk import FileTier
from .memory import MemoryTier

log = logging.getLogger("s3proxy.store")

MAX_PENDING_WRITES = 16


class Tiers:
    def __init__(
        self,
        memory_bytes: int,
        files: FileTier | None,
        metrics: Metrics,
        *,
        write_through: bool = False,
    ) -> None:
        self._metrics = metrics
        self.memory = MemoryTier(memory_bytes, on_evict=self._evicted)
        self.on_evict: Callable[[BlockKey, int], None] | None = None  # told of each eviction
        self.files = files
        self._write_through = write_through and files is not None
        self._on_file: set[BlockKey] = set()  # blocks in memory a file already holds
        self._versions: LRUCache[Version, ObjectMeta] = LRUCache(maxsize=65536)
        self._writes: set[asyncio.Future[None]] = set()
        # blocks sent from their files lately: asked again, a block is read into memory
        # (as many as memory holds, and at least 64)
        sent_kept = memory_bytes // files.block_size if files is not None else 0
        self._sent_from_file: LRUCache[BlockKey, None] = LRUCache(maxsize=max(64, sent_kept))
        metrics.cache_max_bytes.labels(tier="memory").set(self.memory.max_bytes)
        if files is not None:
            metrics.cache_max_bytes.labels(tier=files.tier).set(files.max_bytes)

    async def start(self) -> None:
        if self.files is not None:
            await asyncio.to_thread(self.files.load_index)

    async def known_version(self, key: str) -> ObjectMeta | None:
        """The version of `key` whose blocks the file tier keeps (this worker's, from
        before a restart, or another worker's): to revalidate, not to fetch again."""
        if self.files is None:
            return None
        if self.files.inline:
            return self.files.find_version(key)
        return await asyncio.to_thread(self.files.find_version, key)

    async def holds(self, key: BlockKey) -> bool:
        """Whether a tier of this worker or a peer's file tier holds the block."""
        # `has` looks at peers on tmpfs itself; `peer_held` at peers on disk
        return self.has(key) or key in await self.peer_held([key])

    @property
    def disk_peers(self) -> bool:
        """Whether other workers keep blocks on disk, where only a stat tells."""
        return self.files is not None and bool(self.files.peers) and not self.files.inline

    async def peer_held(self, keys: list[BlockKey]) -> frozenset[BlockKey]:
        """Which of `keys` only a peer's disk files hold (one thread call for them all;
        nothing to ask without peers, or on tmpfs, where `has` looks itself)."""
        files = self.files
        if files is None or not files.peers or files.inline:
            return frozenset()
        missing = [key for key in keys if not self.has(key)]
        if not missing:
            return frozenset()
        return frozenset(
            await asyncio.to_thread(lambda: [key for key in missing if files.peer_holds(key)])
        )

    def has(self, key: BlockKey, peers_known: set[BlockKey] | None = None) -> bool:
        """Whether a tier holds the block, without using it (LRU order unchanged). A
        peer's shared-memory files count (a lookup there is a stat, not I/O).

        `peers_known`: blocks a peer's files held when asked before (by one read, whose
        plan asks after every block of its window each time it serves one): each is
        looked up once, not once a block served (12 stats a block, before). A peer's
        file going meanwhile costs only that the block is fetched when it is read."""
        if self.memory.contains(key):
            return True
        files = self.files
        if files is None:
            return False
        if files.contains(key):
            return True
        if not files.inline:
            return False
        if peers_known is not None and key in peers_known:
            return True
        held = files.peer_holds(key)
        if held and peers_known is not None:
            peers_known.add(key)
        return held

    def memory_hit(self, key: BlockKey) -> Block | None:
        """The block when memory has it (counted as a memory hit), else None."""
        data = self.memory.get(key)
        if data is not None:
            self._metrics.child(self._metrics.cache_hits, "memory").inc()
        return data

    async def lookup(
        self, key: BlockKey, whole: bool = False
    ) -> tuple[Block | BlockSpan | None, str]:
        """The block from memory, else from the file tier (counted per tier), else None;
        and where it came from: `memory`, `disk` (any file tier) or `upstream` (None).

        `whole`: the block is to be sent whole, so a file tier's hit comes as a span of
        its file, sent from there; the first time it is not copied into memory, so a
        stream's blocks, read once, do not crowd out of memory the blocks the worker
        fetched. A block asked for again soon after (hot), or only in part (a small
        range, likely asked again), is read and kept in memory as well, where the fast
        lane answers it next time."""
        data = self.memory_hit(key)
        if data is not None:
            return data, "memory"
        self._metrics.child(self._metrics.cache_misses, "memory").inc()
        if self.files is None:
            return None, "upstream"
        again = key in self._sent_from_file
        self._sent_from_file.pop(key, None)
        found = await self.files.get(key, whole, keep=again)
        if isinstance(found, BlockSpan):
            self._metrics.cache_hits.labels(tier=self.files.tier).inc()
            if found.data is None:
                self._sent_from_file[key] = None
            else:  # asked again: sent from the file all the same, and kept in memory
                self._keep(key, found.data)
                found.data = None
            return found, "disk"
        if found is None:
            landed = self.memory.get(key)  # a fetch may have finished it meanwhile
            if landed is not None:
                return landed, "memory"
            self._metrics.cache_misses.labels(tier=self.files.tier).inc()
            return None, "upstream"
        self._metrics.cache_hits.labels(tier=self.files.tier).inc()
        self._keep(key, found)
        return found, "disk"

    def _keep(self, key: BlockKey, data: Block) -> None:
        """A block read from the file tier goes to memory too (not written back)."""
        self._on_file.add(key)
        self.memory.put(key, data)
        self._publish()

    def put(self, key: BlockKey, data: Block, meta: ObjectMeta) -> None:
        """A block fetched from upstream."""
        self._versions[key.version] = meta
        if self._write_through:
            self._on_file.add(key)  # written now: not again when memory evicts it
            self._write(key, data, meta)
        self.memory.put(key, data)
        self._publish()

    async def share(self, keys: list[BlockKey]) -> None:
        """Make sure these blocks (in memory now) are in the file tier as well, whatever
        the bound on writes in flight dropped: warm-up loads what every worker reads."""
        if not self._write_through:
            return
        assert self.files is not None
        await asyncio.gather(*list(self._writes), return_exceptions=True)
        for key in keys:
            data, meta = self.memory.get(key), self._versions.get(key.version)
            if data is None or meta is None or self.files.contains(key):
                continue
            if self.files.inline:
                self.files.write(key, data, meta)
            else:
                await asyncio.to_thread(self.files.write, key, data, meta)
            self._on_file.add(key)

    def _evicted(self, key: BlockKey, data: Block) -> None:
        self._metrics.cache_evictions.labels(tier="memory").inc()
        if self.on_evict is not None:
            self.on_evict(key, len(data))
        on_file = key in self._on_file
        self._on_file.discard(key)
        if self.files is None or on_file or self.files.contains(key):
            return
        meta = self._versions.get(key.version)
        if meta is not None:
            self._write(key, data, meta)

    def _write(self, key: BlockKey, data: Block, meta: ObjectMeta) -> None:
        assert self.files is not None
        if self.files.inline:
            self.files.write(key, data, meta)
            return
        if len(self._writes) >= MAX_PENDING_WRITES:
            self._metrics.cache_disk_writes_dropped.inc()
            return
        self._track(asyncio.ensure_future(asyncio.to_thread(self.files.write, key, data, meta)))

    def _track(self, task: asyncio.Future[None]) -> None:
        self._writes.add(task)
        task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Future[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cache tier write failed", exc_info=task.exception())
        if self.files is not None:
            self._metrics.cache_bytes.labels(tier=self.files.tier).set(self.files.used_bytes)

    def drop_version(self, version: Version) -> None:
        """Forget every block of a version that is gone upstream."""
        self.memory.drop_version(version)
        self._on_file = {k for k in self._on_file if k.version != version}
        self._versions.pop(version, None)
        if self.files is not None:
            if self.files.inline:
                self.files.drop_version(version)
            else:
                self._track(
                    asyncio.ensure_future(asyncio.to_thread(self.files.drop_version, version))
                )
        self._publish()

    async def close(self) -> None:
        """Wait for the writes in flight (a thread can not be cancelled anyway)."""
        await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _publish(self) -> None:
        self._metrics.cache_bytes.labels(tier="memory").set(self.memory.used_bytes)


SHM = "/dev/shm"  # tmpfs: a file read there is a copy, not I/O
# With several workers and no disk tier, each worker keeps this share of
# cache.max_bytes in its own memory; the rest is the shared tier all of them read.
SHARED_MEMORY_FRACTION = 4


def build_tiers(
    cache: CacheConfig,
    metrics: Metrics,
    bucket: str,
    worker: int,
    workers: int,
    shared_dir: str | None,
) -> Tiers:
    """The tiers of one worker; the configured byte bounds hold for the group.

    One worker: memory, then the disk tier if set (written on eviction). Several: the
    disk tier, or else a tier in shared memory (`shared_dir`, on tmpfs), is written as
    blocks arrive and read by every worker, so a block fetched by one is a hit for all;
    each worker's own memory then holds its share (a quarter of it without a disk tier).
    """
    total = int(cache.max_bytes)
    if cache.disk.path and cache.disk.max_bytes > 0:
        files = FileTier(
            cache.disk.path,
            int(cache.disk.max_bytes) // workers,
            metrics,
            bucket=bucket,
            block_size=int(cache.block_size),
            tier="disk",
            worker=worker,
            workers=workers,
        )
        return Tiers(total // workers, files, metrics, write_through=workers > 1)
    if workers > 1 and shared_dir:
        memory = total // (SHARED_MEMORY_FRACTION * workers)
        files = FileTier(
            shared_dir,
            (total - memory * workers) // workers,
            metrics,
            bucket=bucket,
            block_size=int(cache.block_size),
            tier="shared",
            worker=worker,
            workers=workers,
            inline=shared_dir.startswith(SHM + "/"),
        )
        return Tiers(memory, files, metrics, write_through=True)
    return Tiers(total // workers, None, metrics)
