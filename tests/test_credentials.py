"""Temporary S3 credentials are refreshed in the background: a container credentials
endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI on 127.0.0.1) that rotates keys every few
seconds, then fails, then hangs, never holds a read while the keys held are valid."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from s3proxy.credentials import RETRY_MAX_S, RETRY_MIN_S, refresh_delay

from .conftest import Emulator, StartProxy, make_token, put_object

LIFETIME_S = 8


class Endpoint:
    """A container credentials endpoint whose behaviour the test switches."""

    def __init__(self) -> None:
        self.mode = "rotate"
        self.served: list[str] = []  # access key ids handed out
        self.asked: dict[str, int] = {"rotate": 0, "fail": 0, "hang": 0}

    async def handle(self, request: web.Request) -> web.Response:
        self.asked[self.mode] += 1
        if self.mode == "fail":
            return web.Response(status=500, text="unavailable")
        if self.mode == "hang":
            await asyncio.sleep(60)
        key = f"ASIATEST{len(self.served):08d}"
        self.served.append(key)
        expiry = datetime.now(UTC) + timedelta(seconds=LIFETIME_S)
        return web.json_response(
            {
                "AccessKeyId": key,
                "SecretAccessKey": "placeholder-secret",
                "Token": "placeholder-session-token",
                "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )


async def test_reads_never_wait_on_a_refresh_while_the_keys_are_valid(
    emulator: Emulator,
    bucket: str,
    start_proxy: StartProxy,
    aiohttp_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put_object(emulator, bucket, "a.mp4", bytes(range(256)) * 4096 * 16)  # 16 MiB
    endpoint = Endpoint()
    app = web.Application()
    app.router.add_get("/creds", endpoint.handle)
    server = await aiohttp_server(app)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{server.port}/creds"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    running = await start_proxy(cache={"readahead_blocks": 0, "max_bytes": "2MiB"})
    url = running.url(f"/t/{make_token()}/a.mp4")
    first_bytes: dict[str, list[float]] = {"rotate": [], "fail": [], "hang": []}
    # The keys live LIFETIME_S and are refreshed half-way: the endpoint rotates them once,
    # then fails (the refresh is retried: asked twice), then hangs; the test stops short
    # of the last keys' expiry, after which a read would rightly wait.
    started = time.monotonic()
    hang_seen = 0.0
    block = 0
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < 3 * LIFETIME_S:
            if endpoint.mode == "rotate" and len(endpoint.served) >= 2:
                endpoint.mode = "fail"
            elif endpoint.mode == "fail" and endpoint.asked["fail"] >= 2:
                endpoint.mode = "hang"
            elif endpoint.mode == "hang" and endpoint.asked["hang"]:
                hang_seen = hang_seen or time.monotonic()
                if time.monotonic() - hang_seen > 0.3:
                    break
            begin = time.monotonic()
            start = block * (1 << 20)  # evicted since (2 MiB cache): a signed S3 GET each time
            async with session.get(url, headers={"Range": f"bytes={start}-{start + 99}"}) as r:
                await r.content.readexactly(1)
                first_bytes[endpoint.mode].append(time.monotonic() - begin)
                rest = await r.read()
            assert r.status == 206 and len(rest) == 99
            block = (block + 1) % 16
            await asyncio.sleep(0.1)
    keys_used = {
        r.headers.get("Authorization", "").split("Credential=")[-1].split("/")[0]
        for r in emulator.object_requests(bucket)
    }
    assert len(endpoint.served) >= 2, "keys were rotated in the background"
    assert len(keys_used & set(endpoint.served)) >= 2, keys_used
    assert endpoint.asked["fail"] >= 2, ("a failed refresh is tried again", endpoint.asked)
    assert endpoint.asked["hang"] >= 1, endpoint.asked
    for mode, samples in first_bytes.items():
        assert samples and max(samples) < 1.0, (mode, samples)


@given(
    lifetime=st.floats(1, 7200),
    elapsed=st.floats(0, 1),
    failures=st.integers(0, 20),
)
def test_refresh_delay_is_ahead_of_expiry_and_backs_off(
    lifetime: float, elapsed: float, failures: int
) -> None:
    issued = 1_000_000.0
    expiry = issued + lifetime
    now = issued + lifetime * elapsed
    delay = refresh_delay(now, expiry, issued, failures)
    assert delay >= 0
    if failures == 0:
        assert now + delay <= expiry - min(900, lifetime / 2) + 1e-6 or delay == 0
    else:
        assert RETRY_MIN_S <= delay <= RETRY_MAX_S
