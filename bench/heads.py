"""Clients that never finish a request head cost s3proxy little, and others keep their
latency meanwhile.

    apt-get install nginx-light          # the origin (as bench/run.py uses it)
    python bench/heads.py                # 1,000 hostile connections for 20 s
    python bench/heads.py --connections 200 --seconds 10

Half the hostile connections send a head one byte a second (slowloris); the other half
send 8,000-byte header lines (each under aiohttp's per-line bound) and never the blank
line that ends a head. A connection s3proxy closes is opened again, so the count stays
up for the whole run. Meanwhile one client reads a cached 64 KiB range over and over.
Printed: s3proxy's resident memory before, at its peak and after the attack; the normal
client's median and 99th-percentile latency before and during it; what the hostile
connections were answered. Figures, not assertions: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from run import MIB, Proxy, Stack, stack_in

KIB = 1 << 10


def rss_mib(proxy: Proxy) -> float:
    for line in Path(f"/proc/{proxy.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def latencies(url: str, seconds: float) -> list[float]:
    """One client reading a cached 64 KiB range, sequentially, for `seconds`."""
    out: list[float] = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and len(out) < 100_000:
            started = time.perf_counter()
            async with session.get(url, headers={"Range": f"bytes=0-{64 * KIB - 1}"}) as r:
                await r.read()
                assert r.status == 206, r.status
            out.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
    return out


async def hostile(port: int, slow: bool, until: float, answers: collections.Counter[str]) -> None:
    """One hostile connection, opened again whenever it is closed, until `until`."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            answers["connect failed"] += 1
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(b"GET /vod/a.mp4 HTTP/1.1\r\nHost: x\r\n")
            n = 0
            while time.monotonic() < until and not reader.at_eof():
                if slow:
                    writer.write(b"x")
                    await asyncio.sleep(1.0)
                else:
                    writer.write(b"X-Pad-%d: %s\r\n" % (n, b"p" * 8000))
                    n += 1
                    await asyncio.sleep(0.25)
                await writer.drain()
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break
            data = await asyncio.wait_for(reader.read(200), 2)
            answers[data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"] += 1
        except (TimeoutError, OSError):
            answers["reset"] += 1
        finally:
            writer.close()


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"median {statistics.median(ordered) * 1000:6.2f} ms, p99 {p99 * 1000:6.2f} ms"


async def attack(stack: Stack, ours: Proxy, connections: int, seconds: float) -> list[str]:
    url = ours.url("heads.bin")
    await latencies(url, 1.0)  # warm: the block is cached
    before = rss_mib(ours)
    quiet = await latencies(url, 5.0)
    answers: collections.Counter[str] = collections.Counter()
    until = time.monotonic() + seconds
    tasks = [
        asyncio.ensure_future(hostile(ours.port, i % 2 == 0, until, answers))
        for i in range(connections)
    ]
    peak = before
    during_task = asyncio.ensure_future(latencies(url, seconds))
    while time.monotonic() < until:
        await asyncio.sleep(0.2)
        peak = max(peak, rss_mib(ours))
    during = await during_task
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(1.0)
    after = rss_mib(ours)
    top = ", ".join(f"{what}: {count}" for what, count in answers.most_common(4))
    return [
        f"{connections} hostile connections for {seconds:.0f} s "
        f"(half one byte a second, half 8,000-byte header lines)",
        f"  s3proxy RSS: before {before:.1f} MiB, peak {peak:.1f} MiB "
        f"(+{peak - before:.1f}; target < +64), after {after:.1f} MiB",
        f"  normal client, 64 KiB hits: quiet {summary(quiet)} ({len(quiet)} requests)",
        f"                              attack {summary(during)} ({len(during)} requests)",
        f"  hostile connections were answered: {top}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        print("bench needs nginx: apt-get install nginx-light", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="s3proxy-heads-"))
    try:
        with stack_in(tmp) as stack:
            stack.work.chmod(0o755)
            stack.data.mkdir(parents=True)
            for each in (stack.data.parent, stack.data):
                each.chmod(0o755)
            (stack.work / "tmp").mkdir(mode=0o777)
            for name, data in (("probe.bin", b"ok"), ("heads.bin", b"h" * MIB)):
                (stack.data / name).write_bytes(data)
                (stack.data / name).chmod(0o644)
            stack.start_origin()
            ours = stack.start_s3proxy("s3proxy-heads", delayed=False)
            lines = asyncio.run(attack(stack, ours, args.connections, args.seconds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
