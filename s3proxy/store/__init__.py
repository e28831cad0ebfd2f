"""The store: object metadata and bytes, from the cache tiers or from S3 (see `objects`)."""

from .objects import SEEK_GRACE_S, ObjectStore, ReadHistory

__all__ = ["SEEK_GRACE_S", "ObjectStore", "ReadHistory"]
