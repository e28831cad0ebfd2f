"""The files of a file tier: a block file's header (magic, CRC-32, length), where a
version's blocks and a key's metadata live, and the small file operations the tier
needs. No state: `disk.FileTier` owns the index."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import zlib
from datetime import datetime
from pathlib import Path

from ..upstream import ObjectMeta
from .blocks import Block

MAGIC = b"S3PB"
HEADER = struct.Struct(">4sIQ")  # magic, crc32, length
SUFFIX = ".blk"
KEYS = "keys"


def version_dir(bucket: str, key: str, etag: str, block_size: int) -> str:
    """A version's directory; the block size is part of it, so blocks cut at another
    size (the setting changed) are never taken for these."""
    text = f"{bucket}\0{key}\0{etag}\0{block_size}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:40]
    return f"{digest[:2]}/{digest}"


def key_file(bucket: str, key: str) -> str:
    digest = hashlib.sha256(f"{bucket}\0{key}".encode()).hexdigest()[:40]
    return f"{KEYS}/{digest[:2]}/{digest}.json"


def encode(data: Block) -> bytes:
    """A block file's bytes: the header, then the block."""
    return HEADER.pack(MAGIC, zlib.crc32(data), len(data)) + data


def write_meta(path: Path, bucket: str, meta: ObjectMeta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(
            {
                "bucket": bucket,
                "key": meta.key,
                "size": meta.size,
                "etag": meta.etag,
                "last_modified": meta.last_modified.isoformat(),
                "content_type": meta.content_type,
            },
            handle,
        )
    os.replace(temporary, path)


def read_meta(path: Path, bucket: str, key: str | None) -> ObjectMeta | None:
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
        if raw["bucket"] != bucket or (key is not None and raw["key"] != key):
            return None
        return ObjectMeta(
            key=str(raw["key"]),
            size=int(raw["size"]),
            etag=str(raw["etag"]),
            last_modified=datetime.fromisoformat(raw["last_modified"]),
            content_type=raw.get("content_type"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: its blocks are simply not revalidated after a restart


def decode(raw: bytes) -> Block | None:
    if len(raw) < HEADER.size:
        return None
    magic, checksum, length = HEADER.unpack_from(raw)
    data = raw[HEADER.size :]
    if magic != MAGIC or length != len(data) or zlib.crc32(data) != checksum:
        return None
    return data


def unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
