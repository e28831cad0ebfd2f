"""What a cold read costs s3proxy in CPU: milliseconds of the proxy process's CPU per MiB
it fetches from the origin and sends on, so a change to the cold path (S3 body reads,
block joins, readers following a fetch) shows as a figure instead of in the noise of the
latency cases, where the relay, the origin and the client share the same cores.

    python bench/coldpath.py                  # cold and cached, median of the rounds
    python bench/coldpath.py --rounds 9 --mib 64
    python bench/coldpath.py --workers 2      # workers share blocks through /dev/shm
    python bench/coldpath.py --disk           # cached reads from a disk tier
    python /tmp/old/bench/coldpath.py        # an older tree (git archive), side by side

The origin is bench/run.py's nginx (no relay: the proxy is the bottleneck, so CPU time is
close to wall time) and the client is curl, which costs little. Each round reads a new
key (the same bytes under another name: cold for the proxy) with one `bytes=0-` GET,
then the same key again (three times with workers): all memory hits when the worker that
fetched it serves it, or all hits on the shared tier when another worker does, the first
time or again (each row says which). With workers,
cold reads first fill the shared tier to its bound, so its tmpfs pages are recycled as
a running server's are: pages new to the tier cost 2-3x more to write into on these
virtual machines, whose host takes freed pages back.
With `--disk`, the blocks a read leaves in memory are written to the disk tier when a
later read evicts them, so some writes land in the next round's cold row (or, if the
cached read copies blocks into memory, in the cached row).
CPU is the user + system time from /proc, in clock ticks, of the proxy process (with
workers, the supervisor's and every worker's). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/ is not a package: its own directory is on the path
    MIB,
    Proxy,
    add_settle_argument,
    link,
    make_data,
    settle_memory,
    stack_in,
)

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
MAX_MIB = 1024  # cache.max_bytes
SHARED_MIB = MAX_MIB * 3 // 4  # with workers, the shared tier's part of it (tiers.py)
DISK_MEMORY_MIB = 16  # --disk: cache.max_bytes, so most of an object is read from disk


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (field 3, the state, first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def family(pid: int) -> list[int]:
    """The process and its children (a supervisor's workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError):
                continue  # gone meanwhile
    return [pid, *children]


def usage(pids: list[int]) -> tuple[list[float], int]:
    """(user + system seconds of each process, minor page faults of all) so far."""
    cpu, faults = [], 0
    for pid in pids:
        fields = _stat(pid)
        cpu.append((int(fields[11]) + int(fields[12])) * TICK_S)
        faults += int(fields[7])
    return cpu, faults


def curl(url: str) -> tuple[int, float]:
    """(body bytes, seconds) of one `bytes=0-` GET."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-r", "0-", "-w", "%{size_download} %{time_total}", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return int(out[0]), float(out[1])


def read_once(proxy: Proxy, pids: list[int], key: str) -> tuple[float, int, float, int, int]:
    """(CPU s, page faults, wall s, bytes, the pid that served it) of one whole read
    through the proxy (CPU and faults of all of `pids`: with workers, the supervisor and
    each worker; the server is the one whose CPU rose most)."""
    cpu, faults = usage(pids)
    size, seconds = curl(proxy.url(key))
    cpu_after, faults_after = usage(pids)
    rose = [after - before for before, after in zip(cpu, cpu_after, strict=True)]
    server = pids[rose.index(max(rose))]
    return sum(rose), faults_after - faults, seconds, size, server


def per_mib(
    proxy: Proxy, pids: list[int], key: str, mib: int
) -> tuple[tuple[float, float, float], int]:
    """One whole read of a `mib` MiB key: (ms of CPU, page faults, MiB/s) per MiB, and
    the pid that served it."""
    cpu, faults, wall, size, server = read_once(proxy, pids, key)
    assert size == mib * MIB, size
    return (cpu * 1000 / mib, faults / mib, mib / wall), server


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mib", type=int, choices=(64, 256), default=64, help="object size")
    parser.add_argument(
        "--workers", type=int, default=1, help="server.workers (2: blocks go through /dev/shm)"
    )
    parser.add_argument(
        "--disk",
        action="store_true",
        help=f"one worker, {DISK_MEMORY_MIB} MiB of memory and a disk tier: cached reads "
        "come from the disk tier's files",
    )
    add_settle_argument(parser)
    args = parser.parse_args()
    if args.disk and args.workers != 1:
        parser.error("--disk measures one worker")
    for tool in ("nginx", "curl"):
        if shutil.which(tool) is None:
            print(f"bench needs {tool}: apt-get install nginx-light curl", file=sys.stderr)
            return 2
    settled = settle_memory(args.settle_mib)
    source = "asset64.mp4" if args.mib == 64 else "big1g.mp4"
    tmp = Path(tempfile.mkdtemp(prefix="s3proxy-coldpath-"))
    cold: list[tuple[float, float, float]] = []
    hot: list[tuple[float, float, float]] = []  # served by the worker that fetched it
    peer: list[tuple[float, float, float]] = []  # by another: from the shared tier
    again: list[tuple[float, float, float]] = []  # by another, which has read it before
    on_disk: list[tuple[float, float, float]] = []  # --disk: mostly from the disk tier
    try:
        with stack_in(tmp) as stack:
            make_data(stack, quick=True)  # the big file is 256 MiB
            stack.start_origin()
            tiers: dict[str, Any] = {"max_bytes": f"{MAX_MIB}MiB"}
            if args.disk:
                disk = {"path": str(tmp / "disk"), "max_bytes": f"{MAX_MIB}MiB"}
                tiers = {"max_bytes": f"{DISK_MEMORY_MIB}MiB", "disk": disk}
            proxy = stack.start_s3proxy(
                "s3proxy-coldpath", delayed=False, workers=args.workers, **tiers
            )
            pids = family(proxy.process.pid)
            assert len(pids) == args.workers + (args.workers > 1), pids
            for _ in range(args.workers):  # each worker's connections and imports
                read_once(proxy, pids, link(stack, source, "warm-up.mp4"))
            if args.workers > 1:
                for n in range(SHARED_MIB // args.mib + args.workers):
                    read_once(proxy, pids, link(stack, source, f"fill-{n}.mp4"))
            for n in range(args.rounds):
                key = link(stack, source, f"cold-{n}.mp4")
                row, fetcher = per_mib(proxy, pids, key, args.mib)
                cold.append(row)
                if args.disk:
                    time.sleep(0.5)  # evicted blocks are written in a thread
                    on_disk.append(per_mib(proxy, pids, key, args.mib)[0])
                    continue
                served = {fetcher}
                for _read in range(3 if args.workers > 1 else 1):  # the kernel picks the worker
                    row, server = per_mib(proxy, pids, key, args.mib)
                    (hot if server == fetcher else again if server in served else peer).append(row)
                    served.add(server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"s3proxy CPU per MiB of a whole-object read ({os.cpu_count()} cores; "
        f"{args.mib} MiB object, {args.rounds} rounds, {args.workers} worker(s); "
        f"memory settled first: {args.settle_mib} MiB in {settled:.1f} s)"
    )
    for name, rows in (
        ("cold (every byte from the origin)", cold),
        ("cached, same worker (memory)", hot),
        ("cached, other worker (shared tier)", peer),
        ("cached, other worker, read again", again),
        (f"cached, disk tier (+{DISK_MEMORY_MIB} MiB memory)", on_disk),
    ):
        if not rows:
            continue
        ms, faults, rate = ([r[i] for r in rows] for i in range(3))
        print(
            f"  {name:<36} {statistics.median(ms):6.2f} ms CPU/MiB "
            f"(min {min(ms):.2f}, max {max(ms):.2f}); {statistics.median(faults):6.0f} page "
            f"faults/MiB; {statistics.median(rate):6.0f} MiB/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
