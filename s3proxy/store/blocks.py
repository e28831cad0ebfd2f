"""Block identity and arithmetic: aligned blocks of one object version.

A block is identified by (bucket, key, ETag, index), so blocks of two versions of an
object never mix: a new version simply has other keys.
"""

from __future__ import annotations

from typing import NamedTuple

Block = bytes  # a whole block; never modified once cached
Version = tuple[str, str, str]  # bucket, key, ETag


class BlockKey(NamedTuple):
    bucket: str
    key: str
    etag: str
    block: int

    @property
    def version(self) -> Version:
        return (self.bucket, self.key, self.etag)


def block_span(start: int, end: int, block_size: int) -> range:
    """Indexes of the blocks that hold bytes start..end (inclusive)."""
    return range(start // block_size, end // block_size + 1)


def block_bounds(index: int, block_size: int, size: int) -> tuple[int, int]:
    """First and last (inclusive) object offsets of block `index`."""
    first = index * block_size
    return first, min(first + block_size, size) - 1


def last_block(size: int, block_size: int) -> int:
    """Index of the object's last block (-1 for an empty object)."""
    return (size - 1) // block_size
