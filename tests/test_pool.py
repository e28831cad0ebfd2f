"""A pool of three `s3proxy serve` nodes behind the real balancers (Debian's nginx and
HAProxy, with the configs shipped in deploy/, started here on loopback): one asset, one
node, whatever the token; each block from S3 once per pool, against about once per node
with round-robin; a node lost while a Mist-like reader seeks; no token in their logs."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import SUITE_LOGS, Emulator, make_token, put_object, require_tool
from .test_serve import Served, free_port, serve_process

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 256 * 1024
CACHE = {"block_size": "256KiB", "max_bytes": "64MiB"}
NODES = ("n1", "n2", "n3")


@dataclass
class Balancer:
    kind: str
    port: int
    process: subprocess.Popen[bytes]
    logs: list[Path]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


def nginx_config(ports: list[int], port: int, work: Path, hashed: bool) -> str:
    pool = (ROOT / "deploy" / "nginx" / "s3proxy-pool.conf").read_text()
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=2 fail_timeout=2s;\n" for p in ports)
    pool = re.sub(r"(    server 10\.0\.0\.\d+:8080[^\n]*\n)+", servers, pool)
    pool = pool.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    pool = pool.replace("/var/log/nginx/", f"{work}/")
    if not hashed:
        pool = pool.replace("    hash $s3proxy_asset consistent;\n", "")
    temp = "".join(
        f"{name}_temp_path {work}/tmp-{name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nworker_processes 1;\npid {work}/nginx.pid;\n"
        f"error_log {work}/nginx-main.error.log crit;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n{temp}{pool}\n}}\n"
    )


def haproxy_config(ports: list[int], port: int, hashed: bool) -> str:
    pool = (ROOT / "deploy" / "haproxy" / "s3proxy-pool.cfg").read_text()
    servers = "".join(f"    server n{i} 127.0.0.1:{p} check\n" for i, p in enumerate(ports, 1))
    pool = re.sub(r"(    server n\d 10\.0\.0\.\d+:8080 check\n)+", servers, pool)
    pool = pool.replace("    bind :8080", f"    bind 127.0.0.1:{port}")
    if not hashed:
        pool = pool.replace("balance hash var(txn.asset)", "balance roundrobin")
    return pool


@contextlib.contextmanager
def balancer(kind: str, ports: list[int], work: Path, hashed: bool = True) -> Iterator[Balancer]:
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o777)
    port = free_port()
    if kind == "nginx":
        conf = work / "nginx.conf"
        conf.write_text(nginx_config(ports, port, work, hashed))
        argv = [require_tool("nginx"), "-c", str(conf), "-e", str(work / "nginx-main.error.log")]
        logs = [work / n for n in ("s3proxy-pool.access.log", "s3proxy-pool.error.log")]
    else:  # logs to its stdout (`log stdout`)
        conf = work / "haproxy.cfg"
        conf.write_text(haproxy_config(ports, port, hashed))
        argv = [require_tool("haproxy"), "-db", "-f", str(conf)]
        logs = []
    logs += [work / "nginx-main.error.log", work / "balancer.out"]
    with open(work / "balancer.out", "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    running = Balancer(kind, port, process, logs)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            assert process.poll() is None, running.log_text()
            time.sleep(0.05)
        if kind == "haproxy":
            time.sleep(2.5)  # its first health checks: every node up
        yield running
    finally:
        process.send_signal(signal.SIGTERM if kind == "haproxy" else signal.SIGQUIT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        SUITE_LOGS.keep(running.log_text())


@contextlib.contextmanager
def nodes(
    emulator: Emulator, bucket: str, work: Path, ports: list[int] | None = None
) -> Iterator[list[Served]]:
    with contextlib.ExitStack() as stack:
        running = []
        for index, name in enumerate(NODES):
            server = {"node_name": name, **({"port": ports[index]} if ports else {})}
            served = stack.enter_context(
                serve_process(emulator, bucket, work, 1, CACHE, server=server)
            )
            served.drain()
            running.append(served)
        yield running


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, _lower(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, _lower(error.headers), error.read()


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}  # HAProxy lowercases


def blocks_fetched(emulator: Emulator, bucket: str, prefix: str) -> int:
    """Blocks of the assets the nodes' GETs asked S3 for (one GET may ask for a run of
    blocks); the `.dtsh` look-ups beside them are not the assets' blocks."""
    total = 0
    for r in emulator.object_requests(bucket):
        if (
            r.method == "GET"
            and r.path.startswith(f"/{bucket}/{prefix}")
            and not r.path.endswith(".dtsh")
        ):
            first, last = (int(n) for n in r.headers["Range"][6:].split("-"))
            total += last // BLOCK - first // BLOCK + 1
    return total


def no_token_in(running: Balancer, tokens: list[str]) -> None:
    text = running.log_text()
    assert text, "the balancer logged nothing"
    leaked = [t for t in tokens if any(part in text for part in t.split(".")[1:])]
    assert not leaked, f"{len(leaked)} tokens in the {running.kind} logs"


BALANCERS = ["nginx", "haproxy"]


@pytest.mark.parametrize("kind", BALANCERS)
def test_one_asset_one_node_whatever_the_token_and_its_sidecar_beside_it(
    emulator: Emulator, bucket: str, tmp_path: Path, kind: str
) -> None:
    assets = [f"movies/a{n}.mp4" for n in range(12)]
    for asset in assets:
        put_object(emulator, bucket, asset, os.urandom(1000))
    put_object(emulator, bucket, "movies/a0.mp4.dtsh", b"DTSC" + (8).to_bytes(4, "big") + bytes(8))
    tokens = [make_token("movies/**") for _ in range(8)]
    with (
        nodes(emulator, bucket, tmp_path) as running,
        balancer(kind, [n.port for n in running], tmp_path / kind) as pool,
    ):
        seen: dict[str, set[str]] = {}
        for asset in assets:
            for token in tokens:
                for path, headers in (
                    (f"/t/{token}/{asset}", {}),
                    (f"/vod/{asset}?token={token}", {}),
                    (f"/vod/{asset}", {"Authorization": f"Bearer {token}"}),
                    (f"/t/{token}/{asset}.dtsh", {}),  # 200 or 404: the same node
                    (f"/vod/{asset}?token={token}.dtsh", {}),
                    (f"/%74/{token}/{asset}", {}),  # the nodes decode it: /t/<token>/
                    (f"//t/{token}/{asset}", {}),
                    (f"/vod/{asset.replace('/', '%2F')}?token={token}", {}),
                ):
                    status, answer, _ = get(pool.url(path), {"Range": "bytes=0-9", **headers})
                    assert status in (206, 200, 404), (status, path)
                    seen.setdefault(asset, set()).add(answer["x-s3proxy-node"])
        assert all(len(names) == 1 for names in seen.values()), seen
        assert len(set.union(*seen.values())) >= 2, "the assets spread over the nodes"
    no_token_in(pool, tokens)


def read_assets(pool: Balancer, assets: list[str], size: int, viewers: int) -> None:
    for asset in assets:
        for viewer in range(viewers):
            token = make_token("pool/**")
            for start in range(0, size, BLOCK):
                status, _, body = get(
                    pool.url(f"/t/{token}/{asset}"), {"Range": f"bytes={start}-{start + BLOCK - 1}"}
                )
                assert status == 206 and len(body) == min(BLOCK, size - start), (status, viewer)


@pytest.mark.parametrize("kind", BALANCERS)
def test_each_block_leaves_s3_once_per_pool_and_once_per_node_with_round_robin(
    emulator: Emulator, bucket: str, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    size, blocks = 4 * BLOCK, 4
    for layout in ("hashed", "rr"):
        for n in range(30):
            put_object(emulator, bucket, f"pool/{layout}/{n:02d}.mp4", os.urandom(size))
    with nodes(emulator, bucket, tmp_path) as running:
        ports = [n.port for n in running]
        with balancer(kind, ports, tmp_path / f"{kind}-hashed") as pool:
            read_assets(pool, [f"pool/hashed/{n:02d}.mp4" for n in range(30)], size, 3)
        with balancer(kind, ports, tmp_path / f"{kind}-rr", hashed=False) as pool:
            read_assets(pool, [f"pool/rr/{n:02d}.mp4" for n in range(30)], size, 3)
    hashed = blocks_fetched(emulator, bucket, "pool/hashed/") / (30 * blocks)
    rr = blocks_fetched(emulator, bucket, "pool/rr/") / (30 * blocks)
    with capsys.disabled():
        print(
            f"\n[{kind}] S3 fetches per block, 30 assets x 3 viewers: hashed {hashed:.2f}, "
            f"round-robin {rr:.2f}"
        )
    assert hashed == 1.0, "each block once per pool"
    assert rr > 2.0, "round-robin: about once per node"


@pytest.mark.parametrize("kind", BALANCERS)
def test_a_node_lost_while_a_reader_seeks_and_its_assets_back_when_it_returns(
    emulator: Emulator, bucket: str, tmp_path: Path, kind: str
) -> None:
    data = os.urandom(48 * BLOCK)  # more than the socket buffers hold: a cut is a cut
    put_object(emulator, bucket, "lost/a.mp4", data)
    token = make_token("lost/**")
    ports = [free_port() for _ in NODES]
    path = f"/t/{token}/lost/a.mp4"
    with contextlib.ExitStack() as stack:
        running = stack.enter_context(nodes(emulator, bucket, tmp_path, ports))
        pool = stack.enter_context(balancer(kind, ports, tmp_path / kind))
        # a Mist-like reader is streaming `bytes=0-` from the asset's node ...
        reader = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=15)
        reader.request("GET", path, headers={"Range": "bytes=0-"})
        streaming = reader.getresponse()
        assert streaming.status == 206
        owner = _lower(streaming.headers)["x-s3proxy-node"]
        assert streaming.read(64 * 1024) == data[: 64 * 1024]
        index = NODES.index(owner)
        running[index].process.kill()  # ... when the node dies (no drain: a crash)
        running[index].process.wait()
        with contextlib.suppress(http.client.HTTPException, OSError):
            rest = streaming.read()
            assert len(rest) < len(data) - 64 * 1024, "the one response that is cut"
            assert rest == data[64 * 1024 : 64 * 1024 + len(rest)], "no wrong byte"
        reader.close()
        for offset in (5 * BLOCK + 17, 9 * BLOCK, 2 * BLOCK + 1):  # its seeks: new connections
            status, answer, body = get(pool.url(path), {"Range": f"bytes={offset}-"})
            assert status == 206, (status, offset)
            assert body == data[offset:], "no wrong byte"
            assert answer["x-s3proxy-node"] != owner
        # the node comes back on its port: its assets return to it
        back = stack.enter_context(
            serve_process(
                emulator,
                bucket,
                tmp_path,
                1,
                CACHE,
                server={"node_name": owner, "port": ports[index]},
            )
        )
        back.drain()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, answer, _ = get(pool.url(path), {"Range": "bytes=0-9"})
            if status == 206 and answer["x-s3proxy-node"] == owner:
                break
            time.sleep(0.5)
        assert answer["x-s3proxy-node"] == owner, "the asset returned to its node"
    no_token_in(pool, [token])
