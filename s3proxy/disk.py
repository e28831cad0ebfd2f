"""The disk tier: blocks evicted from memory, kept in files bounded in bytes (LRU).

Layout: `{path}/{h[:2]}/{h}/{index}.blk`, h = hash of (bucket, key, ETag), so a version's
blocks sit in one directory and are dropped together. Each file is a 16-byte header
(magic, length, CRC-32) then the block; a file whose length or checksum does not match
is deleted and counted, never served. Files are written under a temporary name and
renamed, so a reader (or another worker) never sees half a block. The index is rebuilt
from the directory at start-up, oldest first by modification time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

from .cache import Block, BlockKey
from .metrics import Metrics

log = logging.getLogger("s3proxy.disk")

MAGIC = b"S3PB"
HEADER = struct.Struct(">4sIQ")  # magic, crc32, length
SUFFIX = ".blk"


def version_dir(bucket: str, key: str, etag: str) -> str:
    digest = hashlib.sha256(f"{bucket}\0{key}\0{etag}".encode()).hexdigest()[:40]
    return f"{digest[:2]}/{digest}"


class DiskTier:
    """With several workers, each writes and evicts only in its own `w<N>` directory
    (bounded by its share of max_bytes), and reads the others' read-only: files are
    immutable once renamed, and an unlinked file stays readable while open."""

    def __init__(self, path: str, max_bytes: int, metrics: Metrics, worker: int = 0,
                 workers: int = 1) -> None:
        self.root = Path(path) / f"w{worker}"
        self._peers = [Path(path) / f"w{other}" for other in range(workers) if other != worker]
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._index: OrderedDict[str, int] = OrderedDict()  # relative path -> file size
        self._bytes = 0
        self._lock = threading.Lock()  # the index is touched from worker threads

    @staticmethod
    def relative(key: BlockKey) -> str:
        return f"{version_dir(key.bucket, key.key, key.etag)}/{key.block}{SUFFIX}"

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def contains(self, key: BlockKey) -> bool:
        return self.relative(key) in self._index

    def load_index(self) -> None:
        """Rebuild the index from the files present (a restart keeps its hits)."""
        self.root.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = os.path.join(dirpath, name)
                if ".tmp." in name:  # a write cut short by a crash
                    _unlink(full)
                    continue
                if not name.endswith(SUFFIX):
                    continue
                try:
                    stat = os.stat(full)
                except FileNotFoundError:
                    continue
                found.append((stat.st_mtime, os.path.relpath(full, self.root), stat.st_size))
        found.sort()
        with self._lock:
            self._index.clear()
            self._bytes = 0
            for _mtime, relative, size in found:
                self._index[relative] = size
                self._bytes += size
        self._evict_over_bound()
        self._publish()
        log.info("disk tier ready", extra={"fields": {
            "path": str(self.root), "blocks": len(self._index), "bytes": self._bytes}})

    async def get(self, key: BlockKey) -> bytes | None:
        return await asyncio.to_thread(self._read, key)

    async def put(self, key: BlockKey, data: Block) -> None:
        await asyncio.to_thread(self._write, key, data)

    def _read(self, key: BlockKey) -> bytes | None:
        relative = self.relative(key)
        if relative in self._index:
            data = self._read_file(self.root, relative, own=True)
            if data is not None:
                with self._lock:
                    if relative in self._index:
                        self._index.move_to_end(relative)
                try:
                    os.utime(self.root / relative)  # keeps LRU order across restarts
                except OSError:
                    pass
                return data
        for peer in self._peers:
            data = self._read_file(peer, relative, own=False)
            if data is not None:
                return data
        return None

    def _read_file(self, root: Path, relative: str, own: bool) -> bytes | None:
        full = root / relative
        try:
            with open(full, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            if own:
                self._forget(relative)
            return None
        except OSError as exc:
            log.warning("disk tier read failed", extra={"fields": {"error": exc.strerror}})
            return None
        data = _decode(raw)
        if data is None:
            self._metrics.cache_corrupt_blocks.labels(tier="disk").inc()
            log.warning("discarding a corrupt block file", extra={"fields": {"file": relative}})
            _unlink(str(full))
            if own:
                self._forget(relative)
            return None
        return data

    def _write(self, key: BlockKey, data: Block) -> None:
        relative = self.relative(key)
        full = self.root / relative
        raw = HEADER.pack(MAGIC, zlib.crc32(data), len(data)) + data
        if len(raw) > self.max_bytes:
            return
        temporary = f"{full}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            full.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                handle.write(raw)
            os.replace(temporary, full)
        except OSError as exc:
            _unlink(temporary)
            log.warning("disk tier write failed", extra={"fields": {"error": exc.strerror}})
            return
        with self._lock:
            self._bytes -= self._index.pop(relative, 0)
            self._index[relative] = len(raw)
            self._bytes += len(raw)
        self._evict_over_bound()
        self._publish()

    def _evict_over_bound(self) -> None:
        while True:
            with self._lock:
                if self._bytes <= self.max_bytes or not self._index:
                    return
                relative, size = self._index.popitem(last=False)
                self._bytes -= size
            _unlink(str(self.root / relative))
            self._metrics.cache_evictions.labels(tier="disk").inc()

    def _forget(self, relative: str) -> None:
        with self._lock:
            self._bytes -= self._index.pop(relative, 0)
        self._publish()

    def drop_version(self, version: tuple[str, str, str]) -> None:
        directory = version_dir(*version)
        with self._lock:
            stale = [r for r in self._index if r.startswith(directory + "/")]
            for relative in stale:
                self._bytes -= self._index.pop(relative)
        for root in (self.root, *self._peers):
            shutil.rmtree(root / directory, ignore_errors=True)
        self._publish()

    def _publish(self) -> None:
        self._metrics.cache_bytes.labels(tier="disk").set(self._bytes)


def _decode(raw: bytes) -> bytes | None:
    if len(raw) < HEADER.size:
        return None
    magic, checksum, length = HEADER.unpack_from(raw)
    data = raw[HEADER.size:]
    if magic != MAGIC or length != len(data) or zlib.crc32(data) != checksum:
        return None
    return data


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
