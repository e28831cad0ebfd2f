"""Object metadata: fresh for `cache.metadata_ttl_s`, then revalidated, never refetched.

An entry is the version last seen of a key (or a small marker that the key was
missing) and until when it is fresh. An expired entry is kept (LRU-bounded, in entries
and in bytes): its ETag is what the next look-up revalidates with. Concurrent
look-ups of one key share one upstream request. When a key turns out to have a new
version (or to be gone), `on_replaced` hears of the old one, so its blocks go.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from cachetools import LRUCache

from ..errors import AssetNotFound
from ..upstream import ObjectMeta

T = TypeVar("T")

MAX_ENTRIES = 65536
ENTRY_OVERHEAD = 512  # bytes counted per entry besides its key: entries x this <= bound
MAX_BYTES = MAX_ENTRIES * ENTRY_OVERHEAD


@dataclass(slots=True)
class _Entry:
    meta: ObjectMeta | None  # None: the key was missing
    fresh_until: float
    cost: int


class MetadataCache:
    def __init__(
        self,
        ttl_s: float,
        on_replaced: Callable[[ObjectMeta], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_s
        self._on_replaced = on_replaced
        self._clock = clock
        self._entries: LRUCache[str, _Entry] = LRUCache(
            maxsize=MAX_BYTES, getsizeof=lambda e: e.cost
        )
        self._lookups: dict[str, asyncio.Task[Any]] = {}

    def fresh(self, key: str) -> ObjectMeta | None:
        """The current version if known and fresh; raises AssetNotFound if the key was
        missing and that is still fresh; None when a look-up is needed."""
        entry = self._entries.get(key)
        if entry is None or self._clock() >= entry.fresh_until:
            return None
        if entry.meta is None:
            raise AssetNotFound("object not found")
        return entry.meta

    def seen(self, key: str) -> bool:
        """Whether the key was ever looked up (found or missing, fresh or not)."""
        return key in self._entries

    def known(self, key: str) -> ObjectMeta | None:
        """The version last seen, fresh or not (None if none, or it was missing)."""
        entry = self._entries.get(key)
        return entry.meta if entry is not None else None

    def remember(self, meta: ObjectMeta) -> ObjectMeta:
        previous = self.known(meta.key)
        if previous is not None and previous.etag != meta.etag:
            self._on_replaced(previous)
        self._set(meta.key, meta)
        return meta

    def still_current(self, meta: ObjectMeta) -> ObjectMeta:
        """S3 said 304 to If-None-Match with this version: fresh again."""
        self._set(meta.key, meta)
        return meta

    def missing(self, key: str) -> None:
        previous = self.known(key)
        if previous is not None:
            self._on_replaced(previous)
        self._set(key, None)

    def forget(self, meta: ObjectMeta) -> None:
        """The version is gone or untrustworthy: forget it if it is still the one known."""
        entry = self._entries.get(meta.key)
        if entry is not None and entry.meta is not None and entry.meta.etag == meta.etag:
            del self._entries[meta.key]

    def invalidate(self, key: str) -> None:
        """Look it up afresh next time (warm-up after prepare; a sidecar just written)."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.fresh_until = 0.0

    def _set(self, key: str, meta: ObjectMeta | None) -> None:
        self._entries[key] = _Entry(meta, self._clock() + self._ttl, ENTRY_OVERHEAD + len(key))

    async def shared(self, key: str, look_up: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """The first asker runs `look_up`; concurrent askers of the key wait for it."""
        task = self._lookups.get(key)
        if task is None:
            task = asyncio.ensure_future(look_up())
            self._lookups[key] = task
            task.add_done_callback(lambda done: self._done(key, done))
        result: T = await asyncio.shield(task)
        return result

    def _done(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._lookups.get(key) is task:
            del self._lookups[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def close(self) -> None:
        tasks = list(self._lookups.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
