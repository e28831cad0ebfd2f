"""The admin listener: health, readiness against the real upstream, Prometheus metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from s3proxy.config import ConfigError, admin_secret

from .conftest import Emulator, RunningProxy, StartProxy, make_config, make_token, put_object
from .test_http import fetch
from .test_upstream import closed_port

METRIC_NAMES = [
    "s3proxy_requests_total",
    "s3proxy_request_duration_seconds",
    "s3proxy_response_bytes_total",
    "s3proxy_inflight_requests",
    "s3proxy_auth_failures_total",
    "s3proxy_upstream_requests_total",
    "s3proxy_upstream_request_duration_seconds",
    "s3proxy_upstream_bytes_total",
]


async def wait_ready(running: RunningProxy) -> tuple[int, bytes]:
    for _ in range(50):
        status, _, body = await fetch(running.admin_url("/readyz"))
        if status == 200:
            break
        await asyncio.sleep(0.1)
    return status, body


async def test_healthz_on_both_listeners(start_proxy: StartProxy) -> None:
    running = await start_proxy()
    for url in (running.url("/healthz"), running.admin_url("/healthz")):
        status, _, body = await fetch(url)
        assert (status, body) == (200, b"ok\n")


async def test_readyz_follows_the_upstream_probe(start_proxy: StartProxy) -> None:
    running = await start_proxy()
    assert await wait_ready(running) == (200, b"ready\n")


async def test_readyz_is_503_with_the_reason_when_s3_is_unreachable(
    start_proxy: StartProxy,
) -> None:
    config = make_config(
        f"http://127.0.0.1:{closed_port()}", "media", s3={"connect_timeout_s": 1, "max_attempts": 1}
    )
    running = await start_proxy(config)
    await asyncio.sleep(0.3)
    status, _, body = await fetch(running.admin_url("/readyz"))
    assert status == 503
    assert body.startswith(b"not ready: ")


async def test_readyz_with_a_missing_probe_key_is_503(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    running = await start_proxy(s3={"probe_key": "health/missing.txt"})
    await asyncio.sleep(0.3)
    status, _, body = await fetch(running.admin_url("/readyz"))
    assert (status, body) == (503, b"not ready: object not found\n")
    put_object(emulator, bucket, "health/missing.txt", b"ok")
    await running.proxy.probe_once()
    assert (await fetch(running.admin_url("/readyz")))[0] == 200


async def test_metrics_expose_the_documented_names_without_tokens_or_assets(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "movies/secret-title.mp4", b"x" * 5000)
    running = await start_proxy()
    token = make_token("movies/*")
    await fetch(running.url(f"/vod/movies/secret-title.mp4?token={token}"), Range="bytes=0-99")
    await fetch(running.url("/vod/movies/secret-title.mp4"))
    for _ in range(20):  # the access record is written just after the last byte goes out
        if running.metric("s3proxy_requests_total", method="GET", status="401") == 1:
            break
        await asyncio.sleep(0.05)
    status, headers, body = await fetch(running.admin_url("/metrics"))
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert 's3proxy_requests_total{method="GET",status="206"} 1.0' in text
    assert 's3proxy_auth_failures_total{reason="missing"} 1.0' in text
    assert 's3proxy_upstream_requests_total{op="get",outcome="ok"} 1.0' in text
    assert "s3proxy_upstream_bytes_total 5000.0" in text  # the whole (only) block
    assert "s3proxy_response_bytes_total 100.0" in text
    assert "secret-title" not in text and token.split(".")[2] not in text


async def test_warm_needs_the_admin_secret_when_one_is_configured(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_object(emulator, bucket, "w.mp4", b"w" * 1000)
    monkeypatch.setenv("S3PROXY_TEST_ADMIN_TOKEN", "admin-placeholder-0123456789")
    running = await start_proxy(admin={"token_env": "S3PROXY_TEST_ADMIN_TOKEN"})
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            async with session.post(running.admin_url("/warm/w.mp4"), headers=headers) as r:
                assert r.status == 401
        async with session.post(
            running.admin_url("/warm/w.mp4"),
            headers={"Authorization": "Bearer admin-placeholder-0123456789"},
        ) as response:
            assert response.status == 200
        async with session.get(running.admin_url("/metrics")) as response:
            assert response.status == 200, "metrics stay open"
    gets = [r for r in emulator.object_requests(bucket) if r.method == "GET"]
    assert len([r for r in gets if r.path.endswith("/w.mp4")]) == 1, "one warm-up"


def test_an_admin_listener_beyond_loopback_needs_a_secret(emulator: Emulator, bucket: str) -> None:
    with pytest.raises(ConfigError) as refused:
        admin_secret(make_config(emulator.endpoint_url, bucket, admin={"host": "0.0.0.0"}))
    assert refused.value.key == "admin.token_env"
    assert admin_secret(make_config(emulator.endpoint_url, bucket, admin={"host": "::1"})) is None
