"""What a hostile signed scope costs to match: the worst patterns the bounds allow
(`MAX_DOUBLE_STARS` `**`, many `*`) against long names that do not match.

    python bench/globs.py

Printed per case: the median and worst time of one match in 200 (target: under 1 ms;
`**/**/**/**/*.mp4` against a 434-byte name held the event loop for 1.26 s before the
matcher was linear).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s3proxy.auth import AssetScope
from s3proxy.globs import compile_glob


def timed(match: Callable[[], bool], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        match()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000, max(samples) * 1000


def long_name(segments: int, width: int = 20) -> str:
    return "/".join(["a" * width] * segments) + "/" + "b" * 13  # ends in no .mp4: no match


def main() -> int:
    cases = [
        ("**/**/**/**/*.mp4", long_name(20)),  # 434 bytes
        ("**/**/**/**/**/**/**/**/*.mp4", long_name(48)),  # 8 `**`, 1,021 bytes
        ("*a*a*a*a*a*a*a*b", "a" * 1000),
        ("x/**/" + "*a" * 40 + "*b", "x/" + "/".join(["a" * 200] * 4)),
        ("*" + "a" * 510 + "b", "a" * 1020),  # one segment: quadratic for a two-pointer match
        ("**/" + "/".join(["*"] * 200) + "/x", "/".join(["a"] * 500)),  # many segments
        # the pattern's plain runs are all in the name (no shortcut): a whole pass
        ("*" + "a" * 510 + "b", "a" * 510 + "b" + "a" * 500),
        ("**/" + "/".join(["*"] * 200) + "/x", "/".join(["a"] * 499) + "/xa"),
    ]
    print("one match, milliseconds (median / worst)")
    for pattern, name in cases:
        glob = compile_glob(pattern)
        median, worst = timed(lambda g=glob, n=name: g.matches(n), 200)
        print(f"  s3proxy  {pattern[:34]:<34} {len(name):5d} B  {median:8.3f} / {worst:8.3f}")
    # a whole scope as a token may carry it: as many such patterns as 8 KiB holds, asked
    # for a sidecar (matched twice: as itself, then as its asset)
    scope = AssetScope(tuple(f"*{'a' * 500}{n:02d}b" for n in range(15)))
    name = "a" * 1012 + ".dtsh"
    median, worst = timed(lambda: scope.allows(name), 50)
    label = "15 x *a...ab (a 7.7 KiB scope)"
    print(f"  s3proxy  {label:<34} {len(name):5d} B  {median:8.3f} / {worst:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
