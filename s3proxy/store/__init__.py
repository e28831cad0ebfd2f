"""The store: object metadata and bytes, from the cache tiers or from S3 (see `objects`)."""

from .blockfile import BlockSpan
from .objects import ObjectStore
from .reads import SEEK_GRACE_S, MemoryRead, ReadHistory, ReadStats

__all__ = ["SEEK_GRACE_S", "BlockSpan", "MemoryRead", "ObjectStore", "ReadHistory", "ReadStats"]
