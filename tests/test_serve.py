"""`s3proxy serve` as a process: JSON access lines without tokens, SIGHUP reload,
SIGTERM drains the response in flight and exits 0."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .conftest import SECRET, SECRET_ENV, SUITE_LOGS, Emulator, make_token, put_object


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    def __init__(self, process: subprocess.Popen[str], port: int, admin: int) -> None:
        self.process, self.port, self.admin = process, port, admin
        self.lines: list[dict[str, Any]] = []
        self.drainer: threading.Thread | None = None

    def read_until(self, predicate: Any, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            record = json.loads(line)
            self.lines.append(record)
            if predicate(record):
                return record
        raise AssertionError(f"not seen; got {self.lines}")

    def drain(self) -> threading.Thread:
        """Read its log from now on in a thread, into `lines`, so that a test sending many
        requests never fills the pipe (the proxy would block writing its log)."""
        assert self.process.stderr is not None
        stream = self.process.stderr

        def read() -> None:
            for line in stream:
                self.lines.append(json.loads(line))

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        self.drainer = thread
        return thread


@pytest.fixture
def workers() -> int:
    return 1


@contextmanager
def serve_process(
    emulator: Emulator,
    bucket: str,
    tmp_path: Path,
    workers: int,
    cache: dict[str, Any],
    server: dict[str, Any] | None = None,
    open_files: tuple[int, int] | None = None,
) -> Iterator[Served]:
    """`s3proxy serve` in a process; `server` adds to (or overrides) its server section
    (a port to come back on, a node name); `open_files`: its (soft, hard) limit."""
    server = dict(server or {})
    port, admin = int(server.pop("port", 0)) or free_port(), free_port()
    config = tmp_path / f"s3proxy-{port}.yaml"
    config.write_text(
        json.dumps(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "shutdown_timeout_s": 20,
                    "workers": workers,
                    **server,
                },
                "admin": {"host": "127.0.0.1", "port": admin},
                # the emulator on a loaded machine is slower than S3: the short default
                # read timeout would retry (a second GET) and skew the GET counts
                "s3": {
                    "bucket": bucket,
                    "endpoint_url": emulator.endpoint_url,
                    "read_timeout_s": 5,
                },
                "auth": {"keys": [{"kid": "k1", "secret_env": SECRET_ENV}]},
                "cache": cache,
                "log": {"level": "info", "format": "json"},
            }
        )
    )
    env = {**os.environ, SECRET_ENV: SECRET}
    process = subprocess.Popen(
        [sys.executable, "-m", "s3proxy", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=(
            (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files))
            if open_files is not None
            else None
        ),
    )
    served = Served(process, port, admin)
    try:
        for _ in range(workers):
            served.read_until(lambda r: r.get("msg") == "listening")
        yield served
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if served.drainer is not None:
            served.drainer.join(timeout=10)
        with contextlib.suppress(ValueError, OSError):  # unless the test read it all
            assert process.stderr is not None
            served.lines += [{"unparsed": line} for line in process.stderr.read().splitlines()]
        SUITE_LOGS.keep([json.dumps(line) for line in served.lines])


@pytest.fixture
def served(emulator: Emulator, bucket: str, tmp_path: Path, workers: int) -> Iterator[Served]:
    cache = {"max_bytes": "8MiB", "disk": {"path": str(tmp_path / "blocks"), "max_bytes": "64MiB"}}
    with serve_process(emulator, bucket, tmp_path, workers, cache) as served:
        yield served


def raw_get(port: int, path: str, headers: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    return sock


def read_response(sock: socket.socket, slow: bool = False) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
        if slow:
            time.sleep(0.002)
    return head, body


def test_serve_answers_logs_reloads_and_drains_on_sigterm(
    served: Served, emulator: Emulator, bucket: str
) -> None:
    data = os.urandom(24 << 20)
    put_object(emulator, bucket, "movies/big.mp4", data)
    token = make_token("movies/*")

    head, body = read_response(
        raw_get(served.port, f"/vod/movies/big.mp4?token={token}", "Range: bytes=0-99\r\n")
    )
    assert head.startswith(b"HTTP/1.1 206") and body == data[:100]
    access = served.read_until(lambda r: r.get("logger") == "s3proxy.access")
    assert access["status"] == 206 and access["path"] == "/vod/movies/big.mp4"
    assert access["bytes"] == 100

    served.process.send_signal(signal.SIGHUP)
    served.read_until(lambda r: "SIGHUP" in r.get("msg", ""))

    # A slow reader is mid-body when SIGTERM comes: it still gets every byte.
    sock = raw_get(served.port, f"/t/{token}/movies/big.mp4")
    time.sleep(0.3)
    served.process.send_signal(signal.SIGTERM)
    head, body = read_response(sock, slow=True)
    assert head.startswith(b"HTTP/1.1 200") and body == data
    assert served.process.wait(timeout=30) == 0
    assert served.process.stderr is not None
    rest = served.process.stderr.read()
    assert token.split(".")[2] not in rest and all(
        token.split(".")[2] not in json.dumps(r) for r in served.lines
    )
    assert '"/t/-/movies/big.mp4"' in rest


@pytest.mark.parametrize("workers", [2])
def test_workers_share_the_port_and_report_metrics_together(
    served: Served, emulator: Emulator, bucket: str, workers: int
) -> None:
    data = os.urandom(3 << 20)
    put_object(emulator, bucket, "w.mp4", data)
    token = make_token("*")
    pids = set()
    for _ in range(40):  # new connections: the kernel spreads them over the workers
        head, body = read_response(
            raw_get(
                served.port, f"/t/{token}/w.mp4", "Range: bytes=1000-1999\r\nConnection: close\r\n"
            )
        )
        assert head.startswith(b"HTTP/1.1 206") and body == data[1000:2000]
    for record in served.lines:
        if record.get("msg") == "listening":
            pids.add(record["worker"])
    assert pids == {0, 1}
    with urllib.request.urlopen(f"http://127.0.0.1:{served.admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    # whichever worker answered the scrape, it counts the requests of both
    assert 's3proxy_requests_total{method="GET",status="206"} 40.0' in text
    max_bytes = [
        line
        for line in text.splitlines()
        if line.startswith('s3proxy_cache_max_bytes{tier="memory"}')
    ]
    assert max_bytes == ['s3proxy_cache_max_bytes{tier="memory"} 8.388608e+06']
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0


def object_gets(emulator: Emulator, bucket: str, key: str) -> int:
    """GETs the proxy decided to send: botocore's own retries (the emulator on a loaded
    machine sometimes drops a pooled connection) are not the store's doing."""
    return len(get_ranges(emulator, bucket, key))


def get_ranges(emulator: Emulator, bucket: str, key: str) -> list[str | None]:
    return [
        r.headers.get("Range")
        for r in emulator.object_requests(bucket)
        if r.method == "GET"
        and r.path == f"/{bucket}/{key}"
        and r.headers.get("Amz-Sdk-Request", "attempt=1").startswith("attempt=1")
    ]


def read_sequence(served: Served, token: str, asset: str, data: bytes) -> None:
    """Each read on a new connection (as Mist seeks), one after another, each after the
    blocks before it have landed in the shared tier (a block still in flight at one
    worker is fetched again by another: the workers share blocks, not fetches)."""
    mib = 1 << 20
    # each read ends where a block ends, so the blocks it fetched are whole (and handed to
    # the shared tier) when its answer is; reads then hit or miss by the tiers alone
    for start, end in [
        (0, mib - 1),
        (mib + 5000, 2 * mib - 1),
        (100, mib - 1),
        (3 * mib, -1),
        (2_500_000, 3 * mib - 1),
        (10, mib - 1),
        (mib + 7, 3 * mib - 1),
    ] * 3:
        end = len(data) - 1 if end < 0 else end
        head, body = read_response(
            raw_get(
                served.port,
                f"/t/{token}/{asset}",
                f"Range: bytes={start}-{end}\r\nConnection: close\r\n",
            )
        )
        assert head.startswith(b"HTTP/1.1 206") and body == data[start : end + 1]
        time.sleep(0.3)


@pytest.mark.parametrize("disk", [False, True])
def test_two_workers_fetch_no_more_than_one_and_warm_up_fills_both(
    emulator: Emulator, bucket: str, tmp_path: Path, disk: bool
) -> None:
    data = os.urandom(4 << 20)
    for name in ("one.mp4", "two.mp4", "warm.mp4"):
        put_object(emulator, bucket, name, data)
    token = make_token("*")
    cache: dict[str, Any] = {"max_bytes": "64MiB", "readahead_blocks": 0}
    if disk:
        cache["disk"] = {"path": str(tmp_path / "blocks"), "max_bytes": "64MiB"}
    with serve_process(emulator, bucket, tmp_path, 1, cache) as one:
        read_sequence(one, token, "one.mp4", data)
        one.process.send_signal(signal.SIGTERM)
        assert one.process.wait(timeout=30) == 0
    if disk:
        shutil.rmtree(tmp_path / "blocks")
    with serve_process(emulator, bucket, tmp_path, 2, cache) as two:
        read_sequence(two, token, "two.mp4", data)
        assert object_gets(emulator, bucket, "two.mp4") <= object_gets(
            emulator, bucket, "one.mp4"
        ), (
            "two workers fetch no more than one",
            get_ranges(emulator, bucket, "one.mp4"),
            get_ranges(emulator, bucket, "two.mp4"),
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{two.admin}/warm/warm.mp4", method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["warmed_bytes"] == 4 << 20
        gets = object_gets(emulator, bucket, "warm.mp4")
        for _ in range(20):  # new connections land on either worker: all hits
            head, body = read_response(
                raw_get(
                    two.port,
                    f"/t/{token}/warm.mp4",
                    "Range: bytes=1048576-2097151\r\nConnection: close\r\n",
                )
            )
            assert head.startswith(b"HTTP/1.1 206") and body == data[1 << 20 : 2 << 20]
        assert object_gets(emulator, bucket, "warm.mp4") == gets
        two.process.send_signal(signal.SIGTERM)
        assert two.process.wait(timeout=30) == 0
    (supervising,) = [r for r in two.lines if r.get("msg") == "supervising workers"]
    if disk:
        assert supervising["shared_tier"] is None
    else:
        assert supervising["shared_tier"].startswith("/dev/shm/s3proxy-blocks-")
        assert not os.path.exists(supervising["shared_tier"]), "removed at exit"


def test_a_shared_tier_is_removed_only_when_no_group_holds_its_lock(tmp_path: Path) -> None:
    import fcntl

    from s3proxy.workdirs import LOCK, remove_if_unlocked

    live, dead = tmp_path / "s3proxy-blocks-live", tmp_path / "s3proxy-blocks-dead"
    for directory in (live, dead):
        directory.mkdir()
        (directory / LOCK).touch()
    with open(live / LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        remove_if_unlocked(str(live))
        remove_if_unlocked(str(dead))
        assert live.exists() and not dead.exists()


@pytest.mark.parametrize("workers", [2])
def test_workers_stop_when_the_supervisor_is_killed(served: Served, workers: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/healthz", timeout=10):
        pass
    served.process.kill()  # SIGKILL: no chance to stop its workers
    served.process.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", served.port), timeout=1).close()
        except OSError:
            return  # nobody listens any more: the workers are gone
        time.sleep(0.2)
    raise AssertionError("the workers kept serving after their supervisor died")


def page_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/<pid>/stat, field 10)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="cache.preallocate needs glibc")
@pytest.mark.parametrize(
    ("max_connections", "soft", "warned"), [(1000, 3128, False), (4096, 4096, True)]
)
def test_the_open_files_limit_is_raised_to_what_the_connections_need(
    emulator: Emulator,
    bucket: str,
    tmp_path: Path,
    max_connections: int,
    soft: int,
    warned: bool,
) -> None:
    """Started with `ulimit -n` 1024 (hard 4096), a worker raises its soft limit to what
    3 x server.max_connections + the S3 pool + 64 need, or to the hard limit, and then
    says that is not enough."""
    with serve_process(
        emulator,
        bucket,
        tmp_path,
        1,
        {"max_bytes": "8MiB"},
        {"max_connections": max_connections},
        open_files=(1024, 4096),
    ) as served:
        limits = Path(f"/proc/{served.process.pid}/limits").read_text()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == [str(soft), "4096"]
    (record,) = [r for r in served.lines if "open files limit" in r.get("msg", "")]
    assert record["level"] == ("warning" if warned else "info")
    assert (record["from"], record["to"], record["needed"]) == (
        1024,
        soft,
        3 * max_connections + 64 + 64,
    )


def test_a_preallocated_memory_tier_caches_blocks_without_touching_new_pages(
    emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    """cache.preallocate: the memory tier's bytes are held and touched before the first
    request, so blocks cached later fill pages the process has (no page faults); without
    it each 1 MiB block faults in 256 new pages (which shows that the probe sees them)."""
    warm, data = os.urandom(2 << 20), os.urandom(12 << 20)
    put_object(emulator, bucket, "warm.mp4", warm)
    put_object(emulator, bucket, "held.mp4", data)
    token = make_token("*")
    resident: dict[bool, int] = {}
    faults: dict[bool, int] = {}
    said: dict[bool, int | None] = {}
    for preallocate in (False, True):
        cache = {"max_bytes": "32MiB", "preallocate": preallocate}
        with serve_process(emulator, bucket, tmp_path, 1, cache) as served:
            pid = served.process.pid
            listening = next(r for r in served.lines if r.get("msg") == "listening")
            said[preallocate] = listening.get("preallocated_bytes")
            resident[preallocate] = resident_bytes(pid)
            # connections, buffers and lazy imports first: what is left is the blocks
            path = f"/t/{token}/warm.mp4"
            assert read_response(raw_get(served.port, path, "Range: bytes=0-\r\n"))[1] == warm
            time.sleep(0.5)
            before = page_faults(pid)
            path = f"/t/{token}/held.mp4"
            assert read_response(raw_get(served.port, path, "Range: bytes=0-\r\n"))[1] == data
            time.sleep(0.5)  # the last blocks land in the cache
            faults[preallocate] = page_faults(pid) - before
    assert said == {False: None, True: 32 << 20}
    assert resident[True] - resident[False] > 28 << 20
    pages = len(data) // 4096
    assert faults[False] > pages // 2, faults
    assert faults[True] < pages // 4, faults
