"""s3proxy against nginx's slice cache, side by side, on the same data and the same origin.

    apt-get install nginx-light wrk haproxy   # origin, peer, load generator, delaying relay
    python bench/run.py                  # prints every figure and ratio from one run
    python bench/run.py --cases a,c,e    # a subset

The origin is nginx serving files at /<bucket>/<key> (Range, HEAD, If-Match, ETag), so
both proxies read the same bytes the same way; a relay in front of it adds 30 ms to each
request for the latency cases (HAProxy with a Lua delay, or delay_proxy.py without it:
see `Stack.relay`). The peer is nginx with `slice 1m`,
`proxy_cache` and `proxy_cache_lock`. Every server runs on 127.0.0.1; every loop is
bounded in count and time. Figures, not assertions: the machine is shared and noisy.
Before anything is measured, 4 GiB are touched once (`--settle-mib`): in a virtual
machine, memory the guest never used costs several times more at its first touch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
BUCKET = "media"
MIB = 1 << 20
SECRET = "bench-only-placeholder-secret-0123456789abcdef0123456789abcdef"


def settle_memory(mib: int) -> float:
    """Touch `mib` MiB once, in a child process that then exits, before anything is
    measured; the seconds it took. A virtual machine's host may back its memory only when
    the guest first touches a page: here, a page never touched since boot cost about 2 ms
    per MiB, four times one recycled, and a cold read through s3proxy took 0.39-0.45 s
    instead of 0.22-0.25 s once its cache grew into such pages. A server that has run
    for a while only recycles pages; so should the figures."""
    if mib <= 0:
        return 0.0
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "for _ in range(int(sys.argv[1]) // 64):\n"
            "    b = bytearray(64 << 20)\n"
            "    b[::4096] = bytes(len(b[::4096]))\n"  # a write to every page
            "    del b\n",
            str(mib),
        ],
        check=True,
    )
    return time.perf_counter() - started


def add_settle_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--settle-mib",
        type=int,
        default=4096,
        help="MiB of memory to touch once before measuring (see settle_memory; 0: none)",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class Stack:
    """The origin, the delaying relay, and the proxies under test."""

    work: Path
    origin_port: int = field(default_factory=free_port)
    delayed_port: int = field(default_factory=free_port)
    relay_kind: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.work / "origin" / BUCKET

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, **kwargs)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

    def retire(self, *proxies: Proxy) -> None:
        """Stop the proxies of a finished case, so that they weigh on no later one."""
        for proxy in proxies:
            proxy.process.send_signal(signal.SIGTERM)
        for proxy in proxies:
            try:
                proxy.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proxy.process.kill()

    # --- origin ---------------------------------------------------------------

    def start_origin(self) -> None:
        conf = self.work / "origin.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {self.work}/origin.pid;
error_log {self.work}/origin-error.log warn;
events {{ worker_connections 4096; }}
http {{
  include /etc/nginx/mime.types;
  log_format bench '$request_method $uri $status $body_bytes_sent "$http_range" $msec'
                   ' $request_time';
  access_log {self.work}/origin-access.log bench;
  sendfile on; tcp_nopush off; tcp_nodelay on;
  keepalive_requests 1000000; keepalive_timeout 60s;
  client_body_temp_path {self.work}/tmp; proxy_temp_path {self.work}/tmp;
  fastcgi_temp_path {self.work}/tmp; uwsgi_temp_path {self.work}/tmp;
  scgi_temp_path {self.work}/tmp;
  server {{
    listen 127.0.0.1:{self.origin_port};
    root {self.work}/origin;
  }}
}}""")
        self.spawn(["nginx", "-c", str(conf), "-e", str(self.work / "origin-error.log")])
        wait_port(self.origin_port)
        self.relay(30, self.delayed_port)

    def relay(self, delay_ms: int, port: int | None = None) -> int:
        """A relay to the origin adding `delay_ms` to each request; its port.

        HAProxy when installed: each request waits `delay_ms` in a Lua action, and the
        bytes are moved by C (0.3-0.4 ms of CPU per MiB, with splice), as network
        latency costs the proxy's host nothing. Else delay_proxy.py, whose Python costs
        1.3-2.2 ms of CPU per MiB on the cores the proxy and the client share."""
        port = port or free_port()
        if shutil.which("haproxy") is None:
            self.relay_kind = "delay_proxy.py (no haproxy: costs CPU)"
            self.spawn(
                [
                    sys.executable,
                    str(BENCH / "delay_proxy.py"),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--target",
                    f"127.0.0.1:{self.origin_port}",
                    "--delay-ms",
                    str(delay_ms),
                ]
            )
            wait_port(port)
            return port
        self.relay_kind = "haproxy"
        lua = self.work / f"delay-{port}.lua"
        lua.write_text(
            f'core.register_action("delay", {{"http-req"}}, function(txn) '
            f"core.msleep({delay_ms}) end)\n"
        )
        conf = self.work / f"relay-{port}.cfg"
        conf.write_text(f"""
global
  lua-load {lua}
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  option splice-response
frontend delayed
  bind 127.0.0.1:{port}
  http-request lua.delay
  default_backend origin
backend origin
  http-reuse always
  server origin 127.0.0.1:{self.origin_port}
""")
        self.spawn(["haproxy", "-db", "-f", str(conf)])
        wait_port(port)
        return port

    def origin_log(self) -> list[tuple[str, str, int, int]]:
        lines = (self.work / "origin-access.log").read_text().splitlines()
        out = []
        for line in lines:
            method, uri, status, sent = line.split()[:4]
            out.append((method, uri, int(status), int(sent)))
        return out

    def origin_stats(self, key: str) -> tuple[int, int]:
        """(GETs, body bytes) the origin sent for one key."""
        rows = [r for r in self.origin_log() if r[1] == f"/{BUCKET}/{key}" and r[0] == "GET"]
        return len(rows), sum(r[3] for r in rows)

    # --- the proxies ----------------------------------------------------------

    def start_s3proxy(self, name: str, delayed: bool, **cache: Any) -> Proxy:
        port, admin = free_port(), free_port()
        workers = cache.pop("workers", 1)
        upstream = cache.pop("upstream_port", None) or (
            self.delayed_port if delayed else self.origin_port
        )
        config = {
            "server": {
                "host": "127.0.0.1",
                "port": port,
                "workers": workers,
                "shutdown_timeout_s": 2,
            },
            "admin": {"host": "127.0.0.1", "port": admin},
            "s3": {
                "bucket": BUCKET,
                "region": "us-east-1",
                "endpoint_url": f"http://127.0.0.1:{upstream}",
                "probe_key": "probe.bin",
                "max_connections": 256,
            },
            "auth": {"keys": [{"kid": "bench", "secret_env": "S3PROXY_JWT_SECRET"}]},
            "cache": cache,
            "log": {"level": "warning"},
        }
        path = self.work / f"{name}.yaml"
        path.write_text(json.dumps(config))
        env = {
            **os.environ,
            "S3PROXY_JWT_SECRET": SECRET,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        # `-m` runs the tree this bench is in (the working directory comes first on the
        # path), whatever the install: `python /tmp/old/bench/run.py` measures /tmp/old
        process = self.spawn(
            [sys.executable, "-m", "s3proxy", "serve", "--config", str(path)],
            env=env,
            cwd=BENCH.parent,
        )
        wait_port(port)
        wait_port(admin)
        token = subprocess.run(
            [
                sys.executable,
                "-m",
                "s3proxy",
                "token",
                "--config",
                str(path),
                "--asset",
                "**",
                "--ttl",
                "2h",
            ],
            env=env,
            cwd=BENCH.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return Proxy(name, port, f"/t/{token}/", process, admin)

    def start_nginx_peer(self, name: str, delayed: bool, workers: int = 2) -> Proxy:
        port = free_port()
        target = self.delayed_port if delayed else self.origin_port
        cache_dir = self.work / f"{name}-cache"
        cache_dir.mkdir()
        cache_dir.chmod(0o777)
        conf = self.work / f"{name}.conf"
        conf.write_text(f"""
worker_processes {workers};
daemon off;
pid {self.work}/{name}.pid;
error_log {self.work}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  log_format bench '$request_method $uri $status $body_bytes_sent';
  access_log {self.work}/{name}-access.log bench;
  tcp_nopush off; tcp_nodelay on; keepalive_requests 1000000;
  client_body_temp_path {self.work}/tmp; proxy_temp_path {self.work}/tmp;
  fastcgi_temp_path {self.work}/tmp; uwsgi_temp_path {self.work}/tmp;
  scgi_temp_path {self.work}/tmp;
  proxy_cache_path {cache_dir} levels=1:2 keys_zone={name}:16m max_size=2g inactive=1h
                   use_temp_path=off;
  upstream origin {{ server 127.0.0.1:{target}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      slice 1m;
      proxy_cache {name};
      proxy_cache_key $uri$slice_range;
      proxy_set_header Range $slice_range;
      proxy_cache_valid 200 206 1h;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 30s;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://origin;
    }}
  }}
}}""")
        process = self.spawn(["nginx", "-c", str(conf), "-e", str(self.work / f"{name}-error.log")])
        wait_port(port)
        return Proxy(name, port, "/", process, None)


@dataclass
class Proxy:
    name: str
    port: int
    prefix: str  # path before the key: "/t/<token>/" or "/"
    process: subprocess.Popen[bytes]
    admin: int | None

    def url(self, key: str) -> str:
        bucket = "" if self.prefix.startswith("/t/") else f"{BUCKET}/"
        return f"http://127.0.0.1:{self.port}{self.prefix}{bucket}{key}"

    def path(self, key: str) -> str:
        return self.url(key).split(str(self.port), 1)[1]

    def metric(self, name: str) -> float:
        assert self.admin is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def rss_peak_mib(self) -> float:
        """Peak resident memory of the proxy and its workers (VmHWM, summed)."""
        pids = [self.process.pid, *_children(self.process.pid)]
        total = 0
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        return total / 1024


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def make_data(stack: Stack, quick: bool) -> None:
    # nginx workers run as an unprivileged user: they must read the data, write the temp
    # and cache directories
    stack.work.chmod(0o755)
    stack.data.mkdir(parents=True)
    stack.data.parent.chmod(0o755)
    stack.data.chmod(0o755)
    (stack.work / "tmp").mkdir(mode=0o777)
    (stack.work / "tmp").chmod(0o777)
    block = os.urandom(16 * MIB)
    with open(stack.data / "asset64.mp4", "wb") as handle:
        for _ in range(4):
            handle.write(block)
    big = stack.data / "big1g.mp4"
    with open(big, "wb") as handle:
        for _ in range(16 if quick else 64):
            handle.write(block)
    (stack.data / "probe.bin").write_bytes(b"ok")
    for path in stack.data.iterdir():
        path.chmod(0o644)


def link(stack: Stack, source: str, name: str) -> str:
    """A new key with the same bytes: cold for every cache."""
    target = stack.data / name
    if not target.exists():
        os.link(stack.data / source, target)
    return name


# --- load generators ------------------------------------------------------------


def wrk(
    url_base: str, path_prefix: str, range_size: int, span: int, seconds: int, connections: int = 16
) -> tuple[float, float]:
    """requests/s and MiB/s for random aligned ranges of `range_size` within `span`."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    count = span // range_size
    script.write_text(f"""
math.randomseed(7)
request = function()
  local i = math.random(0, {count - 1})
  local first = i * {range_size}
  local range = "bytes=" .. first .. "-" .. (first + {range_size - 1})
  return wrk.format("GET", "{path_prefix}", {{["Range"] = range}})
end
""")
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url_base,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    assert transfer is not None
    factor = {"B": 1 / MIB, "KB": 1 / 1024, "MB": 1, "GB": 1024}[transfer.group(2)]
    return rps, float(transfer.group(1)) * factor


async def read_range(session: aiohttp.ClientSession, url: str, header: str) -> tuple[float, int]:
    """(seconds to first byte, body bytes) for one request."""
    started = time.perf_counter()
    async with session.get(url, headers={"Range": header}) as response:
        assert response.status == 206, f"{url}: {response.status}"
        first = None
        size = 0
        async for chunk in response.content.iter_any():
            if first is None:
                first = time.perf_counter() - started
            size += len(chunk)
        return (first if first is not None else time.perf_counter() - started), size


async def cold_herd(url: str, clients: int = 50) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(read_range(session, url, "bytes=0-1048575") for _ in range(clients)))


async def sequential_player(url: str, size: int, step: int = MIB) -> float:
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        for offset in range(0, size, step):
            _, got = await read_range(session, url, f"bytes={offset}-{offset + step - 1}")
            assert got == step
    return time.perf_counter() - started


async def ttfb(url: str) -> float:
    async with aiohttp.ClientSession() as session:
        first, size = await read_range(session, url, "bytes=0-1048575")
        assert size == MIB, f"{url}: {size} bytes"  # an error answer is fast, and wrong
        return first


async def open_ended_readers(url: str, clients: int, seconds: float) -> int:
    """`clients` connections each reading `bytes=0-` as fast as they can, then hanging up."""
    total = 0
    deadline = time.monotonic() + seconds
    host_port, path = url[len("http://") :].split("/", 1)
    host, port = host_port.split(":")

    async def one() -> None:
        nonlocal total
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n".encode())
        await writer.drain()
        while time.monotonic() < deadline:
            data = await reader.read(262144)
            if not data:
                break
            total += len(data)
        writer.transport.abort()

    await asyncio.gather(*(one() for _ in range(clients)))
    return total


async def mist_like(url: str, size: int, seeks: int = 40, seed: int = 3) -> None:
    """HEAD, `bytes=0-` on the same connection reading a little, then seeks: a new
    connection each, `bytes=N-`, a few KiB read, hang up (as mist.md describes)."""
    import random

    rng = random.Random(seed)
    host_port, path = url[len("http://") :].split("/", 1)
    host, port = host_port.split(":")

    async def read_some(reader: asyncio.StreamReader, amount: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line = head.split(b"\r\n")[0]
        assert b" 206 " in status_line, status_line
        got = 0
        while got < amount:
            data = await reader.read(amount - got)
            if not data:
                break
            got += len(data)

    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"HEAD /{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    writer.write(f"GET /{path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n".encode())
    await read_some(reader, 64 * 1024)
    writer.transport.abort()
    for _ in range(seeks):
        offset = rng.randrange(0, size - 65536)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: x\r\nRange: bytes={offset}-\r\n\r\n".encode())
        await read_some(reader, rng.choice([16, 4096, 16384]))
        writer.transport.abort()
        await asyncio.sleep(0.05)


async def stream_first(url: str, amount: int) -> float:
    """Seconds for one `bytes=0-` reader to take its first `amount` bytes (then it hangs
    up), as fast as it can."""
    started = time.perf_counter()
    got = 0
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Range": "bytes=0-"}) as response:
            assert response.status == 206, response.status
            async for chunk in response.content.iter_any():
                got += len(chunk)
                if got >= amount:
                    break
    return time.perf_counter() - started


async def parallel_direct(url: str, amount: int, parts: int = 16) -> float:
    """Seconds to read `amount` bytes from the origin with `parts` ranged GETs at once."""
    step = -(-amount // parts)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(
            *(
                read_range(session, url, f"bytes={n * step}-{min(amount, (n + 1) * step) - 1}")
                for n in range(parts)
            )
        )
    return time.perf_counter() - started


async def hang_ups(url: str, readers: int, most: int, seed: int = 5) -> int:
    """`readers` at once, each `bytes=0-` hanging up after a random 0..`most` bytes."""
    import random

    rng = random.Random(seed)
    total = 0

    async def one(amount: int) -> None:
        nonlocal total
        host_port, path = url[len("http://") :].split("/", 1)
        host, port = host_port.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        got = 0
        while got < amount:
            data = await reader.read(min(262144, amount - got))
            if not data:
                break
            got += len(data)
        total += got
        writer.transport.abort()

    await asyncio.gather(*(one(rng.randrange(most + 1)) for _ in range(readers)))
    return total


# --- the cases ------------------------------------------------------------------


def row(label: str, ours: float, theirs: float | None, unit: str, better: str) -> str:
    ratio = f"{ours / theirs:6.2f}x" if theirs else "   -   "
    theirs_text = f"{theirs:10.2f}" if theirs is not None else " " * 10
    return f"  {label:<46} {ours:10.2f} {theirs_text} {unit:<8} {ratio}  ({better})"


def case_throughput(
    stack: Stack, ours: Proxy, peer: Proxy, range_size: int, seconds: int, label: str
) -> list[str]:
    key = link(stack, "asset64.mp4", f"hot-{range_size}.mp4")
    for proxy in (ours, peer):  # warm both caches with the whole asset
        asyncio.run(sequential_player(proxy.url(key), 64 * MIB))
    figures = {}
    for proxy in (ours, peer, ours, peer):  # alternate, keep the better half of each
        rps, mibs = wrk(
            f"http://127.0.0.1:{proxy.port}", proxy.path(key), range_size, 64 * MIB, seconds
        )
        figures.setdefault(proxy.name, []).append((rps, mibs))
    a = statistics.median(r for r, _ in figures[ours.name])
    b = statistics.median(r for r, _ in figures[peer.name])
    am = statistics.median(m for _, m in figures[ours.name])
    bm = statistics.median(m for _, m in figures[peer.name])
    return [
        row(
            f"({label}) hot, {range_size // 1024} KiB ranges, 16 conn: req/s",
            a,
            b,
            "req/s",
            "higher is better",
        ),
        row(f"({label})   MiB/s", am, bm, "MiB/s", "higher is better"),
    ]


def case_herd(stack: Stack, ours: Proxy, peer: Proxy) -> list[str]:
    gets = {}
    for proxy in (ours, peer):
        key = link(stack, "asset64.mp4", f"herd-{proxy.name}.mp4")
        asyncio.run(cold_herd(proxy.url(key)))
        time.sleep(0.5)
        gets[proxy.name] = stack.origin_stats(key)[0]
    return [
        row(
            "(c) 50 clients, same cold block: upstream GETs",
            gets[ours.name],
            gets[peer.name],
            "GETs",
            "1 is the target",
        )
    ]


def case_player(stack: Stack, ours: Proxy, ours_no_ra: Proxy, peer: Proxy, runs: int) -> list[str]:
    times: dict[str, list[float]] = {}
    for run in range(runs):
        for proxy in (ours, ours_no_ra, peer):
            key = link(stack, "asset64.mp4", f"player-{proxy.name}-{run}.mp4")
            times.setdefault(proxy.name, []).append(
                asyncio.run(sequential_player(proxy.url(key), 64 * MIB))
            )
    a, b, c = (statistics.median(times[p.name]) for p in (ours, ours_no_ra, peer))
    return [
        row("(d) 64 MiB in 1 MiB ranges, 30 ms origin: s3proxy", a, c, "s", "lower"),
        row("(d)   s3proxy without read-ahead", b, c, "s", "lower"),
        f"  {'(d)   speed-up over nginx with read-ahead':<46} {c / a:10.2f}x",
    ]


def case_ttfb(stack: Stack, ours: Proxy, peer: Proxy, samples: int) -> list[str]:
    direct, through, via_peer = [], [], []
    for i in range(samples):
        key = link(stack, "asset64.mp4", f"ttfb-{i}.mp4")
        direct.append(asyncio.run(ttfb(f"http://127.0.0.1:{stack.origin_port}/{BUCKET}/{key}")))
        through.append(asyncio.run(ttfb(ours.url(key))))
        key2 = link(stack, "asset64.mp4", f"ttfb-peer-{i}.mp4")
        via_peer.append(asyncio.run(ttfb(peer.url(key2))))
    d, t, p = (statistics.median(x) * 1000 for x in (direct, through, via_peer))
    return [
        row(
            "(e) cold first range TTFB, added over origin",
            t - d,
            p - d,
            "ms",
            f"target < 2 ms; origin alone {d:.2f} ms",
        )
    ]


def case_rss(stack: Stack, ours: Proxy, seconds: float) -> list[str]:
    key = link(stack, "big1g.mp4", "rss-big.mp4")
    total = asyncio.run(open_ended_readers(ours.url(key), 200, seconds))
    peak = ours.rss_peak_mib()
    return [
        f"  {'(f) 200 x bytes=0- of 1 GiB, 64 MiB cache: peak RSS':<46} {peak:10.1f} MiB"
        f"   (target < 64 + 150 MiB; {total / MIB:.0f} MiB served)"
    ]


def case_egress(stack: Stack, ours: Proxy, peer: Proxy, size: int) -> list[str]:
    results = {}
    for proxy in (ours, peer):
        key = link(stack, "big1g.mp4", f"mist-{proxy.name}.mp4")
        sent_before = proxy.metric("s3proxy_response_bytes_total") if proxy.admin else 0
        asyncio.run(mist_like(proxy.url(key), size))
        time.sleep(1.0)
        _, upstream = stack.origin_stats(key)
        if proxy.admin:
            sent = proxy.metric("s3proxy_response_bytes_total") - sent_before
        else:
            log = (stack.work / f"{proxy.name}-access.log").read_text().splitlines()
            sent = sum(int(line.split()[3]) for line in log if f"/{key}" in line)
        results[proxy.name] = (upstream / sent if sent else float("inf"), upstream, sent)
    (a, ua, sa), (b, ub, sb) = results[ours.name], results[peer.name]
    return [
        row(
            "(g) Mist-like reader, cold 1 GiB, 30 ms: upstream/sent",
            a,
            b,
            "ratio",
            f"target < 1.5; s3proxy {ua / MIB:.1f}/{sa / MIB:.1f} MiB, "
            f"nginx {ub / MIB:.1f}/{sb / MIB:.1f} MiB",
        )
    ]


def case_window(
    stack: Stack, fixed: Proxy, adaptive: Proxy, runs: int, far: tuple[int, int] | None = None
) -> list[str]:
    """(j) one cold sequential reader, 30 ms origin (or `far`: a relay's delay in ms and
    its port, the one the proxies use): the first 75 MiB."""
    amount = 75 * MIB
    delay_ms, direct_port = far or (30, stack.delayed_port)
    times: dict[str, list[float]] = {"fixed": [], "adaptive": [], "direct": [], "cached": []}
    for run in range(runs):
        for name, proxy in (("fixed", fixed), ("adaptive", adaptive)):
            key = link(stack, "big1g.mp4", f"window-{delay_ms}-{name}-{run}.mp4")
            times[name].append(asyncio.run(stream_first(proxy.url(key), amount)))
        time.sleep(0.5)  # its read-ahead lands: the same read again is all hits
        times["cached"].append(asyncio.run(stream_first(adaptive.url(key), amount)))
        key = link(stack, "big1g.mp4", f"window-{delay_ms}-direct-{run}.mp4")
        url = f"http://127.0.0.1:{direct_port}/{BUCKET}/{key}"
        times["direct"].append(asyncio.run(parallel_direct(url, amount)))
    f, a, d, c = (statistics.median(times[k]) for k in ("fixed", "adaptive", "direct", "cached"))
    target = 0.35 if delay_ms == 30 else 1.0
    # No window brings a `bytes=0-` reader its 75 MiB sooner than the direct read plus
    # two round trips: its first block comes with the metadata (one), the seek grace
    # holds the read until then, and the window, starting small, asks for the bulk only
    # once the first fetches it sent have arrived (another).
    floor = d + 2 * delay_ms / 1000
    label = f"(j) cold 1 GiB, {delay_ms} ms: first 75 MiB, adaptive"
    return [
        f"  {label:<46} {a:10.3f} s "
        f"({75 / a:.0f} MiB/s)  fixed window 2: {f:.3f} s ({75 / f:.0f} MiB/s); "
        f"16 parallel GETs direct {d:.3f} s -> adaptive/direct {a / d:.2f}x "
        f"(target < {target} s, within 1.3x); floor (direct + 2 round trips) {floor:.3f} s "
        f"-> adaptive/floor {a / floor:.2f}x; the same read all cached {c:.3f} s"
    ]


def case_hangups(stack: Stack, fixed: Proxy, adaptive: Proxy, size: int) -> list[str]:
    """(k) egress: the Mist-like reader of (g), and 200 readers hanging up at 0-8 MiB."""
    out = []
    for label, work in (
        ("Mist-like (g)", lambda url: asyncio.run(mist_like(url, size))),
        ("200 hang-ups", lambda url: asyncio.run(hang_ups(url, 200, 8 * MIB))),
    ):
        figures = []
        for name, proxy in (("fixed", fixed), ("adaptive", adaptive)):
            key = link(stack, "big1g.mp4", f"egress-{label[:4].strip()}-{name}.mp4")
            sent_before = proxy.metric("s3proxy_response_bytes_total")
            unused_before = unused_ahead(proxy)
            work(proxy.url(key))
            time.sleep(1.0)
            _, upstream = stack.origin_stats(key)
            sent = proxy.metric("s3proxy_response_bytes_total") - sent_before
            # fetched ahead and never read (wasted), or not read yet (unread): at most
            # this much of the upstream bytes went to read-ahead nobody used
            unused = unused_ahead(proxy) - unused_before
            share = 100 * unused / max(upstream, 1)
            figures.append(
                f"{name} {upstream / max(sent, 1):.2f} ({upstream / MIB:.1f} MiB, "
                f"read-ahead unused {unused / MIB:.1f} MiB = {share:.1f} %)"
            )
        out.append(
            f"  {'(k) ' + label + ': upstream/sent':<46} "
            + ", ".join(figures)
            + " (targets < 1.5, unused < 10 %)"
        )
    return out


def unused_ahead(proxy: Proxy) -> float:
    """Bytes fetched ahead that nobody read: wasted, or in memory and unread so far."""
    return proxy.metric("s3proxy_readahead_wasted_bytes_total") + proxy.metric(
        "s3proxy_readahead_unread_bytes"
    )


def case_revalidation(stack: Stack, ours: Proxy, ttl_s: float, rounds: int = 10) -> list[str]:
    """A resident asset read again and again over `rounds` metadata TTLs."""
    import random

    key = link(stack, "asset64.mp4", "resident.mp4")
    asyncio.run(sequential_player(ours.url(key), 64 * MIB))  # the first fill
    time.sleep(0.5)  # its last blocks land
    gets, got_bytes = stack.origin_stats(key)
    heads = sum(1 for r in stack.origin_log() if r[0] == "HEAD" and r[1] == f"/{BUCKET}/{key}")
    rng = random.Random(11)

    async def reads() -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                start = rng.randrange(64 * MIB - MIB)
                await read_range(session, ours.url(key), f"bytes={start}-{start + MIB - 1}")

    for _ in range(rounds):
        time.sleep(ttl_s * 1.05)
        asyncio.run(reads())
    after_gets, after_bytes = stack.origin_stats(key)
    after_heads = sum(
        1 for r in stack.origin_log() if r[0] == "HEAD" and r[1] == f"/{BUCKET}/{key}"
    )
    return [
        f"  {'(h) resident 64 MiB over 10 TTLs: upstream bytes':<46} "
        f"{after_bytes - got_bytes:10d} B       (target 0; {after_gets - gets} GETs, "
        f"{after_heads - heads} conditional HEADs for {rounds} TTLs x 20 reads)"
    ]


def case_workers(stack: Stack, one: Proxy, two: Proxy, size: int) -> list[str]:
    """The same Mist-like sequence through one worker and through two."""
    gets = {}
    for proxy in (one, two):
        key = link(stack, "big1g.mp4", f"workers-{proxy.name}.mp4")
        asyncio.run(mist_like(proxy.url(key), size))
        time.sleep(1.0)
        gets[proxy.name] = stack.origin_stats(key)
    (g1, b1), (g2, b2) = gets[one.name], gets[two.name]
    return [
        row(
            "(i) Mist-like, 1 GiB, workers 2 vs 1: upstream GETs",
            g2,
            g1,
            "GETs",
            f"target 1.0; {b2 / MIB:.1f} vs {b1 / MIB:.1f} MiB",
        )
    ]


@contextmanager
def stack_in(tmp: Path) -> Iterator[Stack]:
    stack = Stack(tmp)
    try:
        yield stack
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="a,b,c,d,e,f,g,h,i,j,k")
    parser.add_argument("--seconds", type=int, default=8, help="per wrk run (a, b)")
    parser.add_argument("--quick", action="store_true", help="fewer samples, 256 MiB big file")
    add_settle_argument(parser)
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"bench needs {tool}: apt-get install nginx-light wrk", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="s3proxy-bench-"))
    lines = [
        f"s3proxy vs nginx slice cache ({os.cpu_count()} cores); medians; ratio = s3proxy/nginx",
        f"  memory settled first: {args.settle_mib} MiB touched in "
        f"{settle_memory(args.settle_mib):.1f} s (--settle-mib)",
    ]
    big_size = (256 if args.quick else 1024) * MIB
    try:
        with stack_in(tmp) as stack:
            make_data(stack, args.quick)
            stack.start_origin()
            lines.append(f"  origin latency added by: {stack.relay_kind}")
            # latency and egress first, on an otherwise idle machine; then throughput;
            # each case's proxies are stopped when it is done
            if cases & {"c", "e"}:
                ours = stack.start_s3proxy("s3proxy-cold", delayed=False)
                peer = stack.start_nginx_peer("nginx-cold", delayed=False)
                if "c" in cases:
                    lines += case_herd(stack, ours, peer)
                if "e" in cases:
                    lines += case_ttfb(stack, ours, peer, 7 if args.quick else 21)
                stack.retire(ours, peer)
            if "d" in cases:
                ours = stack.start_s3proxy("s3proxy-ra", delayed=True, readahead_blocks=2)
                ours_no_ra = stack.start_s3proxy("s3proxy-nora", delayed=True, readahead_blocks=0)
                peer = stack.start_nginx_peer("nginx-delayed", delayed=True)
                lines += case_player(stack, ours, ours_no_ra, peer, 1 if args.quick else 3)
                stack.retire(ours, ours_no_ra, peer)
            if "g" in cases:  # an origin 30 ms away, as S3 is: hang-ups race the bytes
                ours = stack.start_s3proxy("s3proxy-mist", delayed=True)
                peer = stack.start_nginx_peer("nginx-mist", delayed=True)
                lines += case_egress(stack, ours, peer, big_size)
                stack.retire(ours, peer)
            if cases & {"j", "k"}:
                fixed = stack.start_s3proxy(
                    "s3proxy-fixed", delayed=True, readahead_blocks=2, readahead_max_blocks=2
                )
                adaptive = stack.start_s3proxy("s3proxy-adaptive", delayed=True)
                if "j" in cases:
                    lines += case_window(stack, fixed, adaptive, 1 if args.quick else 3)
                if "k" in cases:
                    lines += case_hangups(stack, fixed, adaptive, big_size)
                stack.retire(fixed, adaptive)
            if "j" in cases:  # again with the origin 100 ms away
                far = stack.relay(100)
                fixed = stack.start_s3proxy(
                    "s3proxy-fixed-100",
                    delayed=True,
                    upstream_port=far,
                    readahead_blocks=2,
                    readahead_max_blocks=2,
                )
                adaptive = stack.start_s3proxy(
                    "s3proxy-adaptive-100", delayed=True, upstream_port=far
                )
                runs = 1 if args.quick else 3
                lines += case_window(stack, fixed, adaptive, runs, far=(100, far))
                stack.retire(fixed, adaptive)
            if "h" in cases:
                ours = stack.start_s3proxy("s3proxy-reval", delayed=True, metadata_ttl_s=1)
                lines += case_revalidation(stack, ours, 1.0)
                stack.retire(ours)
            if "i" in cases:
                one = stack.start_s3proxy("s3proxy-w1", delayed=True)
                two = stack.start_s3proxy("s3proxy-w2", delayed=True, workers=2)
                lines += case_workers(stack, one, two, big_size)
                stack.retire(one, two)
            if cases & {"a", "b"}:
                ours = stack.start_s3proxy(
                    "s3proxy-hot", delayed=False, workers=2, max_bytes="512MiB"
                )
                peer = stack.start_nginx_peer("nginx-hot", delayed=False)
                if "a" in cases:
                    lines += case_throughput(stack, ours, peer, MIB, args.seconds, "a")
                if "b" in cases:
                    lines += case_throughput(stack, ours, peer, 64 * 1024, args.seconds, "b")
                stack.retire(ours, peer)
            if "f" in cases:
                ours = stack.start_s3proxy("s3proxy-rss", delayed=False, max_bytes="64MiB")
                lines += case_rss(stack, ours, 5 if args.quick else 10)
    finally:
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
