"""A bounded soak of a real `s3proxy serve` against a fault-injecting S3-like origin.

    python bench/soak.py                 # 60 s
    python bench/soak.py --seconds 15    # as .ci/run runs it

Many clients at once, for the whole run: random closed ranges, whole objects, HEADs,
conditionals, open-ended reads that hang up after a random 0-2 MiB; valid, expired,
forged and out-of-scope tokens in all three places a token goes; malformed requests on
raw sockets (bare LF, NUL, obs-fold, no HTTP version, unknown method, an over-long
head), each carrying a valid token. The origin overwrites an object every second and
misbehaves on a share of its answers: stalls (before the headers and mid-body), resets,
bodies cut short, 500 InternalError and 503 SlowDown.

Every byte served is checked against the version its ETag names (each version of each
object is a known pattern, so any range can be checked without storing it). Printed:
requests, wrong bytes, answers by status, 500s, token occurrences in the proxy's log,
requests a refused token got through, resident memory and open descriptors at start,
peak and end. Exit 1 when wrong bytes, 500s, token occurrences or refused tokens served
are not 0. Every socket is on 127.0.0.1; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import jwt
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import free_port

# each version of each object is the tests' pattern, shifted (any range checkable)
from tests.origin import CHUNK, PERIOD, pattern

MIB = 1 << 20
SECRET = "soak-only-placeholder-secret-0123456789abcdef0123456789abcdef"
SECRET_ENV = "S3PROXY_SOAK_JWT_SECRET"
BUCKET = "media"
FAULTS = ("stall_headers", "stall_body", "reset", "short_body", "error_500", "slow_down")


# --- the origin -----------------------------------------------------------------


@dataclass
class Origin:
    """Objects of known content, versioned, with faults on a share of the answers."""

    sizes: dict[str, int]
    fault_rate: float
    rng: random.Random
    versions: dict[str, int] = field(default_factory=dict)
    by_etag: dict[str, tuple[str, int]] = field(default_factory=dict)  # etag -> key, version
    faults: collections.Counter[str] = field(default_factory=collections.Counter)

    def etag(self, key: str, version: int) -> str:
        tag = f'"{abs(hash((key, version))) % (1 << 64):016x}{version:016x}"'
        self.by_etag[tag] = (key, version)
        return tag

    @staticmethod
    def shift(key: str, version: int) -> int:
        return (sum(key.encode()) * 17 + version * 29) % PERIOD

    def overwrite(self) -> None:
        key = self.rng.choice(sorted(self.sizes))
        self.versions[key] = self.versions.get(key, 0) + 1

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.split("/", 2)
        if len(parts) < 3 or not parts[2]:
            return web.Response(status=200)  # the bucket (readiness)
        key = parts[2]
        if key not in self.sizes:
            return _error(404, "NoSuchKey")
        fault = self.rng.choice(FAULTS) if self.rng.random() < self.fault_rate else None
        if fault is not None:
            self.faults[fault] += 1
        if fault == "stall_headers":
            await asyncio.sleep(3)
        if fault == "error_500":
            return _error(500, "InternalError")
        if fault == "slow_down":
            return _error(503, "SlowDown")
        version = self.versions.get(key, 0)
        size, etag = self.sizes[key], self.etag(key, version)
        if_match, if_none = request.headers.get("If-Match"), request.headers.get("If-None-Match")
        if if_none == etag:
            return web.Response(status=304, headers={"ETag": etag})
        if if_match is not None and if_match != etag:
            return _error(412, "PreconditionFailed")
        headers = {
            "ETag": etag,
            "Last-Modified": "Mon, 02 Nov 2026 10:00:00 GMT",
            "Accept-Ranges": "bytes",
            "Content-Type": "video/mp4",
        }
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(size)})
        start, end, status = 0, size - 1, 200
        spec = request.headers.get("Range", "")
        if spec.startswith("bytes="):
            first, _, last = spec[6:].partition("-")
            start, status = int(first), 206
            end = min(int(last) if last else size - 1, size - 1)
            if start >= size:
                return _error(416, "InvalidRange")
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start + 1
        await response.prepare(request)
        shift, position = self.shift(key, version), start
        cut = start + (end - start + 1) // 2
        while position <= end:
            if fault in ("stall_body", "reset", "short_body") and position >= cut:
                if fault == "stall_body":
                    await asyncio.sleep(3)
                if request.transport is None:  # the proxy gave up meanwhile
                    return response
                if fault == "reset":
                    request.transport.abort()
                else:
                    request.transport.close()
                return response
            n = min(CHUNK, end + 1 - position)
            await response.write(pattern(position, n, shift))
            position += n
        await response.write_eof()
        return response


def _error(status: int, code: str) -> web.Response:
    return web.Response(status=status, text=f"<Error><Code>{code}</Code></Error>")


# --- the proxy ------------------------------------------------------------------


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int
    admin: int
    log: Path

    def pids(self) -> list[int]:
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            return [self.process.pid, *map(int, children.read_text().split())]
        except OSError:
            return [self.process.pid]

    def usage(self) -> tuple[float, int]:
        """Resident MiB and open descriptors, summed over the supervisor and workers."""
        rss, fds = 0.0, 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) / 1024
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
        return rss, fds


def start_proxy(work: Path, origin_port: int, workers: int) -> Proxy:
    port, admin = free_port(), free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "workers": workers},
        "admin": {"host": "127.0.0.1", "port": admin},
        "s3": {
            "bucket": BUCKET,
            "endpoint_url": f"http://127.0.0.1:{origin_port}",
            "read_timeout_s": 1.0,
        },
        "auth": {"keys": [{"kid": "soak", "secret_env": SECRET_ENV}]},
        "cache": {"max_bytes": "64MiB", "metadata_ttl_s": 1},
        "log": {"level": "info", "format": "json"},
    }
    path = work / "s3proxy.yaml"
    path.write_text(json.dumps(config))
    log = work / "s3proxy.log"
    env = {
        **os.environ,
        SECRET_ENV: SECRET,
        "AWS_ACCESS_KEY_ID": "soak",
        "AWS_SECRET_ACCESS_KEY": "soak-placeholder",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "s3proxy", "serve", "--config", str(path)],
            stderr=sink,
            env=env,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return Proxy(process, port, admin, log)
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    raise RuntimeError(f"s3proxy did not start: {log.read_text()[-2000:]}")


# --- the clients ----------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    checked_bytes: int = 0
    wrong_bytes: int = 0
    wrong_answers: list[str] = field(default_factory=list)
    refused_served: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    cut: int = 0

    def wrong(self, what: str, count: int) -> None:
        self.wrong_bytes += count
        if len(self.wrong_answers) < 10:
            self.wrong_answers.append(what)


def mint(assets: list[str], ttl: int, secret: str = SECRET, age: int = 0) -> str:
    now = int(time.time()) - age
    claims = {"iat": now, "exp": now + ttl, "assets": assets, "sub": "soak"}
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "soak"})


@dataclass
class Tokens:
    valid: str
    expired: str
    forged: str
    out_of_scope: str

    def all(self) -> list[str]:
        return [self.valid, self.expired, self.forged, self.out_of_scope]


def check(
    tally: Tally, origin: Origin, etag: str | None, start: int, body: bytes, what: str
) -> None:
    if not body:
        return
    if etag is None or etag not in origin.by_etag:
        tally.wrong(f"{what}: ETag {etag!r} names no version", len(body))
        return
    key, version = origin.by_etag[etag]
    expected = pattern(start, len(body), origin.shift(key, version))
    if expected != body:
        wrong = sum(1 for a, b in zip(expected, body, strict=True) if a != b)
        tally.wrong(f"{what}: {wrong} of {len(body)} bytes differ from {key} v{version}", wrong)
    tally.checked_bytes += len(body)


def target(form: str, token: str, key: str) -> tuple[str, dict[str, str]]:
    if form == "path":
        return f"/t/{token}/{key}", {}
    if form == "bearer":
        return f"/vod/{key}", {"Authorization": f"Bearer {token}"}
    return f"/vod/{key}?token={token}", {}


async def client(
    session: aiohttp.ClientSession,
    proxy: Proxy,
    origin: Origin,
    tokens: Tokens,
    tally: Tally,
    until: float,
    rng: random.Random,
) -> None:
    base = f"http://127.0.0.1:{proxy.port}"
    keys = sorted(origin.sizes)
    while time.monotonic() < until:
        kind = rng.choices(
            ["range", "open", "whole", "head", "conditional", "refused", "malformed", "missing"],
            [40, 15, 3, 8, 6, 14, 8, 6],
        )[0]
        key = rng.choice(keys)
        form = rng.choice(["path", "bearer", "query"])
        size = origin.sizes[key]
        tally.requests += 1
        try:
            if kind == "malformed":
                await malformed(proxy.port, tokens.valid, key, rng, tally)
                continue
            token = tokens.valid
            if kind == "refused":
                token = rng.choice([tokens.expired, tokens.forged, tokens.out_of_scope])
            if kind == "missing":
                key = f"soak/missing-{rng.randrange(1000)}.mp4"
            path, headers = target(form, token, key)
            method = "HEAD" if kind == "head" else "GET"
            start = 0
            limit: int | None = None
            if kind in ("range", "refused", "missing"):
                start = rng.randrange(size)
                end = min(size - 1, start + rng.choice([0, 99, 65535, MIB - 1, 3 * MIB]))
                headers["Range"] = f"bytes={start}-{end}"
            elif kind == "open":
                start = rng.randrange(size)
                headers["Range"] = f"bytes={start}-"
                limit = rng.randrange(2 * MIB + 1)
            elif kind == "conditional":
                headers["If-None-Match"] = rng.choice(list(origin.by_etag) or ['"x"'])
            async with session.request(method, base + path, headers=headers) as response:
                tally.statuses[str(response.status)] += 1
                if kind == "refused" and response.status < 400:
                    tally.refused_served += 1
                if response.status in (200, 206) and method == "GET":
                    if response.status == 206:
                        start = int(response.headers["Content-Range"].split()[1].split("-")[0])
                    body = bytearray()
                    try:
                        async for chunk in response.content.iter_chunked(CHUNK):
                            body += chunk
                            if limit is not None and len(body) >= limit:
                                break  # hang up
                    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                        tally.cut += 1
                    check(tally, origin, response.headers.get("ETag"), start, bytes(body), kind)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            tally.statuses[type(exc).__name__] += 1


async def malformed(port: int, token: str, key: str, rng: random.Random, tally: Tally) -> None:
    heads = [
        f"GET /t/{token}/{key} HTTP/1.1\nHost: x\n\n",
        f"GET /t/{token}/{key} HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n\r\n",
        f"GET /vod/{key} HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n"
        f"Authorization: Bearer {token}\r\n\r\n",
        f"GET /t/{token}/{key}\r\n\r\n",
        f"BREW /t/{token}/{key} HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /vod/{key}?token={token} HTTP/1.1\r\nHost: x\r\nX-Pad: {'p' * 40000}\r\n\r\n",
        f"GET /t/{token}/{key}\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(rng.choice(heads).encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 15)
        status = data.split(b" ", 2)[1].decode() if data.count(b" ") >= 2 else "closed"
        tally.statuses[f"malformed {status}"] += 1
        if status.startswith("5"):
            tally.statuses["500"] += status == "500"
    finally:
        writer.close()


async def soak(seconds: float, clients: int, workers: int, seed: int) -> int:
    rng = random.Random(seed)
    sizes = {f"soak/{n:02d}.mp4": rng.randrange(MIB, 24 * MIB) for n in range(8)}
    origin = Origin(sizes, fault_rate=0.04, rng=random.Random(seed + 1))
    runner = web.AppRunner(origin.app(), access_log=None)
    await runner.setup()
    origin_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", origin_port).start()
    work = Path(tempfile.mkdtemp(prefix="s3proxy-soak-"))
    proxy = await asyncio.to_thread(start_proxy, work, origin_port, workers)
    tokens = Tokens(
        valid=mint(["soak/**"], 3600),
        expired=mint(["soak/**"], 60, age=3600),
        forged=mint(["soak/**"], 3600, secret="not-the-secret-" + "x" * 40),
        out_of_scope=mint(["other/**"], 3600),
    )
    tally = Tally()
    at_start = proxy.usage()
    peak = list(at_start)
    until = time.monotonic() + seconds
    try:
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = [
                asyncio.ensure_future(
                    client(session, proxy, origin, tokens, tally, until, random.Random(seed + i))
                )
                for i in range(clients)
            ]
            while time.monotonic() < until:
                await asyncio.sleep(1.0)
                origin.overwrite()
                rss, fds = proxy.usage()
                peak = [max(peak[0], rss), max(peak[1], fds)]
            await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)
        at_end = proxy.usage()
    finally:
        proxy.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proxy.process.wait, 30)
        await runner.cleanup()
    log = proxy.log.read_text(errors="replace")
    secrets = [t for token in tokens.all() for t in (token, token.rsplit(".", 1)[1])]
    occurrences = sum(log.count(s) for s in secrets)
    tracebacks = log.count("Traceback")
    fivehundreds = tally.statuses.get("500", 0)
    by_status = ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items()))
    lines = [
        f"soak: {seconds:.0f} s, {clients} clients, {workers} worker(s), seed {seed}",
        f"  requests            {tally.requests}",
        f"  bytes checked       {tally.checked_bytes / MIB:.1f} MiB "
        f"({tally.cut} bodies cut short by origin faults)",
        f"  wrong bytes         {tally.wrong_bytes}   (must be 0)",
        f"  500s                {fivehundreds}   (must be 0)",
        f"  token occurrences   {occurrences} in {len(log.splitlines())} log lines   (must be 0)",
        f"  refused tokens served {tally.refused_served}   (must be 0)",
        f"  tracebacks in log   {tracebacks}",
        f"  answers             {by_status}",
        f"  origin faults       {dict(origin.faults)}; versions {sum(origin.versions.values())}",
        f"  RSS MiB             start {at_start[0]:.1f}, peak {peak[0]:.1f}, end {at_end[0]:.1f}",
        f"  open fds            start {at_start[1]}, peak {peak[1]}, end {at_end[1]}",
    ]
    lines += [f"  WRONG: {w}" for w in tally.wrong_answers]
    print("\n".join(lines))
    failed = tally.wrong_bytes or fivehundreds or occurrences or tally.refused_served
    if not failed:
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
    else:
        print(f"  kept {work}", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # the origin's own reports of the hang-ups and resets it is made to cause
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    return asyncio.run(soak(args.seconds, args.clients, args.workers, args.seed))


if __name__ == "__main__":
    sys.exit(main())
