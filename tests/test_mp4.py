"""The pure MP4 layout functions warm-up plans with: box headers of any bytes, the
`mvhd` duration, and the media extent (always inside the mdat, the object and the cap)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from s3proxy.mp4 import Box, box_at, duration_s, index_at_start, media_extent, media_start


def header(kind: bytes, size: int, large: bool = False) -> bytes:
    if large:
        return (1).to_bytes(4, "big") + kind + size.to_bytes(8, "big")
    return size.to_bytes(4, "big") + kind


@given(st.binary(max_size=16), st.integers(0, 10**6), st.integers(0, 10**7))
def test_any_bytes_are_a_box_that_fits_or_none(data: bytes, offset: int, size: int) -> None:
    box = box_at(data, offset, size)
    if box is not None:
        assert box.header in (8, 16) and box.size >= box.header
        assert box.offset == offset and box.end <= size


@given(st.sampled_from([b"ftyp", b"moov", b"mdat", b"free"]), st.integers(16, 10**9), st.booleans())
def test_a_header_round_trips(kind: bytes, size: int, large: bool) -> None:
    box = box_at(header(kind, size, large), 0, size)
    assert box == Box(kind.decode(), 0, size, 16 if large else 8)


def test_a_ts_or_matroska_start_is_not_a_box() -> None:
    assert box_at(b"G@\x11\x10" + bytes(12), 0, 10**6) is None  # a TS sync byte
    assert box_at(b"\x1aE\xdf\xa3" + bytes(12), 0, 10**6) is None  # EBML


@given(st.integers(1, 10**6), st.integers(1, 2**32 - 2), st.booleans())
def test_the_duration_of_an_mvhd(timescale: int, duration: int, v1: bool) -> None:
    if v1:
        body = (
            b"\x01"
            + bytes(3)
            + bytes(16)
            + timescale.to_bytes(4, "big")
            + duration.to_bytes(8, "big")
        )
    else:
        body = bytes(4) + bytes(8) + timescale.to_bytes(4, "big") + duration.to_bytes(4, "big")
    moov = header(b"moov", 0) + header(b"mvhd", 8 + len(body)) + body
    assert duration_s(moov) == duration / timescale
    assert duration_s(b"moov without a movie header") is None


@given(
    st.integers(0, 10**4),  # mdat offset
    st.integers(16, 10**8),  # mdat size
    st.one_of(st.none(), st.floats(0.1, 10**5)),
    st.floats(0, 300),
    st.integers(0, 10**9),
    st.booleans(),
)
def test_the_media_extent_stays_inside_the_mdat_and_the_cap(
    at: int, size: int, duration: float | None, seconds: float, cap: int, trailing_moov: bool
) -> None:
    object_size = at + size + (1000 if trailing_moov else 0)
    boxes = (
        [Box("ftyp", 0, min(at, 32), 8), Box("mdat", at, size, 8)]
        if at >= 32
        else [Box("mdat", at, size, 8)]
    )
    extent = media_extent(boxes, duration, seconds, cap, object_size)
    assert extent.offset == at + 8
    assert 0 <= extent.length <= min(cap, size - 8)
    if duration and extent.length < min(cap, size - 8):
        assert extent.bitrate_bps is not None
        assert abs(extent.length - seconds * extent.bitrate_bps / 8) <= 1


@given(
    st.lists(
        st.tuples(st.sampled_from([b"ftyp", b"free", b"uuid"]), st.integers(16, 5000)), max_size=4
    ),
    st.sampled_from([b"moov", b"mdat", b"moof"]),
    st.integers(16, 10**7),
    st.integers(0, 20000),
)
def test_the_index_at_the_start_is_the_moov_after_whole_leading_boxes(
    leading: list[tuple[bytes, int]], kind: bytes, size: int, held: int
) -> None:
    """Boxes laid end to end, then a moov (or the media): the moov is found exactly when
    its header lies within the first `held` bytes, and never any other box."""
    layout, offset = bytearray(), 0
    for name, length in leading:
        layout += header(name, length) + bytes(length - 8)
        offset += length
    object_size = offset + size
    layout += header(kind, size) + bytes(8)
    found = index_at_start(bytes(layout[:held]), object_size)
    if kind == b"moov" and offset + 16 <= held:
        assert found == Box("moov", offset, size, 8)
    else:
        assert found is None


def test_a_moov_after_the_media_is_not_the_index_at_the_start() -> None:
    start = header(b"ftyp", 24) + bytes(16) + header(b"mdat", 1000) + bytes(992)
    start += header(b"moov", 500)
    assert index_at_start(start + bytes(600), 2024 + 500) is None


@given(
    st.integers(16, 5000),
    st.lists(
        st.tuples(st.sampled_from([b"free", b"uuid", b"skip"]), st.integers(16, 5000)), max_size=3
    ),
    st.sampled_from([b"mdat", b"moof"]),
    st.booleans(),
    st.integers(0, 20000),
    st.integers(0, 20000),
)
def test_the_media_starts_at_the_payload_of_the_first_mdat_after_the_moov(
    moov_size: int,
    between: list[tuple[bytes, int]],
    kind: bytes,
    large: bool,
    at: int,
    held: int,
) -> None:
    """ftyp, moov, boxes, then the media: its start is found exactly when `data` (the
    bytes from `at`) holds every header from the moov's end to the mdat's, and it is the
    mdat's payload (after a 64-bit size too); a fragmented file's moof is no media start."""
    layout = bytearray(header(b"ftyp", 32) + bytes(24))
    moov = Box("moov", len(layout), moov_size, 8)
    layout += header(b"moov", moov_size) + bytes(moov_size - 8)
    for name, length in between:
        layout += header(name, length) + bytes(length - 8)
    mdat_at, mdat_size = len(layout), 10**6
    layout += header(kind, mdat_size, large) + bytes(16)
    object_size = mdat_at + mdat_size
    found = media_start(moov, bytes(layout[at : at + held]), at, object_size)
    if kind == b"mdat" and at <= moov.end and mdat_at + 16 <= at + held:
        assert found == mdat_at + (16 if large else 8)
    else:
        assert found is None
