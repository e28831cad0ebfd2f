"""Every upstream read of bytes: one `Fetch` per ranged GET, checked before use, and
the one table of fetches in flight.

A fetch covers bytes start..end of one pinned version. The blocks it covers whole go to
the cache as they complete; a fetch that covers no whole block (a seek's probe) caches
nothing. Readers follow along through `read` and get S3's chunks as they arrive (no copy,
and no block to allocate before the first byte); a block is joined once, when whole.

Nothing from upstream is trusted: `checked` compares the answer's ETag, Content-Range and
length with what was asked, and `Answer.chunks` the body's length, before a byte is used.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing

from ..errors import S3ProxyError, UpstreamInvalid, UpstreamUnavailable
from ..upstream import Answer, ObjectMeta
from .blocks import Block, BlockKey, block_bounds

log = logging.getLogger("s3proxy.store")


OTHER_ETAG = "another ETag than the version asked for"
OTHER_SIZE = "another object size than the version asked for"
NO_ETAG = "no ETag"


def answer_problem(
    status: int,
    content_range: tuple[int, int, int] | None,
    length: int,
    etag: str,
    start: int,
    end: int,
    pinned: ObjectMeta | None,
) -> str | None:
    """Why an answer to `Range: bytes=start-end` is not those bytes (None: it is).

    `pinned`: the version asked for (its ETag and size must match); None when the
    answer is what tells the version (a cold read)."""
    if status != 206 or content_range is None:
        return f"status {status} without a Content-Range to a ranged GET"
    if not etag:
        return NO_ETAG  # nothing to pin a version to: its bytes could be of any
    first, last, size = content_range
    if pinned is not None:
        if etag != pinned.etag:
            return OTHER_ETAG
        if size != pinned.size:
            return OTHER_SIZE
    if first != start or last != min(end, size - 1):
        return "another range than asked for"
    if length != last - first + 1:
        return "a length that does not match its Content-Range"
    return None


def checked(answer: Answer, start: int, end: int, pinned: ObjectMeta | None) -> Answer:
    """The answer, if it is exactly what was asked; else discarded (counted `invalid`)."""
    problem = answer_problem(
        answer.status, answer.content_range, answer.length, answer.meta.etag, start, end, pinned
    )
    if problem is None:
        return answer
    answer.discard()
    log.warning("discarded an upstream answer", extra={"fields": {"problem": problem}})
    raise UpstreamInvalid(
        f"upstream answer did not match the request: {problem}",
        version_gone=problem in (OTHER_ETAG, OTHER_SIZE),
    )


class FetchTable:
    """Blocks being fetched, each by exactly one fetch. Only this table adds or removes
    entries, and it removes an entry only for the fetch that owns it."""

    def __init__(self) -> None:
        self._entries: dict[BlockKey, Fetch] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: BlockKey) -> Fetch | None:
        return self._entries.get(key)

    def claim(self, fetch: Fetch) -> bool:
        """Register the fetch for all its whole blocks, or for none (False) when one of
        them is in flight already."""
        keys = fetch.keys()
        if any(key in self._entries for key in keys):
            return False
        for key in keys:
            self._entries[key] = fetch
        return True

    def release(self, fetch: Fetch, key: BlockKey | None = None) -> None:
        for own in (key,) if key is not None else fetch.keys():
            if self._entries.get(own) is fetch:
                del self._entries[own]

    def fetches(self) -> list[Fetch]:
        return list({id(f): f for f in self._entries.values()}.values())

    def __len__(self) -> int:
        return len(self._entries)


OpenAnswer = Callable[[], Awaitable[Answer]]
OnBlock = Callable[["Fetch", int, Block], None]
OnEnd = Callable[["Fetch", "S3ProxyError | None"], None]


class Fetch:
    """One upstream GET for bytes start..end of one version (see the module's doc).

    `keep`: finish it (for the cache) even if every reader leaves early.
    `background`: read-ahead, counted apart; it stops with the reader that started it
    when that reader hangs up and nobody else has joined it."""

    def __init__(
        self,
        meta: ObjectMeta,
        bucket: str,
        block_size: int,
        start: int,
        end: int,
        open_answer: OpenAnswer,
        *,
        on_block: OnBlock,
        on_end: OnEnd,
        answer: Answer | None = None,
        keep: bool = False,
        background: bool = False,
    ) -> None:
        self.meta = meta
        self.bucket = bucket
        self.block_size = block_size
        self.start, self.end = start, end
        self.background = background
        self.keep = keep
        self._open = open_answer
        self._answer = answer  # a GET already answered (and checked), not yet read
        self._on_block, self._on_end = on_block, on_end
        bs = block_size
        self.first, self.last = start // bs, end // bs
        # per block: where this fetch's bytes begin and end in it, the pieces received
        # so far and where each starts (bytes below `filled` are final: shared)
        self.begin: dict[int, int] = {}
        self.stop: dict[int, int] = {}
        for index in range(self.first, self.last + 1):
            first_byte, last_byte = block_bounds(index, bs, meta.size)
            self.begin[index] = max(start, first_byte) - first_byte
            self.stop[index] = min(end, last_byte) - first_byte
        self.whole = [
            i
            for i in self.begin
            if self.begin[i] == 0 and self.stop[i] == block_bounds(i, bs, meta.size)[1] - i * bs
        ]
        self.filled = dict(self.begin)
        self.parts: dict[int, list[memoryview]] = {i: [] for i in self.begin}
        self.starts: dict[int, list[int]] = {i: [] for i in self.begin}
        self.error: S3ProxyError | None = None
        self.done = False
        self.readers = 0
        self._progress = asyncio.Event()
        self._answered = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.table: FetchTable | None = None

    def key(self, index: int) -> BlockKey:
        return BlockKey(self.bucket, self.meta.key, self.meta.etag, index)

    def keys(self) -> list[BlockKey]:
        return [self.key(index) for index in self.whole]

    def start_in(self, table: FetchTable | None) -> bool:
        """Claim its blocks in `table` (None: a probe, which caches nothing) and start;
        False, and nothing started, when one of its blocks is in flight already."""
        if table is not None and not table.claim(self):
            return False
        self.table = table
        self.task = asyncio.ensure_future(self.run())
        self.task.add_done_callback(lambda _task: self._finish())  # even if never run
        return True

    async def answered(self) -> None:
        """Until S3's answer is in and checked, or the fetch ended (see `error`)."""
        await self._answered.wait()

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def run(self) -> None:
        try:
            answer, self._answer = self._answer or await self._open(), None
            self._answered.set()
            index = self.first
            async with aclosing(answer.chunks()) as chunks:
                async for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        filled = self.filled[index]
                        take = min(len(view), self.stop[index] + 1 - filled)
                        self.parts[index].append(view[:take])
                        self.starts[index].append(filled)
                        self.filled[index] = filled + take
                        view = view[take:]
                        if self.filled[index] > self.stop[index]:
                            self._block_complete(index)
                            index += 1
                    self._notify()
        except S3ProxyError as exc:
            self.error = exc
        except asyncio.CancelledError:
            self.error = UpstreamUnavailable("fetch abandoned")
            raise
        except Exception as exc:  # never leave readers waiting on a fetch that died
            log.exception("block fetch failed")
            self.error = UpstreamUnavailable(f"fetch failed ({type(exc).__name__})")
        finally:
            self._finish()

    def _finish(self) -> None:
        """Once, however the fetch ended (a task cancelled before it ran included)."""
        if self.done:
            return
        self.done = True
        if self.error is None and self.filled[self.last] <= self.stop[self.last]:
            self.error = UpstreamUnavailable("fetch abandoned")
        if self._answer is not None:  # never read: closed, and counted
            self._answer.close()
            self._answer = None
        try:
            if self.table is not None:
                self.table.release(self)
            self._on_end(self, self.error)
        finally:
            self._answered.set()
            self._notify()

    def _block_complete(self, index: int) -> None:
        if index not in self.whole:
            return
        block = b"".join(self.parts[index])
        # readers go on from the block; the chunks can go
        self.parts[index], self.starts[index] = [memoryview(block)], [0]
        if self.table is not None:
            self.table.release(self, self.key(index))
        self._on_block(self, index, block)

    def received(self, index: int) -> int:
        """Bytes of block `index` this fetch has received so far."""
        return self.filled[index] - self.begin[index]

    def attach(self) -> None:
        self.readers += 1

    def detach(self, abandoned: bool = False) -> None:
        """A reader is done with this fetch. One that got all it asked for leaves the
        fetch to finish its blocks for the cache; when the last reader left early (its
        client hung up), the fetch stops pulling bytes nobody will read."""
        self.readers -= 1
        if self.readers == 0 and abandoned and not self.keep and not self.done and self.task:
            self.task.cancel()
            if self.table is not None:
                self.table.release(self)  # nobody may join a fetch on its way out

    async def read(self, index: int, lo: int, hi: int) -> AsyncGenerator[memoryview, None]:
        """Bytes lo..hi (inclusive, block-relative) of block `index`, as they arrive."""
        offset = lo
        while offset <= hi:
            if self.filled[index] > offset:
                at = bisect_right(self.starts[index], offset) - 1
                piece, first = self.parts[index][at], self.starts[index][at]
                stop = min(first + len(piece), hi + 1)
                yield piece[offset - first : stop - first]
                offset = stop
                continue
            if self.error is not None:
                raise type(self.error)(str(self.error))  # each reader its own exception
            if self.done:
                raise UpstreamUnavailable("upstream body ended early")
            await self._progress.wait()
