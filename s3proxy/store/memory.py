"""The memory tier: whole blocks in an LRU bounded in bytes (counted by len, not entries)."""

from __future__ import annotations

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
