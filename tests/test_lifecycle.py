"""Start-up and shutdown as an operator sees them: a port in use is one line, the
supervisor gives up rather than restarting forever, SIGTERM's drain is bounded in all,
and the defaults answer a silent S3 before Mist gives up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from s3proxy.config import config_from_dict

from .conftest import SECRET, SECRET_ENV, SUITE_LOGS, Emulator, StartProxy, make_token, put_object
from .origin import OriginState, make_origin
from .test_http import fetch
from .test_serve import free_port, raw_get


def serve(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "s3proxy.yaml"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "s3proxy", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, SECRET_ENV: SECRET},
    )


def base(port: int, workers: int = 1) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "workers": workers},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "s3": {"bucket": "m", "endpoint_url": "http://127.0.0.1:9"},
        "auth": {"keys": [{"kid": "k1", "secret_env": SECRET_ENV}]},
        "log": {"format": "json"},
    }


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, base(port))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"can not listen on 127.0.0.1:{port}" in lines[0]


def test_the_supervisor_gives_up_when_a_worker_can_not_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = serve(tmp_path, base(port, workers=2))
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 20, "it did not restart the workers forever"
    errors = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if line.startswith("{") and '"error"' in line
    ]
    assert len(errors) == 1, result.stderr
    assert errors[0]["msg"].startswith("giving up: worker")
    assert f"can not listen on 127.0.0.1:{port}" in errors[0]["msg"]
    assert "Traceback" not in result.stderr


def test_sigterm_drains_for_at_most_the_shutdown_timeout_in_all(
    emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    put_object(emulator, bucket, "big.mp4", os.urandom(64 << 20))
    port = free_port()
    config = base(port)
    config["server"]["shutdown_timeout_s"] = 2
    config["s3"] = {"bucket": bucket, "endpoint_url": emulator.endpoint_url}
    path = tmp_path / "s3proxy.yaml"
    path.write_text(json.dumps(config))
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "s3proxy", "serve", "--config", str(path)],
        stderr=log.open("w"),
        env={**os.environ, SECRET_ENV: SECRET},
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        sock = raw_get(port, f"/t/{make_token()}/big.mp4")  # 64 MiB, never read
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        assert process.wait(timeout=30) == 0
        took = time.monotonic() - stopping
        sock.close()
    finally:
        if process.poll() is None:
            process.kill()
        SUITE_LOGS.keep(log.read_text())
    assert 1.0 < took < 2 + 1.0, f"stopped after {took:.1f} s (it drains, within 2 s)"


async def test_the_default_timeouts_answer_a_silent_s3_before_mist_gives_up(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=1000, behaviour="stall_headers")
    origin = await aiohttp_server(make_origin(state))
    config = config_from_dict(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "s3": {"bucket": "media", "endpoint_url": f"http://{origin.host}:{origin.port}"},
            "auth": {"keys": [{"kid": "k1", "secret_env": SECRET_ENV}]},
        }
    )
    running = await start_proxy(config)
    started = time.monotonic()
    status, _, _ = await fetch(running.url(f"/t/{make_token()}/a.mp4"), Range="bytes=0-9")
    assert status == 504
    assert time.monotonic() - started < 5


async def test_connections_over_the_limit_get_503_and_admin_healthz_still_answers(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    state = OriginState(size=1000, behaviour="stall_headers")
    origin = await aiohttp_server(make_origin(state))
    config = config_from_dict(
        {
            "server": {"host": "127.0.0.1", "port": 0, "max_connections": 1},
            "admin": {"host": "127.0.0.1", "port": 0},
            "s3": {
                "bucket": "media",
                "endpoint_url": f"http://{origin.host}:{origin.port}",
                "read_timeout_s": 5,
            },
            "auth": {"keys": [{"kid": "k1", "secret_env": SECRET_ENV}]},
        }
    )
    running = await start_proxy(config)
    async with aiohttp.ClientSession() as session:
        busy = asyncio.ensure_future(session.get(running.url(f"/t/{make_token()}/a.mp4")))
        for _ in range(50):
            if running.proxy.inflight:
                break
            await asyncio.sleep(0.02)
        status, _, _ = await fetch(running.url(f"/t/{make_token()}/b.mp4"))
        assert status == 503, "the one connection is taken"
        assert running.metric("s3proxy_requests_total", method="-", status="503") == 1
        # the admin listener counts its own connections
        status, _, body = await fetch(running.admin_url("/healthz"))
        assert (status, body) == (200, b"ok\n")
        busy.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await busy


def test_an_unusable_disk_tier_is_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    config = base(free_port())
    config["cache"] = {"disk": {"path": str(blocker / "blocks"), "max_bytes": "1GiB"}}
    result = serve(tmp_path, config)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "can not start" in lines[0] and "not-a-directory" in lines[0]
