"""Shared fixtures: a real S3 emulator over HTTP (moto server on 127.0.0.1), real JWTs,
and the proxy on a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import jwt
import pytest
from aiohttp.test_utils import TestServer
from moto.server import ThreadedMotoServer

from s3proxy.app import RUNNER_OPTIONS, Proxy, create_admin_app, create_app
from s3proxy.config import Config, config_from_dict
from s3proxy.connections import GuardedRunner, Limits
from s3proxy.logs import JsonFormatter

IN_CI = os.environ.get("CI", "").lower() == "true"
SECRET_ENV = "S3PROXY_TEST_JWT_SECRET"
SECRET = "test-only-placeholder-secret-" + "0123456789abcdef" * 3


class SuiteLogs:
    """Every token the suite mints (every `jwt.encode`, and what the `token` command
    prints) and every log line its proxies write (in-process through the real formatter,
    subprocesses from their stderr): at the end of the session no line may hold a
    token's payload or signature, whole, cut short or glued to other characters."""

    WINDOW = 20  # characters of a payload or signature that give a token away
    STEP = 8  # windows sampled every STEP characters: any 27 in a row hold one whole
    _RUNS = re.compile(r"[A-Za-z0-9_-]{20,}")

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.lines: list[str] = []

    def minted(self, token: str) -> str:
        self.tokens.add(token)
        return token

    def keep(self, text: str | list[str]) -> None:
        self.lines.extend(text.splitlines() if isinstance(text, str) else text)

    def leaks(self) -> list[str]:
        size, step = self.WINDOW, self.STEP
        parts = {p for t in self.tokens for p in t.split(".")[1:3] if len(p) >= size + step}
        windows = {p[i : i + size] for p in parts for i in range(0, len(p) - size + 1, step)}
        short = [t for t in self.tokens if len(t) < size + step]
        leaked = []
        for line in self.lines:
            runs = self._RUNS.findall(line)
            if any(
                run[i : i + size] in windows for run in runs for i in range(len(run) - size + 1)
            ) or any(token in line for token in short):
                leaked.append(line[:300])
        return leaked


SUITE_LOGS = SuiteLogs()


class _KeepLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            SUITE_LOGS.lines.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def no_token_in_any_log_line() -> Iterator[None]:
    root = logging.getLogger()
    handler, level = _KeepLines(), root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))  # access lines are INFO
    encode = jwt.encode
    jwt.encode = lambda *args, **kwargs: SUITE_LOGS.minted(encode(*args, **kwargs))
    yield
    jwt.encode = encode
    root.removeHandler(handler)
    root.setLevel(level)
    leaked = SUITE_LOGS.leaks()
    assert not leaked, f"{len(leaked)} log lines hold a token minted by the suite: {leaked[:5]}"


PACKAGES = {
    "ffmpeg": "ffmpeg",
    "ffprobe": "ffmpeg",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "nginx": "nginx-light",
    "haproxy": "haproxy",
}


def require_tool(name: str) -> str:
    """The tool's path; skip locally when it is missing, fail in CI."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES.get(name, name)
        message = f"{name} is not installed (Debian: apt-get install {package})"
        if IN_CI:
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return path


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


class _CountingWSGI:
    """Wraps the emulator's WSGI app and records every request it is asked."""

    def __init__(self, app: Any, seen: list[SeenRequest], lock: threading.Lock) -> None:
        self._app = app
        self._seen = seen
        self._lock = lock

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        headers = {
            k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        with self._lock:
            self._seen.append(
                SeenRequest(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), headers)
            )
        return self._app(environ, start_response)


@dataclass
class Emulator:
    endpoint_url: str
    seen: list[SeenRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def requests_for(self, bucket: str) -> list[SeenRequest]:
        with self.lock:
            return [
                r for r in self.seen if r.path == f"/{bucket}" or r.path.startswith(f"/{bucket}/")
            ]

    def object_requests(self, bucket: str) -> list[SeenRequest]:
        """Reads of objects (not the tests' uploads, nor the readiness probe of the bucket)."""
        return [
            r
            for r in self.requests_for(bucket)
            if r.path.startswith(f"/{bucket}/") and r.method in ("GET", "HEAD")
        ]


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        os.environ[name] = value
    os.environ.pop("AWS_PROFILE", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    emulator = Emulator(f"http://{host}:{port}")
    wsgi = server._server  # the werkzeug server: wrap its app to count requests
    assert wsgi is not None
    wsgi.app = _CountingWSGI(wsgi.app, emulator.seen, emulator.lock)
    yield emulator
    server.stop()


@pytest.fixture
def bucket(emulator: Emulator) -> str:
    name = f"t-{uuid.uuid4().hex[:20]}"
    emulator.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def _jwt_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_config(endpoint_url: str, bucket: str, **overrides: Any) -> Config:
    base = {
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "s3": {
            "bucket": bucket,
            "endpoint_url": endpoint_url,
            "connect_timeout_s": 2,
            "read_timeout_s": 5,
            "max_attempts": 2,
        },
        "auth": {"algorithms": ["HS256"], "keys": [{"kid": "k1", "secret_env": SECRET_ENV}]},
    }
    return config_from_dict(deep_merge(base, overrides), source="<test>")


def make_token(
    assets: list[str] | str = "**",
    *,
    ttl: int = 600,
    key: Any = SECRET,
    algorithm: str = "HS256",
    kid: str | None = "k1",
    **claims: Any,
) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {
        "iat": now,
        "exp": now + ttl,
        "assets": [assets] if isinstance(assets, str) else assets,
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return SUITE_LOGS.minted(jwt.encode(payload, key, algorithm=algorithm, headers=headers))


@dataclass
class RunningProxy:
    server: TestServer
    admin: TestServer
    proxy: Proxy
    bucket: str

    def url(self, path: str) -> str:
        # Plain concatenation: yarl's joining would normalise away '..' segments.
        return f"http://{self.server.host}:{self.server.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://{self.admin.host}:{self.admin.port}{path}"

    def metric(self, name: str, **labels: str) -> float:
        value = self.proxy.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value


StartProxy = Callable[..., Awaitable[RunningProxy]]


class GuardedTestServer(TestServer):
    """A TestServer whose connections carry the limits, as `s3proxy serve` runs them."""

    def __init__(self, app: Any, limits: Limits, metrics: Any) -> None:
        super().__init__(app, host="127.0.0.1")
        self._limits, self._metrics = limits, metrics

    async def _make_runner(self, **kwargs: Any) -> Any:
        return GuardedRunner(self.app, self._limits, self._metrics, **kwargs)


@pytest.fixture
async def start_proxy(emulator: Emulator, bucket: str) -> AsyncIterator[StartProxy]:
    """Start the proxy (main + admin listener) on loopback against the emulator."""
    servers: list[TestServer] = []

    async def start(
        config: Config | None = None,
        *,
        fast_lane: bool = True,
        group: tuple[int, int, str] | None = None,
        **overrides: Any,
    ) -> RunningProxy:
        """`fast_lane=False`: every request through aiohttp's request machinery;
        `group`: (worker, workers, shared directory), as `s3proxy serve` starts each."""
        config = config or make_config(emulator.endpoint_url, bucket, **overrides)
        worker, workers, shared_dir = group or (0, 1, None)
        proxy = Proxy(config, worker=worker, workers=workers, shared_dir=shared_dir)
        # As `s3proxy serve` runs them (RUNNER_OPTIONS); TestServer always sets
        # handler_cancellation=True itself.
        options = {k: v for k, v in RUNNER_OPTIONS.items() if k != "handler_cancellation"}
        assert RUNNER_OPTIONS["handler_cancellation"] is True
        limits = Limits.of(config.server)
        app = create_app(config, proxy, fast_lane=fast_lane)
        server = GuardedTestServer(app, limits, proxy.metrics)
        admin = GuardedTestServer(create_admin_app(proxy), limits, None)
        for each in (server, admin):
            servers.append(each)
            await each.start_server(**options)
        return RunningProxy(server, admin, proxy, config.s3.bucket)

    yield start
    while servers:
        await servers.pop().close()


def put_object(
    emulator: Emulator, bucket: str, key: str, data: bytes, content_type: str | None = None
) -> None:
    extra = {"ContentType": content_type} if content_type else {}
    emulator.client().put_object(Bucket=bucket, Key=key, Body=data, **extra)


async def stored_within(emulator: Emulator, bucket: str, key: str, seconds: float = 3) -> bytes:
    """The object once it is there (an upload Mist did not wait for lands a moment later)."""
    for _ in range(int(seconds / 0.05)):
        try:
            body: bytes = emulator.client().get_object(Bucket=bucket, Key=key)["Body"].read()
            return body
        except emulator.client().exceptions.NoSuchKey:
            await asyncio.sleep(0.05)
    raise AssertionError(f"{key} was never stored")


# Media made with real ffmpeg (prepare and ingest): an MP4 with its index at the end, a TS,
# a Matroska file MP4 can not hold, a text file named .mp4 and two truncated MP4s.
SOURCES = [
    "-f",
    "lavfi",
    "-i",
    "testsrc2=size=160x120:rate=25:duration=2",
    "-f",
    "lavfi",
    "-i",
    "sine=frequency=300:sample_rate=44100:duration=2",
]


def ffmpeg(*args: str) -> None:
    subprocess.run([require_tool("ffmpeg"), "-v", "error", "-y", *args], check=True, timeout=120)


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tool("ffprobe")
    root = tmp_path_factory.mktemp("media")
    files = {
        name: root / name
        for name in (
            "moov_end.mp4",
            "clip.ts",
            "pcm.mkv",
            "text.mp4",
            "cut.mp4",
            "cut_fast.mp4",
            "subs.srt",
        )
    }
    ffmpeg(
        *SOURCES,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-c:a",
        "aac",
        str(files["moov_end.mp4"]),
    )
    ffmpeg(
        *SOURCES, "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(files["clip.ts"])
    )
    ffmpeg(
        *SOURCES,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-c:a",
        "pcm_s16le",
        str(files["pcm.mkv"]),
    )
    files["text.mp4"].write_text("this is not a video\n" * 100)
    whole = files["moov_end.mp4"].read_bytes()
    files["cut.mp4"].write_bytes(whole[: len(whole) // 2])  # the moov (at the end) is gone
    fast = root / "fast.mp4"
    ffmpeg("-i", str(files["moov_end.mp4"]), "-c", "copy", "-movflags", "+faststart", str(fast))
    fast_bytes = fast.read_bytes()
    files["cut_fast.mp4"].write_bytes(fast_bytes[: len(fast_bytes) * 2 // 3])
    files["subs.srt"].write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
    return files
