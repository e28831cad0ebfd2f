"""Asset-name globs, matched in time linear in the name (no backtracking regex).

`*` matches within one path segment, `?` one character of a segment, and a segment that
is `**` any number of whole segments (`a/**/b` matches `a/b`; a trailing `**` at least
one segment). `**` at the start or end of a longer segment (`**.mp4`, `clip**`) reaches
across segments there too: `x/**.mp4` is `x/**/*.mp4`. Patterns are bounded in length
and in `**` count, so a signed scope can not make matching expensive.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PATTERN_CHARS = 512
MAX_DOUBLE_STARS = 8

ANY_SEGMENTS = "**"


class GlobError(ValueError):
    """A pattern too long, or with too many `**`."""


@dataclass(frozen=True)
class Glob:
    segments: tuple[str, ...]  # each a segment glob (`*`, `?`), or ANY_SEGMENTS

    def matches(self, name: str) -> bool:
        return _match_segments(self.segments, name.split("/"))


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


def _match_segments(pattern: tuple[str, ...], names: list[str]) -> bool:
    """Dynamic programming over (pattern segment, name segment): O(P x N) segment
    matches, each linear in the segment's length times its pattern's."""
    count = len(names)
    # reach[j]: the pattern so far matches the first j name segments
    reach = [True] + [False] * count
    for index, segment in enumerate(pattern):
        last = index == len(pattern) - 1
        if segment.startswith(ANY_SEGMENTS):
            # `**` (at least one segment when it ends the pattern), `**?` (zero or more)
            minimum = 1 if segment == ANY_SEGMENTS and last else 0
            nxt = [False] * (count + 1)
            seen = False
            for j in range(count + 1):
                if j - minimum >= 0 and reach[j - minimum]:
                    seen = True
                nxt[j] = seen
            reach = nxt
        else:
            reach = [False] + [reach[j] and match_segment(segment, names[j]) for j in range(count)]
        if not any(reach):
            return False
    return reach[count]


def match_segment(pattern: str, text: str) -> bool:
    """Wildcard match of one segment (`*`, `?`; no `/` in either): the two-pointer
    algorithm, at most len(pattern) x len(text) steps, no recursion."""
    p = t = 0
    star, star_t = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, star_t = p, t
            p += 1
        elif star >= 0:
            p = star + 1
            star_t += 1
            t = star_t
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)
