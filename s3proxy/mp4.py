"""MP4 layout, as a player's start reads it: top-level box headers, the `moov`'s
duration, and the media a start takes (pure functions; the store does the reading).

Mist walks the top-level boxes one 16-byte header at a time, reads the `moov` whole,
then two greedy readers stream media from the start of the `mdat` (about 70 s of it
before its first segment, ../shared/mist.md). Warm-up loads the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

HEADER_BYTES = 16  # what a reader takes to learn one box (a 64-bit size included)
_KINDS = frozenset(
    {"ftyp", "moov", "mdat", "free", "skip", "wide", "uuid", "moof", "mfra", "styp", "sidx"}
    | {"meta", "pdin", "emsg", "prft", "ssix", "pnot", "junk"}
)


@dataclass(frozen=True)
class Box:
    kind: str
    offset: int
    size: int  # the whole box, header included
    header: int  # 8, or 16 with a 64-bit size

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def payload(self) -> int:
        return self.offset + self.header


def box_at(data: bytes, offset: int, object_size: int, known_only: bool = True) -> Box | None:
    """The box whose header `data` holds (read at `offset`), or None when it is not one:
    a size that does not fit the object, or (`known_only`) a type no MP4 has at the top
    level, which is how a TS or Matroska file is told apart."""
    if len(data) < 8:
        return None
    size = int.from_bytes(data[0:4], "big")
    kind = data[4:8].decode("latin-1")
    header = 8
    if size == 1:
        if len(data) < 16:
            return None
        size, header = int.from_bytes(data[8:16], "big"), 16
    elif size == 0:  # to the end of the file
        size = object_size - offset
    if (known_only and kind not in _KINDS) or size < header or offset + size > object_size:
        return None
    return Box(kind, offset, size, header)


def boxes_in(
    data: bytes | memoryview, at: int, offset: int, object_size: int
) -> Iterator[Box | None]:
    """The top-level boxes laid end to end from `offset` whose headers `data` (the
    object's bytes from offset `at`) holds; a None where a header is no box ends them."""
    while at <= offset and offset + HEADER_BYTES <= at + len(data):
        box = box_at(bytes(data[offset - at : offset - at + HEADER_BYTES]), offset, object_size)
        yield box
        if box is None:
            return
        offset = box.end


def index_at_start(head: bytes | memoryview, object_size: int) -> Box | None:
    """The `moov` of a faststart MP4, from the object's first bytes `head`: the top-level
    boxes before it must be whole boxes whose headers `head` holds; None when the media
    comes first, the walk leaves `head`, or it is not an MP4."""
    for box in boxes_in(head, 0, 0, object_size):
        if box is None or box.kind in ("mdat", "moof"):
            return None
        if box.kind == "moov":
            return box
    return None


def media_start(moov: Box, data: bytes | memoryview, at: int, object_size: int) -> int | None:
    """Where the media of a faststart MP4 begins, the payload of the first `mdat` after
    its `moov`, from `data` (the object's bytes from offset `at`) holding the headers
    between; None when the walk leaves `data`, or meets a `moof` or no box."""
    for box in boxes_in(data, at, moov.end, object_size):
        if box is None or box.kind == "moof":
            return None
        if box.kind == "mdat":
            return box.payload
    return None


def duration_s(moov: bytes) -> float | None:
    """The movie's duration from its `mvhd`, or None when it has none (or says 0)."""
    at = moov.find(b"mvhd")
    if at < 4:
        return None
    body = moov[at + 4 :]
    if not body:
        return None
    if body[0] == 1:  # version 1: 64-bit times and duration
        if len(body) < 32:
            return None
        timescale = int.from_bytes(body[20:24], "big")
        duration = int.from_bytes(body[24:32], "big")
    else:
        if len(body) < 20:
            return None
        timescale = int.from_bytes(body[12:16], "big")
        duration = int.from_bytes(body[16:20], "big")
    if timescale == 0 or duration == 0 or duration == 0xFFFFFFFF:
        return None
    return duration / timescale


@dataclass(frozen=True)
class Extent:
    """Where a start's media reads begin, and how many bytes they take."""

    offset: int
    length: int
    bitrate_bps: float | None  # None: not known (then `length` is the byte cap)


def media_extent(
    boxes: list[Box], duration: float | None, seconds: float, cap: int, object_size: int
) -> Extent:
    """The first `seconds` of media: from the start of the `mdat` payload (or the end of
    the last box read, without one), `seconds` x the mdat's bitrate, never past the
    mdat, the object or `cap` bytes."""
    mdat = next((b for b in boxes if b.kind == "mdat"), None)
    start = mdat.payload if mdat is not None else max((b.end for b in boxes), default=0)
    end = mdat.end if mdat is not None else object_size
    start = min(start, object_size)
    if duration and mdat is not None:
        bitrate = (mdat.size - mdat.header) * 8 / duration
        wanted = int(seconds * bitrate / 8) + 1
        return Extent(start, max(0, min(wanted, end - start, cap)), bitrate)
    return Extent(start, max(0, min(end - start, cap)), None)
