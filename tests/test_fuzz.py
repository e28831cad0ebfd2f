"""Fuzz and property tests for every parser that takes client input: Range, HTTP dates,
ETag lists and the conditionals built on them, asset names, token extraction (path,
Bearer header, query) and token verification; and a running proxy fed random requests
built from all of them, which never answers 5xx. (Glob matching has its own property
test against a reference matcher in test_globs.py.)"""

from __future__ import annotations

import socket
import string
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3proxy.assets import InvalidAssetName, validate_asset_name
from s3proxy.auth import AuthFailure, TokenVerifier, presented_token
from s3proxy.ranges import (
    ByteRange,
    EntityTag,
    RangeNotSatisfiable,
    evaluate_preconditions,
    first_offset,
    format_http_date,
    if_range_matches,
    open_offset,
    parse_etag_list,
    parse_http_date,
    parse_range_header,
)

from .conftest import Emulator, make_config, make_token, put_object
from .test_serve import serve_process

# --- Range ----------------------------------------------------------------------

digits = st.one_of(
    st.integers(0, 10**6).map(str),
    st.integers(0, 10**40).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),  # past int()'s digit limit
    st.integers(0, 5).map(lambda n: "0" * n + "7"),  # leading zeros
)
range_specs = st.one_of(
    st.tuples(digits, digits).map(lambda p: f"{p[0]}-{p[1]}"),
    digits.map(lambda d: f"{d}-"),
    digits.map(lambda d: f"-{d}"),
    st.text(alphabet="0123456789-, =bytes", max_size=12),
)
range_headers = st.one_of(
    st.lists(range_specs, min_size=1, max_size=5).map(lambda s: "bytes=" + ",".join(s)),
    st.text(max_size=60),
    st.text(alphabet=" \t,-=0123456789bytesBYTES", max_size=40),
)


@given(range_headers, st.integers(0, 10**7))
def test_a_range_header_of_any_text_parses_or_is_ignored(header: str, size: int) -> None:
    try:
        ranges = parse_range_header(header, size)
    except RangeNotSatisfiable:
        return
    for each in ranges or []:
        assert 0 <= each.start <= each.end < size


@given(digits, digits, st.integers(0, 10**7))
def test_a_closed_range_agrees_with_integer_arithmetic(first: str, last: str, size: int) -> None:
    start, end = int(first.lstrip("0") or "0", 10) if len(first) < 4000 else None, None
    if len(last) < 4000:
        end = int(last)
    header = f"bytes={first}-{last}"
    try:
        ranges = parse_range_header(header, size)
    except RangeNotSatisfiable:
        assert start is None or start >= size
        return
    if start is None or (end is not None and end < start):
        assert ranges is None  # a first offset past the end always is; or invalid: ignored
        return
    assert ranges is not None and len(ranges) == 1
    assert ranges[0].start == start
    assert ranges[0].end == min(size - 1, end if end is not None else size - 1)


short_digits = st.one_of(
    st.integers(0, 10**18 - 1).map(str),
    st.integers(0, 10**6).map(lambda n: f"{n:07d}"),  # leading zeros
    st.integers(1, 18).map(lambda n: "9" * n),
)


@given(short_digits, short_digits, st.integers(0, 10**19))
def test_a_plain_range_parses_as_the_general_rules_do(first: str, last: str, size: int) -> None:
    """`bytes=a-b` takes a shorter way; a space after it (which the rules allow) takes
    the general one: the two agree, the 416 included."""

    def parsed(header: str) -> list[ByteRange] | str | None:
        try:
            return parse_range_header(header, size)
        except RangeNotSatisfiable:
            return "416"

    assert parsed(f"bytes={first}-{last}") == parsed(f"bytes={first}-{last} ")


@given(range_headers)
def test_the_first_range_starts_where_the_parse_says(header: str) -> None:
    """What the store fetches with the metadata: the first range's start, closed or
    open-ended (never both), as the full parse reads it against a large object."""
    closed, opened = first_offset(header), open_offset(header)
    assert closed is None or opened is None
    start = closed if closed is not None else opened
    try:
        ranges = parse_range_header(header, 10**30)
    except RangeNotSatisfiable:
        return
    if start is not None and start < 10**18 and ranges:
        assert ranges[0].start == start or header.count(",")


# --- HTTP dates -----------------------------------------------------------------

date_like = st.builds(
    "{}, {} {} {} {}:{}:{} {}".format,
    st.sampled_from(["Mon", "Tue", "Sun", "Xyz", ""]),
    digits,
    st.sampled_from(["Jan", "Feb", "Dec", "Foo"]),
    st.one_of(digits, st.sampled_from(["9999", "0001", "1"])),  # a year's edges too
    digits,
    digits,
    digits,
    st.sampled_from(["GMT", "UTC", "+0000", "-9999", "-2359", "+2359", "+99999999999999", ""]),
)


@given(st.one_of(st.text(max_size=80), date_like))
def test_an_http_date_of_any_text_parses_to_utc_or_is_ignored(value: str) -> None:
    parsed = parse_http_date(value)
    assert parsed is None or parsed.utcoffset() == UTC.utcoffset(None)


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1)))
def test_an_http_date_round_trips(moment: datetime) -> None:
    moment = moment.replace(tzinfo=UTC, microsecond=0)
    assert parse_http_date(format_http_date(moment)) == moment


# --- ETags and conditionals -----------------------------------------------------

etagc = st.text(
    alphabet=st.characters(min_codepoint=0x23, max_codepoint=0x7E).filter(lambda c: c != '"'),
    max_size=20,
)
tags = st.lists(st.tuples(st.booleans(), etagc), min_size=1, max_size=5)


@given(tags, st.sampled_from([",", ", ", " ,", ",\t"]))
def test_an_etag_list_round_trips(listed: list[tuple[bool, str]], separator: str) -> None:
    value = separator.join(('W/"' if weak else '"') + opaque + '"' for weak, opaque in listed)
    assert parse_etag_list(value) == [EntityTag(weak, f'"{opaque}"') for weak, opaque in listed]


header_values = st.one_of(
    st.text(max_size=60), date_like, etagc.map(lambda t: f'"{t}"'), st.just("*")
)


@given(
    st.sampled_from(["GET", "HEAD"]),
    st.dictionaries(
        st.sampled_from(["If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since"]),
        header_values,
    ),
    header_values,
)
def test_conditionals_of_any_text_decide_or_are_ignored(
    method: str, headers: dict[str, str], if_range: str
) -> None:
    etag, modified = '"abc"', datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_etag_list(if_range) in (None, "*") or isinstance(parse_etag_list(if_range), list)
    assert evaluate_preconditions(method, headers, etag, modified) in (None, 304, 412)
    assert if_range_matches(if_range, etag, modified) in (True, False)


# --- asset names ----------------------------------------------------------------

names = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["a", "..", ".", "", "b.mp4", "x\\y", "é", "\x00"]), max_size=5).map(
        "/".join
    ),
    st.integers(1000, 1100).map(lambda n: "a" * n),
)


@given(names)
def test_an_asset_name_is_accepted_only_when_safe(name: str) -> None:
    try:
        accepted = validate_asset_name(name)
    except InvalidAssetName as refused:
        assert name not in str(refused) or len(name) < 3  # the reason never echoes it
        return
    assert accepted == name
    segments = name.split("/")
    assert all(s not in ("", ".", "..") for s in segments)
    assert "\\" not in name and all(ord(c) >= 0x20 and ord(c) != 0x7F for c in name)
    assert len(name.encode("utf-8", "surrogatepass")) <= 1024


# --- tokens ---------------------------------------------------------------------

maybe_text = st.one_of(st.none(), st.text(max_size=30))


@given(st.text(min_size=1, max_size=20), maybe_text, maybe_text, maybe_text)
def test_the_token_comes_from_the_path_then_bearer_then_query(
    asset: str, path: str | None, authorization: str | None, query: str | None
) -> None:
    name, token = presented_token(asset, path, authorization, query)
    if path is not None:
        assert (name, token) == (asset, path)
    elif (
        authorization
        and authorization.partition(" ")[0].lower() == "bearer"
        and (authorization.partition(" ")[2].strip())
    ):
        assert (name, token) == (asset, authorization.partition(" ")[2].strip())
    elif query and query.endswith(".dtsh") and not asset.endswith(".dtsh"):
        assert (name, token) == (asset + ".dtsh", query[:-5])
    else:
        assert (name, token) == (asset, query)


@pytest.fixture
def verifier() -> TokenVerifier:
    config = make_config("http://127.0.0.1:1", "fuzz")
    return TokenVerifier.from_config(config.auth, config.source)


b64 = st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=30)
token_like = st.one_of(
    st.text(max_size=80),
    st.lists(b64, min_size=3, max_size=3).map(".".join),
    st.builds(lambda t, cut: t[:cut], st.just(make_token()), st.integers(0, 200)),
    st.builds(
        lambda t, c: t[:-2] + c, st.just(make_token()), st.sampled_from(["A", "é", "\xff", "."])
    ),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=token_like)
def test_any_token_text_is_a_grant_or_an_auth_failure(verifier: TokenVerifier, token: str) -> None:
    try:
        verifier.verify(token)
    except AuthFailure as failure:
        assert failure.status in (401, 403)


asset_names = st.from_regex(r"[ab]{1,3}(/[ab.]{1,3}){0,2}(\.dtsh)?", fullmatch=True)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.sampled_from(["a/*", "**/b", "a?/**", "b", "*.dtsh"]), min_size=1, max_size=2),
    st.lists(asset_names, min_size=1, max_size=40),
)
def test_a_remembered_scope_answer_is_the_globs_answer(
    verifier: TokenVerifier, patterns: list[str], assets: list[str]
) -> None:
    """Whether a token's scope covers an asset is remembered (it is asked at every
    request); each answer, first or remembered, is the globs' own."""
    verifier.ALLOWED_SIZE = 16  # (an instance's own bound) emptied often within a run
    token = make_token(patterns)
    scope = verifier.verify(token).scope
    for asset in assets + assets:
        try:
            verifier.authorize(token, asset)
            allowed = True
        except AuthFailure as failure:
            assert failure.status == 403
            allowed = False
        assert allowed == scope.allows(asset)
    assert len(verifier._allowed) <= 16


# --- a running proxy ------------------------------------------------------------

header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=50,
)


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_running_proxy_answers_random_requests_without_a_5xx(
    emulator: Emulator, bucket: str, tmp_path: Path, data: st.DataObject
) -> None:
    put_object(emulator, bucket, "movies/a.mp4", bytes(range(256)) * 400)
    good = make_token("movies/**")
    with serve_process(emulator, bucket, tmp_path, 1, {}) as served:
        served.drain()
        for _ in range(60):
            token = data.draw(st.one_of(st.just(good), token_like.filter(lambda t: "/" not in t)))
            asset = data.draw(st.sampled_from(["movies/a.mp4", "movies/b.mp4", "x.mp4"]) | names)
            form = data.draw(st.sampled_from(["path", "bearer", "query"]))
            target = "/".join(_quote(s) for s in asset.split("/"))
            headers = {
                name: data.draw(st.one_of(range_headers, header_values, header_text))
                for name in data.draw(
                    st.sets(
                        st.sampled_from(
                            ["Range", "If-Match", "If-None-Match", "If-Modified-Since", "If-Range"]
                        )
                    )
                )
            }
            if form == "path":
                path = f"/t/{_quote(token)}/{target}"
            elif form == "bearer":
                path, headers["Authorization"] = f"/vod/{target}", f"Bearer {token}"
            else:
                path = f"/vod/{target}?token={_quote(token)}"
            method = data.draw(st.sampled_from(["GET", "HEAD"]))
            status = _status(served.port, method, path, headers)
            assert 200 <= status < 500, (status, method, path, headers)
        assert served.process.poll() is None


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="") or "-"


def _status(port: int, method: str, path: str, headers: dict[str, str]) -> int:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"))
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])
