"""Time to playable: how long a Mist-like reader (tests/mistlike.py: the box walk, the
`moov`, then two greedy readers taking the first 70 s of media, as Mist does before its
first segment) needs for its start-up reads of a prepared (index-first) 9 Mb/s MP4, with
the origin 30 and 100 ms away, for assets of 50 MiB, 500 MiB and 1.5 GiB: s3proxy cold,
s3proxy warmed (POST /warm), the same start with every byte cached, and the old way
(download the whole file first). Also printed: the S3 GETs and bytes of the cold
start-up, of the warm-up, and of the start-up after it.

    apt-get install nginx-light ffmpeg haproxy
    python bench/playable.py            # --sizes 50,500 for a shorter run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import BUCKET, MIB, Proxy, Stack, add_settle_argument, link, settle_memory

from tests.mistlike import mp4_start_up


def make_asset(stack: Stack, size_mib: int) -> str:
    """A faststart H.264 MP4 of about `size_mib` MiB: ten seconds encoded at a high rate,
    then looped (stream copy) to length."""
    seed = stack.work / "seed.mp4"
    if not seed.exists():
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=1280x720:rate=25:duration=10",
                "-f",
                "lavfi",
                "-i",
                "sine=duration=10",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-b:v",
                "9M",
                "-c:a",
                "aac",
                "-movflags",
                "+faststart",
                str(seed),
            ],
            check=True,
            timeout=300,
        )
    loops = max(1, round(size_mib * MIB / seed.stat().st_size))
    name = f"asset{size_mib}.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-stream_loop",
            str(loops - 1),
            "-i",
            str(seed),
            "-c",
            "copy",
            "-movflags",
            "+faststart",
            str(stack.data / name),
        ],
        check=True,
        timeout=1200,
    )
    (stack.data / name).chmod(0o644)
    return name


def settled(stack: Stack, key: str) -> tuple[int, int]:
    """(GETs, bytes) the origin has sent for `key`, once its log has caught up."""
    last = stack.origin_stats(key)
    for _ in range(20):
        time.sleep(0.25)
        now = stack.origin_stats(key)
        if now == last:
            return now
        last = now
    return last


async def download_whole(url: str) -> float:
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        async for _ in response.content.iter_chunked(1 << 20):
            pass
    return time.perf_counter() - started


def measure(stack: Stack, proxy: Proxy, port: int, delay: int, name: str, runs: int) -> str:
    actual = (stack.data / name).stat().st_size
    cold, warm, cached, whole = [], [], [], []
    traffic: dict[str, list[tuple[int, int]]] = {"cold": [], "warm-up": [], "after": []}
    for run in range(runs):
        key = link(stack, name, f"cold-{delay}-{run}-{name}")
        source = proxy.path(key)
        cold.append(asyncio.run(mp4_start_up("127.0.0.1", proxy.port, source)).seconds)
        traffic["cold"].append(settled(stack, key))
        cached.append(asyncio.run(mp4_start_up("127.0.0.1", proxy.port, source)).seconds)
        key = link(stack, name, f"warm-{delay}-{run}-{name}")
        request = urllib.request.Request(
            f"http://127.0.0.1:{proxy.admin}/warm/{key}", method="POST"
        )
        urllib.request.urlopen(request, timeout=300).read()
        warmed = settled(stack, key)
        traffic["warm-up"].append(warmed)
        warm.append(asyncio.run(mp4_start_up("127.0.0.1", proxy.port, proxy.path(key))).seconds)
        total = settled(stack, key)
        traffic["after"].append((total[0] - warmed[0], total[1] - warmed[1]))
        whole.append(asyncio.run(download_whole(f"http://127.0.0.1:{port}/{BUCKET}/{name}")))
    figures = " ".join(
        f"{statistics.median(g for g, _ in traffic[k]):>6.0f} / "
        f"{statistics.median(b for _, b in traffic[k]) / MIB:>6.1f}"
        for k in ("cold", "warm-up", "after")
    )
    c, w, h, d = (statistics.median(x) for x in (cold, warm, cached, whole))
    return (
        f"  {delay:>4}ms {actual / MIB:>6.0f} MiB {c:>7.3f}s {w:>7.3f}s {h:>7.3f}s "
        f"{c / h:>10.2f}x {(h + delay / 1000) / h:>6.2f}x {d:>8.3f}s                  {figures}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="50,500,1536", help="MiB, comma separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--delays",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[30, 100],
        help="origin latencies in ms (default 30,100)",
    )
    add_settle_argument(parser)
    args = parser.parse_args()
    for tool in ("nginx", "ffmpeg"):
        if shutil.which(tool) is None:
            print(f"needs {tool}: apt-get install nginx-light ffmpeg", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="s3proxy-playable-"))
    lines = [
        f"time to playable (median of {args.runs}): seconds until the Mist-like start-up "
        "reads are done; cached = the same start again, every byte in the cache; floor = "
        "(cached + one origin round trip) / cached, as no cold start gets its first byte "
        "sooner than a round trip to the origin",
        f"  memory settled first: {args.settle_mib} MiB touched in "
        f"{settle_memory(args.settle_mib):.1f} s (--settle-mib)",
    ]
    lines.append(
        f"  {'origin':>6} {'asset':>10} {'cold':>8} {'warmed':>8} {'cached':>8} "
        f"{'cold/cached':>11} {'floor':>7} {'download':>9}   S3 GETs / MiB: {'cold start':>14} "
        f"{'warm-up':>14} {'start after it':>15}"
    )
    stack = Stack(tmp)
    try:
        from run import make_data

        make_data(stack, quick=True)
        stack.start_origin()
        lines.append(f"  origin latency added by: {stack.relay_kind}")
        names = {size: make_asset(stack, size) for size in (int(s) for s in args.sizes.split(","))}
        for delay in args.delays:
            port = stack.delayed_port if delay == 30 else stack.relay(delay)
            proxy = stack.start_s3proxy(
                f"s3proxy-playable-{delay}", delayed=True, max_bytes="512MiB", upstream_port=port
            )
            for name in names.values():
                lines.append(measure(stack, proxy, port, delay, name, args.runs))
            stack.retire(proxy)
        for name in names.values():
            os.unlink(stack.data / name)
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
