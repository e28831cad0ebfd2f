"""The seam between the HTTP handlers and S3: object metadata and byte streams.

Handlers only ever call `stat` and `open`; the block cache slots in here without
touching them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from .assets import object_key
from .upstream import ObjectMeta, S3Upstream


class ObjectStore:
    def __init__(self, upstream: S3Upstream, prefix: str) -> None:
        self._upstream = upstream
        self._prefix = prefix

    async def stat(self, asset: str) -> ObjectMeta:
        """Size, ETag, Last-Modified and type of the asset's current version."""
        return await self._upstream.head(object_key(self._prefix, asset))

    async def open(self, meta: ObjectMeta, start: int, end: int
                   ) -> AsyncGenerator[bytes, None]:
        """Bytes start..end (inclusive) of exactly the version `meta` describes.

        Raises ObjectChanged (before or during the stream) when that version is gone.
        Close the iterator to stop: upstream work stops with it.
        """
        if end < start:
            return
        async with aclosing(self._upstream.read(meta.key, start, end, meta.etag)) as chunks:
            async for chunk in chunks:
                yield chunk
