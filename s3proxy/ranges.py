"""Range and conditional request logic (RFC 9110 sections 13 and 14), no I/O.

Everything here is a plain function of header values and object metadata so it can be
tested directly and with hypothesis.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from itertools import pairwise
from typing import Literal

_RANGE_SPEC_RE = re.compile(r"^([0-9]*)[ \t]*-[ \t]*([0-9]*)$")
# the one closed range media servers send, offsets short enough for int() to be exact
_PLAIN_RANGE_RE = re.compile(r"bytes=([0-9]{1,18})-([0-9]{1,18})")
MAX_DATE_CHARS = 64  # "Sunday, 06-Nov-1994 08:49:37 GMT" and friends are shorter
# Offsets with more digits than this lie past the end of any object (10^18 bytes).
MAX_OFFSET_DIGITS = 18
BEYOND = 10**MAX_OFFSET_DIGITS
_ETAG_RE = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


@dataclass(frozen=True)
class ByteRange:
    """An inclusive, satisfiable byte range of an object."""

    start: int
    end: int
    # asked without a last byte (`bytes=N-`, or no Range at all): a reader that may hang
    # up at any point, as Mist does at every seek; not part of what the range is
    open_ended: bool = field(default=False, compare=False)

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class RangeNotSatisfiable(Exception):
    """No range in the header overlaps the object: answer 416 with bytes */size."""


def parse_range_header(header: str, size: int) -> list[ByteRange] | None:
    """The satisfiable ranges of a Range header against an object of `size` bytes.

    Returns None when the header must be ignored (not the bytes unit, or invalid syntax:
    RFC 9110 says such a header is ignored and the whole body sent). Raises
    RangeNotSatisfiable when it is valid but no range overlaps the object.
    """
    plain = _PLAIN_RANGE_RE.fullmatch(header)
    if plain is not None:  # what the rules below make of it, sooner
        lo, hi = int(plain[1]), int(plain[2])
        if hi < lo:
            return None
        if lo >= size:
            raise RangeNotSatisfiable()
        return [ByteRange(lo, min(hi, size - 1))]
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip(" \t") for s in spec.split(",")]
    specs = [s for s in specs if s]  # the list rule allows empty elements
    if not specs:
        return None
    parsed: list[tuple[int | None, int | None]] = []
    for item in specs:
        match = _RANGE_SPEC_RE.match(item)
        if match is None:
            return None
        first_text, last_text = match.groups()
        first = _offset(first_text) if first_text else None
        last = _offset(last_text) if last_text else None
        if first is None and last is None:
            return None
        if first is not None and last is not None and _digits_less(last_text, first_text):
            return None
        parsed.append((first, last))
    ranges: list[ByteRange] = []
    for first, last in parsed:
        if first is None:
            assert last is not None
            if last == 0 or size == 0:
                continue  # a zero-length suffix is unsatisfiable
            ranges.append(ByteRange(max(0, size - last), size - 1))
        elif first < size:
            end = size - 1 if last is None else min(last, size - 1)
            ranges.append(ByteRange(first, end, open_ended=last is None))
    if not ranges:
        raise RangeNotSatisfiable()
    return ranges


def first_offset(header: str) -> int | None:
    """Where the first range of a `bytes=a-b` header starts (None: no such range; an
    open-ended `a-` or a suffix `-n` gives None too)."""
    spec = _first_spec(header)
    return _offset(spec[0]) if spec is not None and spec[0] and spec[1] else None


def open_offset(header: str) -> int | None:
    """Where the first range starts when it is open-ended, `bytes=a-` (else None)."""
    spec = _first_spec(header)
    return _offset(spec[0]) if spec is not None and spec[0] and not spec[1] else None


def _first_spec(header: str) -> tuple[str, str] | None:
    """The first and last offset, as written, of a `bytes=` header's first range."""
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    match = _RANGE_SPEC_RE.match(spec.split(",", 1)[0].strip(" \t"))
    return (match.group(1), match.group(2)) if match is not None else None


def _offset(digits: str) -> int:
    """A byte offset of any length: exact up to 10^18, else BEYOND (past any end)."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= MAX_OFFSET_DIGITS else BEYOND


def _digits_less(a: str, b: str) -> bool:
    """a < b for decimal digit strings of any length (no int() of either)."""
    a, b = a.lstrip("0"), b.lstrip("0")
    return (len(a), a) < (len(b), b)


def ranges_to_serve(ranges: list[ByteRange], max_ranges: int) -> list[ByteRange] | None:
    """The ranges to answer with, or None to answer 200 with the whole body.

    Too many ranges, or ranges that overlap (a response larger than the object, a known
    amplification attack), get the whole body instead, as RFC 9110 section 14.2 allows.
    """
    if len(ranges) > max_ranges:
        return None
    ordered = sorted(ranges, key=lambda r: r.start)
    for previous, current in pairwise(ordered):
        if current.start <= previous.end:
            return None
    return ranges


@dataclass(frozen=True)
class MultipartPart:
    header: bytes
    range: ByteRange


@dataclass(frozen=True)
class MultipartLayout:
    """The exact bytes around each part of a multipart/byteranges body."""

    content_type: str
    parts: list[MultipartPart]
    trailer: bytes

    @property
    def content_length(self) -> int:
        return sum(len(p.header) + p.range.length for p in self.parts) + len(self.trailer)


def multipart_layout(
    ranges: list[ByteRange], size: int, part_type: str, boundary: str
) -> MultipartLayout:
    parts = []
    for index, byte_range in enumerate(ranges):
        lead = b"" if index == 0 else b"\r\n"
        header = (
            f"--{boundary}\r\nContent-Type: {part_type}\r\n"
            f"Content-Range: {byte_range.content_range(size)}\r\n\r\n"
        ).encode("latin-1")
        parts.append(MultipartPart(lead + header, byte_range))
    trailer = f"\r\n--{boundary}--\r\n".encode("latin-1")
    return MultipartLayout(f"multipart/byteranges; boundary={boundary}", parts, trailer)


# --- conditionals ---------------------------------------------------------------


@dataclass(frozen=True)
class EntityTag:
    weak: bool
    opaque: str  # with its quotes


def parse_etag_list(value: str) -> list[EntityTag] | Literal["*"] | None:
    """Parse If-Match / If-None-Match; None when malformed (then the header is ignored)."""
    if value.strip() == "*":
        return "*"
    tags: list[EntityTag] = []
    position = 0
    while position < len(value):
        if not value[position:].strip(" \t,"):
            break
        match = _ETAG_RE.match(value, position)
        if match is None:
            return None
        tags.append(EntityTag(weak=bool(match.group(1)), opaque=match.group(2)))
        position = match.end()
    return tags or None


def parse_etag(value: str) -> EntityTag:
    """The object's own ETag as the upstream gave it (S3 ETags are quoted and strong)."""
    tags = parse_etag_list(value)
    if isinstance(tags, list) and len(tags) == 1:
        return tags[0]
    return EntityTag(weak=False, opaque=value if value.startswith('"') else f'"{value}"')


def parse_http_date(value: str) -> datetime | None:
    """An HTTP date, or None for anything that does not parse or does not fit (an
    hour, day, year or zone too large for a datetime): such a header is ignored."""
    if len(value) > MAX_DATE_CHARS:
        return None
    try:
        parsed = parsedate_to_datetime(value)
        if parsed is None:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)  # 9999-12-31 at -2359 is past year 9999 in UTC
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@functools.lru_cache(maxsize=4096)  # one object's Last-Modified, on every answer
def format_http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def _strong_match(tags: Iterable[EntityTag], etag: EntityTag) -> bool:
    return not etag.weak and any(not t.weak and t.opaque == etag.opaque for t in tags)


def _weak_match(tags: Iterable[EntityTag], etag: EntityTag) -> bool:
    return any(t.opaque == etag.opaque for t in tags)


def _seconds(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


_CONDITIONALS = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")


def evaluate_preconditions(
    method: str, headers: Mapping[str, str], etag: str, last_modified: datetime
) -> int | None:
    """RFC 9110 13.2.2 order: the status to answer with (412 or 304), or None to go on."""
    if not any(name in headers for name in _CONDITIONALS):
        return None  # most requests: nothing to parse
    tag = parse_etag(etag)
    modified = _seconds(last_modified)
    if_match = headers.get("If-Match")
    if if_match is not None:
        tags = parse_etag_list(if_match)
        if tags != "*" and not (tags and _strong_match(tags, tag)):
            return 412
    else:
        since = headers.get("If-Unmodified-Since")
        date = parse_http_date(since) if since is not None else None
        if date is not None and modified > date:
            return 412
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        tags = parse_etag_list(if_none_match)
        if tags == "*" or (tags and _weak_match(tags, tag)):
            return 304 if method in ("GET", "HEAD") else 412
    elif method in ("GET", "HEAD"):
        since = headers.get("If-Modified-Since")
        date = parse_http_date(since) if since is not None else None
        if date is not None and modified <= date:
            return 304
    return None


def if_range_matches(value: str, etag: str, last_modified: datetime) -> bool:
    """Whether an If-Range validator still holds (then the Range applies)."""
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        tags = parse_etag_list(value)
        return isinstance(tags, list) and len(tags) == 1 and _strong_match(tags, parse_etag(etag))
    date = parse_http_date(value)
    return date is not None and date == _seconds(last_modified)
