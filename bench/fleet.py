"""A fleet model: what a pool of s3proxy nodes costs in S3 egress at internet scale, by
how the balancer spreads requests. Trace-driven, with the store's own memory tier and
block arithmetic (s3proxy.store.memory.MemoryTier, s3proxy.store.blocks), not a copy.

    python bench/fleet.py                      # under a minute on 2 cores
    python bench/fleet.py --assets 100000 --views 60000 --cache-gib 64

The catalogue: `--assets` assets, sizes log-uniform from 50 MiB to 2 GiB, Zipf
popularity (s = 0.9). A view is Mist's: its start-up reads (the first 78 MB, 70 s of a
9 Mb/s asset) and 0-3 seeks reading 8 MiB each, every one a new connection (so
round-robin sends each to another node). Pools of 1 to 64 nodes with `--cache-gib` of
memory tier each, routed round-robin, by consistent hashing on the asset (a ring with
160 points per node, as nginx's `hash ... consistent` and HAProxy's `hash-type
consistent` build), and by consistent hashing with one node lost half way (its cache
gone, its share moved to the others). The first 20% of views fill the caches and are
not counted. Printed per pool and routing: S3 bytes per byte served, the block hit
ratio, and the busiest node's bytes served over the mean.

Blocks are 4 MiB here (1 MiB in production) to keep the run short: the figures compare
routings; they are not a forecast of any one deployment.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import itertools
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s3proxy.store.blocks import BlockKey, block_bounds, block_span
from s3proxy.store.memory import MemoryTier

MIB = 1 << 20
GIB = 1 << 30
BLOCK = 4 * MIB
START_BYTES = 78 * 1000 * 1000  # Mist's start-up: about 70 s of a 9 Mb/s asset
SEEK_BYTES = 8 * MIB
POINTS = 160  # ring points per node


class Sized:
    """A stand-in for a block's bytes: the memory tier counts len(), nothing is stored."""

    __slots__ = ("_length",)

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length


@dataclass(frozen=True)
class Read:
    asset: int
    start: int
    end: int  # inclusive


def catalogue(assets: int, rng: random.Random) -> list[int]:
    low, high = math.log(50 * MIB), math.log(2 * GIB)
    return [int(math.exp(rng.uniform(low, high))) for _ in range(assets)]


def trace(sizes: list[int], views: int, rng: random.Random) -> list[list[Read]]:
    """Views; each a list of reads, every one a new connection."""
    weights = list(itertools.accumulate(1 / (rank + 1) ** 0.9 for rank in range(len(sizes))))
    order = list(range(len(sizes)))
    rng.shuffle(order)  # popularity does not follow size
    out = []
    for _ in range(views):
        asset = order[bisect.bisect(weights, rng.random() * weights[-1])]
        size = sizes[asset]
        reads = [Read(asset, 0, min(size, START_BYTES) - 1)]
        for _ in range(rng.randint(0, 3)):
            start = rng.randrange(size)
            reads.append(Read(asset, start, min(size, start + SEEK_BYTES) - 1))
        out.append(reads)
    return out


class Ring:
    """Consistent hashing on the asset name: points on a circle, nodes removable."""

    def __init__(self, nodes: int) -> None:
        self._points: list[tuple[int, int]] = sorted(
            (_hash(f"node{node}-{point}"), node) for node in range(nodes) for point in range(POINTS)
        )
        self._keys = [p for p, _ in self._points]

    def remove(self, node: int) -> None:
        self._points = [p for p in self._points if p[1] != node]
        self._keys = [p for p, _ in self._points]

    def node_for(self, asset: int) -> int:
        at = bisect.bisect(self._keys, _hash(f"movies/{asset}/master.mp4")) % len(self._keys)
        return self._points[at][1]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big")


@dataclass
class Result:
    served: int = 0
    fetched: int = 0
    hits: int = 0
    accesses: int = 0


def simulate(
    sizes: list[int],
    views: list[list[Read]],
    nodes: int,
    cache_bytes: int,
    route: str,
) -> tuple[Result, list[int]]:
    tiers = [MemoryTier(cache_bytes) for _ in range(nodes)]
    served_by = [0] * nodes
    ring = Ring(nodes)
    turn = itertools.count()
    counted_from = len(views) // 5
    lost_at = len(views) // 2 if route == "hash, one node lost" and nodes > 1 else None
    alive = list(range(nodes))
    result = Result()
    for number, view in enumerate(views):
        if number == lost_at:
            gone = nodes - 1
            ring.remove(gone)
            tiers[gone] = MemoryTier(cache_bytes)  # its cache is gone with it
            alive.remove(gone)
        counting = number >= counted_from
        for read in view:
            if route == "round-robin":
                node = alive[next(turn) % len(alive)]
            else:
                node = ring.node_for(read.asset)
            tier, size = tiers[node], sizes[read.asset]
            for index in block_span(read.start, read.end, BLOCK):
                key = BlockKey("vod", str(read.asset), "v1", index)
                first, last = block_bounds(index, BLOCK, size)
                hit = tier.get(key) is not None
                if not hit:
                    tier.put(key, Sized(last - first + 1))  # type: ignore[arg-type]
                if counting:
                    result.accesses += 1
                    result.hits += hit
                    if not hit:
                        result.fetched += last - first + 1
            if counting:
                length = read.end - read.start + 1
                result.served += length
                served_by[node] += length
    return result, served_by


def rows(args: argparse.Namespace) -> Iterator[str]:
    rng = random.Random(args.seed)
    sizes = catalogue(args.assets, rng)
    views = trace(sizes, args.views, rng)
    cache = int(args.cache_gib * GIB)
    yield (
        f"fleet model: {args.assets:,} assets (50 MiB-2 GiB, Zipf 0.9), {args.views:,} Mist "
        f"views, {args.cache_gib:g} GiB memory tier per node, {BLOCK // MIB} MiB blocks"
    )
    yield (
        f"  {'nodes':>5}  {'routing':<20} {'S3 B / B served':>15} {'hit ratio':>10} "
        f"{'busiest/mean':>13}"
    )
    for nodes in args.pools:
        for route in ("round-robin", "hash on asset", "hash, one node lost"):
            if nodes == 1 and route != "round-robin":
                continue
            result, served_by = simulate(sizes, views, nodes, cache, route)
            live = [s for s in served_by if s] or [0]
            busiest = max(live) / (sum(live) / len(live)) if sum(live) else 0.0
            yield (
                f"  {nodes:>5}  {route:<20} {result.fetched / result.served:>15.3f} "
                f"{result.hits / result.accesses:>10.3f} {busiest:>13.2f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", type=int, default=20_000)
    parser.add_argument("--views", type=int, default=50_000)
    parser.add_argument("--cache-gib", type=float, default=32)
    parser.add_argument(
        "--pools", type=lambda s: [int(n) for n in s.split(",")], default=[1, 4, 16, 64]
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    started = time.monotonic()
    for line in rows(args):
        print(line, flush=True)
    print(f"  ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
