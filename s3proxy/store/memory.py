"""The memory tier: whole blocks in an LRU bounded in bytes (counted by len, not entries),
and the process-wide heap set-up that lets its blocks reuse memory (`preallocate`)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from cachetools import LRUCache

from .blocks import Block, BlockKey, Version

OnEvict = Callable[[BlockKey, Block], None]


class _BytesLRU(LRUCache[BlockKey, Block]):
    """cachetools' LRU sized by len(); reports what it evicts."""

    def __init__(self, max_bytes: int, on_evict: OnEvict) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=len)
        self._on_evict = on_evict

    def popitem(self) -> tuple[BlockKey, Block]:
        key, value = super().popitem()
        self._on_evict(key, value)
        return key, value


class MemoryTier:
    """Blocks in memory; never holds more than `max_bytes` of block data."""

    def __init__(self, max_bytes: int, on_evict: OnEvict | None = None) -> None:
        self.max_bytes = max_bytes
        self._evicted: OnEvict = on_evict or (lambda k, v: None)
        self._lru = _BytesLRU(max_bytes, self._evicted) if max_bytes > 0 else None

    @property
    def used_bytes(self) -> int:
        return int(self._lru.currsize) if self._lru is not None else 0

    def contains(self, key: BlockKey) -> bool:
        """Whether the block is here, without counting as a use (LRU order unchanged)."""
        return self._lru is not None and key in self._lru

    def get(self, key: BlockKey) -> Block | None:
        return self._lru.get(key) if self._lru is not None else None

    def put(self, key: BlockKey, data: Block) -> None:
        if self._lru is None or len(data) > self.max_bytes:
            self._evicted(key, data)  # too big to keep here: straight to the next tier
            return
        self._lru[key] = data

    def drop_version(self, version: Version) -> int:
        """Forget every block of one object version (it changed upstream)."""
        if self._lru is None:
            return 0
        stale = [k for k in self._lru if k.version == version]
        for key in stale:
            del self._lru[key]
        return len(stale)


# glibc's mallopt parameters (malloc.h) and its largest mmap threshold on 64-bit systems
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20


def preallocate(max_bytes: int, block_size: int) -> bool:
    """Make this process hold `max_bytes` of touched heap for blocks before the first is
    cached; False (and nothing changed) where that can not be done: not glibc, or blocks
    too large for glibc's heap. Called once per serving process, never by the app.

    Each block is one malloc'd `bytes`. glibc serves an allocation that large with a
    fresh mmap and unmaps it when freed, so every block a new process caches faults in
    block_size / 4096 new pages (0.7 ms per MiB in a virtual machine: most of the CPU of
    a cold read). With the mmap threshold above the block size and trimming off, blocks
    come from the heap and a freed block's memory serves the next one; touching
    `max_bytes` of it once here (and freeing it) means the first blocks cached find
    their pages in place, as they do in a process whose cache has been full for a while.
    The process then holds the memory tier's bytes from the start, which it would come
    to hold anyway, and does not give memory back to the system."""
    threshold = min(MMAP_THRESHOLD_MAX, max(4 << 20, 2 * block_size))
    if max_bytes < block_size or block_size + (64 << 10) > threshold:
        return False
    libc = ctypes.CDLL(None)  # the C library the interpreter runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # musl's mallopt does nothing
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not mallopt(M_MMAP_THRESHOLD, threshold):
        return False
    mallopt(M_TRIM_THRESHOLD, -1)  # never trimmed: -1 is "unsigned long max" to glibc
    held = [bytearray(block_size) for _ in range(max_bytes // block_size)]  # each page written
    del held
    return True
