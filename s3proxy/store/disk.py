"""A file tier: blocks kept in files bounded in bytes (LRU), on disk or in shared memory.

Layout: `{root}/w{worker}/{h[:2]}/{h}/{index}.blk`, h = hash of (bucket, key, ETag, block
size), so a
version's blocks sit in one directory; `{root}/w{worker}/keys/{k[:2]}/{k}.json`, k = hash
of (bucket, key), holds the metadata of the version whose blocks the worker keeps, so a
restart (or another worker) revalidates what is held instead of fetching it again. Each
block file is a 20-byte header (magic, checksum, length) then the block; a file whose
length or checksum does not match is deleted and counted, never served (it is checked
on every read; a block sent whole then goes out from its file by `sendfile`). Files are
written under a temporary name and renamed, so a reader (or another worker) never sees
half a block. The index is rebuilt from the directory at start-up, oldest first.

With several workers each writes, evicts and deletes only in its own `w<N>` directory
(bounded by its share of the bytes), and reads the others' read-only: files are
immutable once renamed, and an unlinked file stays readable while open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from ..logs import LogBudget
from ..metrics import Metrics
from ..upstream import ObjectMeta
from .blockfile import (
    KEYS,
    SUFFIX,
    BlockSpan,
    file_size,
    key_file,
    open_span,
    read_block,
    read_meta,
    unlink,
    version_dir,
    write_block,
    write_meta,
)
from .blocks import Block, BlockKey, Version

log = logging.getLogger("s3proxy.disk")


class FileTier:
    """`inline`: the files live in memory (tmpfs), so reading one is a copy, not I/O,
    and is done on the event loop rather than in a thread."""

    def __init__(
        self,
        path: str,
        max_bytes: int,
        metrics: Metrics,
        *,
        bucket: str,
        block_size: int,
        tier: str,
        worker: int = 0,
        workers: int = 1,
        inline: bool = False,
    ) -> None:
        self.bucket = bucket
        self.block_size = block_size
        self._path, self._worker, self._workers = Path(path), worker, workers
        self.root = Path(path) / f"w{worker}"
        self.peers = [Path(path) / f"w{other}" for other in range(workers) if other != worker]
        self.max_bytes = max_bytes
        self.tier = tier
        self.inline = inline
        self._metrics = metrics
        self._index: OrderedDict[str, int] = OrderedDict()  # relative path -> file size
        self._per_version: Counter[str] = Counter()  # version directory -> blocks held
        self._key_files: dict[str, Path] = {}  # version directory -> its key's file
        self._bytes = 0
        self._lock = threading.Lock()  # the index is touched from worker threads
        # a tier that fails at every block (its file system full: Mist fills /dev/shm
        # too) must not log a line per block
        self._log_budget = LogBudget(per_second=1.0)

    def relative(self, key: BlockKey) -> str:
        return f"{self._version_dir(*key.version)}/{key.block}{SUFFIX}"

    def _version_dir(self, bucket: str, key: str, etag: str) -> str:
        return version_dir(bucket, key, etag, self.block_size)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def contains(self, key: BlockKey) -> bool:
        """Whether this worker's own files hold the block (no I/O)."""
        return self.relative(key) in self._index

    def load_index(self) -> None:
        """Rebuild the index from the files present (a restart keeps its hits)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._worker == 0:
            self._remove_strays()
        found: list[tuple[float, str, int]] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = os.path.join(dirpath, name)
                if ".tmp." in name:  # a write cut short by a crash
                    unlink(full)
                    continue
                if not name.endswith(SUFFIX):
                    continue
                try:
                    stat = os.stat(full)
                except FileNotFoundError:
                    continue
                found.append((stat.st_mtime, os.path.relpath(full, self.root), stat.st_size))
        found.sort()
        for path in (self.root / KEYS).glob("*/*.json"):
            meta = read_meta(path, self.bucket, None)
            if meta is not None:
                self._key_files[self._version_dir(self.bucket, meta.key, meta.etag)] = path
        with self._lock:
            self._index.clear()
            self._per_version.clear()
            self._bytes = 0
            for _mtime, relative, size in found:
                self._index[relative] = size
                self._per_version[os.path.dirname(relative)] += 1
                self._bytes += size
        self._evict_over_bound()
        self._publish()
        log.info(
            "cache tier ready",
            extra={
                "fields": {
                    "tier": self.tier,
                    "path": str(self.root),
                    "blocks": len(self._index),
                    "bytes": self._bytes,
                }
            },
        )

    def find_version(self, key: str) -> ObjectMeta | None:
        """The version of `key` whose blocks this worker or a peer keeps (the newest
        written, if they differ); a blocking call."""
        newest: tuple[float, ObjectMeta] | None = None
        for root in (self.root, *self.peers):
            path = root / key_file(self.bucket, key)
            try:
                written = path.stat().st_mtime
            except OSError:
                continue
            meta = read_meta(path, self.bucket, key)
            if meta is not None and (newest is None or written > newest[0]):
                newest = (written, meta)
        return newest[1] if newest is not None else None

    def peer_holds(self, key: BlockKey) -> bool:
        """Whether a peer's files hold the block (a blocking call)."""
        relative = self.relative(key)
        return any((peer / relative).exists() for peer in self.peers)

    async def get(
        self, key: BlockKey, whole: bool = False, keep: bool = False
    ) -> Block | BlockSpan | None:
        """The block from this worker's files or a peer's; None (no I/O at all) when
        there are no peers and the index does not hold it. `whole`: it is to be sent
        whole, so a span of its file will do (`keep`: with its bytes read)."""
        if not self.peers and not self.contains(key):
            return None
        if self.inline:
            return self.read(key, whole, keep)
        return await asyncio.to_thread(self.read, key, whole, keep)

    def read(
        self, key: BlockKey, whole: bool = False, keep: bool = False
    ) -> Block | BlockSpan | None:
        relative = self.relative(key)
        if relative in self._index:
            data = self._read_file(self.root, relative, own=True, whole=whole, keep=keep)
            if data is not None:
                with self._lock:
                    if relative in self._index:
                        self._index.move_to_end(relative)
                if not self.inline:
                    with contextlib.suppress(OSError):  # keeps LRU order across restarts
                        os.utime(self.root / relative)
                return data
        for peer in self.peers:
            data = self._read_file(peer, relative, own=False, whole=whole, keep=keep)
            if data is not None:
                return data
        return None

    def _read_file(
        self, root: Path, relative: str, own: bool, whole: bool, keep: bool
    ) -> Block | BlockSpan | None:
        full = root / relative
        try:
            # unbuffered: read in one copy (or none); a span keeps it open past this call
            handle = open(full, "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            if own:
                self._forget(relative)
            return None
        except OSError as exc:
            self._warn("cache tier read failed", {"error": exc.strerror})
            return None
        data: Block | BlockSpan | None = None
        try:
            data = open_span(handle, self.inline, keep) if whole else read_block(handle)
        except OSError as exc:
            self._warn("cache tier read failed", {"error": exc.strerror})
            return None
        finally:
            if not isinstance(data, BlockSpan):
                handle.close()
        if data is None:
            self._metrics.cache_corrupt_blocks.labels(tier=self.tier).inc()
            self._warn("discarding a corrupt block file", {"file": relative})
            if own:  # a peer's file is the peer's to delete
                unlink(str(full))
                self._forget(relative)
            return None
        return data

    def write(self, key: BlockKey, data: Block, meta: ObjectMeta) -> None:
        """Write one block (a blocking call: from a thread, or inline for tmpfs). A block
        already held is not written again."""
        relative = self.relative(key)
        if relative in self._index:
            return
        full = self.root / relative
        size = file_size(data)
        if size > self.max_bytes:
            return
        temporary = f"{full}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            directory = os.path.dirname(relative)
            if directory not in self._key_files:  # the version's first block
                path = self.root / key_file(self.bucket, meta.key)
                write_meta(path, self.bucket, meta)
                self._key_files[directory] = path
            write_block(temporary, data)
            os.replace(temporary, full)
        except OSError as exc:
            unlink(temporary)
            self._metrics.cache_disk_writes_dropped.inc()
            self._warn("cache tier write failed", {"error": exc.strerror})
            return
        with self._lock:
            if relative not in self._index:
                self._per_version[os.path.dirname(relative)] += 1
            self._bytes -= self._index.pop(relative, 0)
            self._index[relative] = size
            self._bytes += size
        self._evict_over_bound()
        self._publish()

    def _warn(self, message: str, fields: dict[str, object]) -> None:
        """A warning within the tier's log budget, with how many were left out before it."""
        with self._lock:
            allowed, dropped = self._log_budget.take()
        if allowed:
            extra = {"dropped": dropped} if dropped else {}
            log.warning(message, extra={"fields": {"tier": self.tier, **fields, **extra}})

    def _evict_over_bound(self) -> None:
        while True:
            with self._lock:
                if self._bytes <= self.max_bytes or not self._index:
                    return
                relative, size = self._index.popitem(last=False)
                self._bytes -= size
                emptied = self._release(relative)
            unlink(str(self.root / relative))
            if emptied:
                self._version_emptied(os.path.dirname(relative))
            self._metrics.cache_evictions.labels(tier=self.tier).inc()

    def _version_emptied(self, directory: str) -> None:
        """The last block of a version is gone: its directory and key file go too."""
        with contextlib.suppress(OSError):  # a write landed meanwhile, or already gone
            (self.root / directory).rmdir()
        path = self._key_files.pop(directory, None)
        meta = read_meta(path, self.bucket, None) if path is not None else None
        if (
            path is not None
            and meta is not None
            and self._version_dir(self.bucket, meta.key, meta.etag) == directory
        ):  # not a newer version's
            unlink(str(path))

    def _release(self, relative: str) -> bool:
        """One block of a version is gone (lock held); True if it was the last one."""
        directory = os.path.dirname(relative)
        self._per_version[directory] -= 1
        if self._per_version[directory] <= 0:
            del self._per_version[directory]
            return True
        return False

    def _forget(self, relative: str) -> None:
        emptied = False
        with self._lock:
            if relative in self._index:
                self._bytes -= self._index.pop(relative)
                emptied = self._release(relative)
        if emptied:
            self._version_emptied(os.path.dirname(relative))
        self._publish()

    def _remove_strays(self) -> None:
        """Directories no worker of this group owns (a group that had more workers, or
        the layout before worker directories): nobody would ever evict them."""
        removed = 0
        for entry in self._path.iterdir() if self._path.is_dir() else []:
            name = entry.name
            worker = name[1:]
            stray = (
                name.startswith("w") and worker.isdigit() and int(worker) >= self._workers
            ) or (len(name) == 2 and all(c in "0123456789abcdef" for c in name))
            if stray and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        if removed:
            log.info(
                "removed cache directories no worker owns",
                extra={
                    "fields": {"tier": self.tier, "path": str(self._path), "directories": removed}
                },
            )

    def drop_version(self, version: Version) -> None:
        """Delete this worker's files of one version (peers' files are theirs to drop;
        they are never served for another version, whose blocks have other names)."""
        directory = self._version_dir(*version)
        with self._lock:
            stale = [r for r in self._index if r.startswith(directory + "/")]
            for relative in stale:
                self._bytes -= self._index.pop(relative)
            self._per_version.pop(directory, None)
        for relative in stale:
            unlink(str(self.root / relative))
        self._version_emptied(directory)
        self._publish()

    def _publish(self) -> None:
        self._metrics.cache_bytes.labels(tier=self.tier).set(self._bytes)
