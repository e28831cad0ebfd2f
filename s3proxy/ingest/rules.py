"""The naming rule: which uploads are taken, and the asset name each is published as.

`match` is a pattern for the upload's key below the source prefix, `publish_as` a
template for the asset name, both with `{name}` placeholders:
`match: "{id}.{ext}"`, `publish_as: "{id}/master.mp4"` publishes `raw/abc.mov` as
`abc/master.mp4`. A placeholder stands for one or more characters of one path segment
(no `/`); `{ext}` for the last extension (letters and digits, no `.`). A segment holds at
most one placeholder besides `{ext}`, so matching a key is linear in its length (uploaders
choose the keys; a pattern must not backtrack on them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_EXT = "ext"


class RuleError(ValueError):
    """A pattern or template an operator must fix (the message names what)."""


@dataclass(frozen=True)
class NameRule:
    match: str
    publish_as: str
    _regex: re.Pattern[str]

    @classmethod
    def compile(cls, match: str, publish_as: str) -> NameRule:
        return cls(match, publish_as, _compile(match, publish_as))

    def fields(self, key: str) -> dict[str, str] | None:
        """The placeholders' values for a key below the source prefix, or None."""
        found = self._regex.fullmatch(key)
        return found.groupdict() if found else None

    def asset_for(self, key: str) -> str | None:
        """The asset name for an upload's key (below the source prefix), or None when the
        rule does not take it."""
        values = self.fields(key)
        if values is None:
            return None
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.publish_as)


def _compile(match: str, publish_as: str) -> re.Pattern[str]:
    if not match:
        raise RuleError("match: must not be empty")
    names: list[str] = []
    parts: list[str] = []
    for segment in match.split("/"):
        found = list(_PLACEHOLDER.finditer(segment))
        plain = [m for m in found if m.group(1) != _EXT]
        if len(plain) > 1:
            raise RuleError(
                f"match: {match!r}: the segment {segment!r} holds more than one placeholder "
                "besides {ext}; put a '/' or literal text between them"
            )
        exts = [m for m in found if m.group(1) == _EXT]
        if exts and (len(exts) > 1 or not segment.endswith(".{ext}")):
            raise RuleError(f"match: {match!r}: {{ext}} may only end a segment, as '.{{ext}}'")
        pattern, last = "", 0
        for m in found:
            pattern += re.escape(segment[last : m.start()])
            name = m.group(1)
            if name in names:
                raise RuleError(f"match: {match!r}: {{{name}}} appears twice")
            names.append(name)
            pattern += f"(?P<{name}>[A-Za-z0-9]+)" if name == _EXT else f"(?P<{name}>[^/]+)"
            last = m.end()
        parts.append(pattern + re.escape(segment[last:]))
    if "{" in _PLACEHOLDER.sub("", match) or "}" in _PLACEHOLDER.sub("", match):
        raise RuleError(f"match: {match!r}: a placeholder is {{name}} (letters, digits, _)")
    used = [m.group(1) for m in _PLACEHOLDER.finditer(publish_as)]
    unknown = [name for name in used if name not in names]
    if unknown:
        raise RuleError(f"publish_as: {publish_as!r}: {{{unknown[0]}}} is not in match ({match!r})")
    if not publish_as or publish_as.startswith("/") or "{" in _PLACEHOLDER.sub("", publish_as):
        raise RuleError(f"publish_as: {publish_as!r}: must be an asset name template")
    return re.compile("/".join(parts))
