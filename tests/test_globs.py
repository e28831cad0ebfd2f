"""Scope globs: the linear matcher agrees with a slow reference regex, and a hostile
pattern against a long name costs little."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3proxy.auth import AssetScope
from s3proxy.globs import MAX_PATTERN_CHARS, GlobError, compile_glob


def reference(pattern: str) -> re.Pattern[str]:
    """The documented meaning, spelled as a (slow, backtracking) regex, segment by
    segment: a `**` segment is any number of whole segments (at least one at the end);
    `**` at a segment's start or end reaches across segments from there."""

    def within(text: str) -> str:
        return "".join(
            "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
            for c in text.replace("**", "*")
        )

    parts = pattern.split("/")
    out = ""
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            out += "[^/]+(?:/[^/]+)*" if last else "(?:[^/]+/)*"
            continue
        if part.startswith("**"):
            out += "(?:[^/]+/)*"
        out += within(part)
        if part.endswith("**") and len(part) > 2:
            out += "(?:/[^/]+)*"
        if not last:
            out += "/"
    return re.compile(out, re.DOTALL)


# names as the proxy accepts them: no empty segment
segment = st.text(alphabet="ab.", min_size=1, max_size=4)
names = st.lists(segment, min_size=1, max_size=6).map("/".join)
# patterns whose `**` stand as a whole segment or at a segment's start or end (the
# reference's `a**b`, across segments, is not a form scopes use)
plain = st.text(alphabet="ab.*?", min_size=1, max_size=4).filter(lambda s: "**" not in s)
pattern_segment = st.one_of(
    plain,
    st.just("**"),
    plain.map(lambda s: "**" + s.lstrip("*")),
    plain.map(lambda s: s.rstrip("*") + "**").filter(lambda s: s != "**"),
)
patterns = st.lists(pattern_segment, min_size=1, max_size=4).map("/".join)


@settings(max_examples=2000, deadline=None)
@given(patterns, names)
def test_the_matcher_agrees_with_the_reference(pattern: str, name: str) -> None:
    assert compile_glob(pattern).matches(name) == bool(reference(pattern).fullmatch(name)), (
        pattern,
        name,
    )


def test_the_scopes_of_the_readme() -> None:
    scope = AssetScope(
        ("movies/*/master.mp4", "shows/**", "clips/a?.ts", "x/**/y.mp4", "trailers/**.mp4")
    )
    assert scope.allows("movies/abc/master.mp4")
    assert not scope.allows("movies/abc/def/master.mp4")
    assert scope.allows("shows/s1/e1/x.mp4") and not scope.allows("shows")
    assert scope.allows("x/y.mp4") and scope.allows("x/1/2/y.mp4")
    assert scope.allows("trailers/a.mp4") and scope.allows("trailers/2026/a.mp4")
    assert not scope.allows("trailers/a.ts")


def test_a_hostile_pattern_against_a_long_name_is_cheap() -> None:
    glob = compile_glob("**/**/**/**/*.mp4")
    name = "/".join(["a" * 20] * 20) + "/" + "b" * 13  # 434 bytes, no match
    started = time.perf_counter()
    for _ in range(100):
        assert not glob.matches(name)
    assert (time.perf_counter() - started) / 100 < 0.01  # the old regex: 1.26 s
    stars = compile_glob("*a*a*a*a*a*a*a*b")
    started = time.perf_counter()
    assert not stars.matches("a" * 1000)
    assert time.perf_counter() - started < 0.5
    # one segment, a long literal after a `*`: a two-pointer match took 70 ms
    long_literal = compile_glob("*" + "a" * 510 + "b")
    started = time.perf_counter()
    for _ in range(10):
        assert not long_literal.matches("a" * 1020)
        assert not long_literal.matches("a" * 510 + "b" + "a" * 500)  # its run is in there
    assert (time.perf_counter() - started) / 20 < 0.01


def test_patterns_are_bounded() -> None:
    with pytest.raises(GlobError):
        compile_glob("a" * (MAX_PATTERN_CHARS + 1))
    with pytest.raises(GlobError):
        compile_glob("/".join(["**"] * 9))
