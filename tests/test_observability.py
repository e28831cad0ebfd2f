"""What an operator sees: one access line per request with its request id, cache
outcome, time on S3 and token subject (never the token), and the metrics that say how
fast first bytes go out and whether the node is ready."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest

from s3proxy import __version__
from s3proxy.logs import JsonFormatter, log_fields

from .conftest import Emulator, RunningProxy, StartProxy, make_token, put_object

ASSET = "obs.mp4"


async def get(
    running: RunningProxy, token: str, header: str, **headers: str
) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            running.url(f"/t/{token}/{ASSET}"), headers={"Range": header, **headers}
        ) as response:
            await response.read()
            return response.status, dict(response.headers)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.fields
        for r in caplog.records  # type: ignore[attr-defined]
        if r.name == "s3proxy.access"
    ]


async def test_the_access_line_says_who_what_and_where_the_bytes_came_from(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    put_object(emulator, bucket, ASSET, bytes(3 << 20))
    running = await start_proxy(cache={"metadata_ttl_s": 0.2, "readahead_blocks": 0})
    token = make_token("**", sub="viewer-7", jti="t-123")
    caplog.set_level(logging.INFO, logger="s3proxy.access")
    status, headers = await get(running, token, "bytes=0-99", **{"X-Request-ID": "edge-42"})
    assert status == 206 and headers["X-Request-ID"] == "edge-42"
    await asyncio.sleep(0.3)  # block 0 landed; the metadata expired
    status, headers = await get(running, token, "bytes=100-199")
    generated = headers["X-Request-ID"]
    assert status == 206 and len(generated) == 16
    status, _ = await get(running, token, "bytes=200-299")  # fresh metadata, cached block
    status, _ = await get(running, token, f"bytes=0-{(2 << 20) - 1}")  # block 0 and 1
    first, second, third, fourth = access_lines(caplog)[-4:]
    assert first["request_id"] == "edge-42" and first["cache"] == "miss"
    assert second["request_id"] == generated and second["cache"] == "revalidated"
    assert third["cache"] == "hit" and fourth["cache"] == "partial"
    assert first["sub"] == "viewer-7" and first["jti"] == "t-123" and first["worker"] == 0
    assert first["upstream_ms"] > 0 and third["upstream_ms"] == 0
    assert all(token not in str(line) for line in access_lines(caplog))
    # a made-up request id that could forge log lines is replaced
    status, headers = await get(running, token, "bytes=0-9", **{"X-Request-ID": "a b;c=d"})
    assert headers["X-Request-ID"] != "a b;c=d"


async def test_metrics_for_first_bytes_readiness_build_and_the_process(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, ASSET, bytes(2 << 20))
    running = await start_proxy()
    token = make_token()
    await get(running, token, "bytes=0-99")  # from upstream
    await asyncio.sleep(0.2)
    await get(running, token, "bytes=100-199")  # from memory
    await running.proxy.probe_once()
    name = "s3proxy_time_to_first_byte_seconds_count"
    assert running.metric(name, source="upstream") == 1
    assert running.metric(name, source="memory") == 1
    assert running.metric("s3proxy_ready") == 1
    assert running.metric("s3proxy_build_info", version=__version__) == 1
    text = running.proxy.metrics.exposition().decode()
    assert "process_resident_memory_bytes" in text and "python_gc_objects_collected" in text


def test_json_lines_carry_their_own_time_across_second_boundaries() -> None:
    formatter = JsonFormatter()  # it writes the date part once a second
    for created in (1_700_000_000.999, 1_700_000_001.0, 1_700_000_001.5, 1_699_999_999.25):
        record = logging.LogRecord("s3proxy.access", logging.INFO, "", 0, "request", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        line = json.loads(formatter.format(record))
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        assert line["ts"] == f"{expected}.{int(record.msecs):03d}Z", (created, line["ts"])


def test_a_line_logged_with_its_fields_is_the_line_logged_the_usual_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("s3proxy.access")
    fields: dict[str, object] = {"method": "GET", "status": 206, "path": "/t/-/a.mp4"}
    with caplog.at_level(logging.INFO, logger="s3proxy.access"):
        logger.info("request", extra={"fields": fields})
        log_fields(logger, logging.INFO, "request", fields)
        log_fields(logger, logging.DEBUG, "not this one", fields)
    usual, ours = (r for r in caplog.records if r.name == "s3proxy.access")
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in (usual, ours)]
    for line in lines:
        del line["ts"]  # made a moment apart
    assert lines[0] == lines[1] and lines[0]["status"] == 206


# A worker's values: prometheus-client's multiprocess mode otherwise asks the kernel for
# the pid at every inc and observe (to notice a fork).
_WORKER_METRICS = """
import os, sys
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
from s3proxy.metrics import fix_process_identity

if sys.argv[2] == "fixed":
    fix_process_identity()
counter = Counter("hits", "hits", registry=CollectorRegistry())
counter.inc()  # the first update may notice a fork: not counted
calls = []
sys.setprofile(lambda frame, event, arg: calls.append(arg) if event == "c_call" else None)
for _ in range(5):
    counter.inc()
sys.setprofile(None)
registry = CollectorRegistry()
MultiProcessCollector(registry)
print(sum(1 for c in calls if c is os.getpid), registry.get_sample_value("hits_total"),
      os.path.exists(os.path.join(sys.argv[1], f"counter_{os.getpid()}.db")))
"""


@pytest.mark.parametrize(("mode", "pid_reads"), [("plain", "5"), ("fixed", "0")])
def test_a_worker_reads_its_pid_once_not_at_every_metric_update(
    tmp_path: Any, mode: str, pid_reads: str
) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _WORKER_METRICS, str(tmp_path), mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    # the values still land in this process's own file, and still sum
    assert out == [pid_reads, "6.0", "True"]
