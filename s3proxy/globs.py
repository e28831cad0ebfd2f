"""Asset-name globs, matched in time linear in the name (no backtracking regex): the
pieces between `**` gaps are bit-parallel automata, each run once over the name.

`*` matches within one path segment, `?` one character of a segment, and a segment that
is `**` any number of whole segments (`a/**/b` matches `a/b`; a trailing `**` at least
one segment). `**` at the start or end of a longer segment (`**.mp4`, `clip**`) reaches
across segments there too: `x/**.mp4` is `x/**/*.mp4`. Patterns are bounded in length
and in `**` count, so a signed scope can not make matching expensive.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

MAX_PATTERN_CHARS = 512
MAX_DOUBLE_STARS = 8

ANY_SEGMENTS = "**"


class GlobError(ValueError):
    """A pattern too long, or with too many `**`."""


@dataclass(frozen=True)
class _Piece:
    """Consecutive segment globs (`a*/b?c`), as a bit-parallel shift-and automaton: bit
    i of a state is "the piece's first i+1 characters are matched". A `*` is a position
    that takes any number of characters but `/`, none included; `?` one of them."""

    chars: dict[str, int]  # per literal character: the positions that take it
    other: int  # positions that take any character but `/` (`?` and `*`)
    star: int  # `*` positions: they repeat, and may be skipped
    begin: int  # what is matched before a character is read (a leading `*`, skipped)
    last: int  # the final position: the piece is matched
    literals: tuple[str, ...]  # its runs of plain characters: a name lacking one fails

    @classmethod
    def of(cls, segments: list[str]) -> _Piece:
        text = re.sub(r"\*+", "*", "/".join(segments))
        chars: dict[str, int] = {}
        other = star = 0
        for position, char in enumerate(text):
            bit = 1 << position
            if char in "*?":
                other |= bit
                star |= bit if char == "*" else 0
            else:
                chars[char] = chars.get(char, 0) | bit
        last = 1 << (len(text) - 1) if text else 0  # an empty segment: never matched
        literals = tuple(sorted(set(re.split(r"[*?]", text)) - {""}, key=len, reverse=True))
        return cls(chars, other, star, star & 1, last, literals)

    def end(self, name: str, start: int, anchored: bool, to_end: bool) -> int | None:
        """Where the earliest match of the piece that begins at a segment's start, at
        or after `start` (`anchored`: at `start` itself), ends at a segment's end (with
        `to_end`: at the name's end); None if there is none. One pass over the name,
        a few integer operations per character, whatever the pattern."""
        state = 0
        size = len(name)
        for at in range(start, size):
            char = name[at]
            taken = self.chars.get(char, 0) | (self.other if char != "/" else 0)
            if at == start or (not anchored and name[at - 1] == "/"):
                state |= self.begin
                moved = (state << 1) | 1  # a match may begin with this character
            else:
                moved = state << 1
            state = (moved & taken) | (state & self.star & taken)
            state |= (state << 1) & self.star  # a `*` after what matched may take none
            if not state:
                if anchored:
                    return None
                continue
            ends = at + 1 == size
            if state & self.last and (ends or name[at + 1] == "/") and (ends or not to_end):
                return at + 1
        return None


@dataclass(frozen=True)
class Glob:
    segments: tuple[str, ...]  # each a segment glob (`*`, `?`), or ANY_SEGMENTS

    @functools.cached_property
    def pieces(self) -> tuple[bool, list[_Piece], int]:
        return _plan(self.segments)  # built once per pattern, at its first match

    def matches(self, name: str) -> bool:
        return _match(self.pieces, name)


def _plan(segments: tuple[str, ...]) -> tuple[bool, list[_Piece], int]:
    """The pattern as pieces between its `**` gaps: whether it begins with a gap, the
    pieces, and the segments the trailing gap needs (-1: no trailing gap)."""
    pieces: list[_Piece] = []
    run: list[str] = []
    leading = bool(segments) and segments[0].startswith(ANY_SEGMENTS)
    trailing = -1
    for index, segment in enumerate(segments):
        if segment.startswith(ANY_SEGMENTS):
            if run:
                pieces.append(_Piece.of(run))
                run = []
            if index == len(segments) - 1:
                trailing = 1 if segment == ANY_SEGMENTS else 0  # `a/**`: one at least
        else:
            run.append(segment)
    if run:
        pieces.append(_Piece.of(run))
    return leading, pieces, trailing


def _match(plan: tuple[bool, list[_Piece], int], name: str) -> bool:
    """Each piece at the earliest place it fits after the one before (a gap takes
    whole segments, any number): the leftmost choice leaves the most for the rest."""
    leading, pieces, trailing = plan
    if not pieces:
        return bool(name) if trailing == 1 else True
    if not all(run in name for piece in pieces for run in piece.literals):
        return False  # a substring search each, far cheaper than a pass
    at = 0
    for number, piece in enumerate(pieces):
        anchored = number == 0 and not leading
        to_end = number == len(pieces) - 1 and trailing < 0
        if at > len(name):
            return False
        end = piece.end(name, at, anchored, to_end)
        if end is None:
            return False
        at = end + 1  # past the `/` that follows
    return trailing < 1 or at <= len(name)


def compile_glob(pattern: str) -> Glob:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise GlobError(f"a scope pattern longer than {MAX_PATTERN_CHARS} characters")
    if pattern.count("**") > MAX_DOUBLE_STARS:
        raise GlobError(f"a scope pattern with more than {MAX_DOUBLE_STARS} '**'")
    segments: list[str] = []
    for segment in pattern.split("/"):
        if segment == ANY_SEGMENTS:
            segments.append(ANY_SEGMENTS)
            continue
        lead = segment.startswith("**")
        trail = segment.endswith("**") and len(segment) > 2
        core = segment.replace("**", "*")
        if lead:
            segments.append(ANY_SEGMENTS)
        segments.append(core)
        if trail:
            segments.append(ANY_SEGMENTS + "?")  # zero or more more segments
    collapsed: list[str] = []
    for segment in segments:  # `**/**` is one `**`: keeps the table small
        if (
            segment.startswith(ANY_SEGMENTS)
            and collapsed
            and collapsed[-1].startswith(ANY_SEGMENTS)
        ):
            both_optional = segment == collapsed[-1] == ANY_SEGMENTS + "?"
            collapsed[-1] = segment if both_optional else ANY_SEGMENTS
            continue
        collapsed.append(segment)
    return Glob(tuple(collapsed))
