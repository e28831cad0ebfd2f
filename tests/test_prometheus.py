"""A real scrape: Debian's Prometheus on loopback scrapes the admin listener of a
two-worker s3proxy; the counts, a histogram quantile and every alert expression come
back through Prometheus's HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .conftest import Emulator, make_token, put_object, require_tool
from .test_alerts import CONFIG
from .test_serve import free_port, raw_get, read_response, serve_process


def query(port: int, expression: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_two_workers_and_evaluates_every_alert(
    emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    prometheus = require_tool("prometheus")
    data = os.urandom(2 << 20)
    put_object(emulator, bucket, "p.mp4", data)
    token = make_token()
    with serve_process(emulator, bucket, tmp_path, 2, {}) as served:
        for _ in range(30):  # new connections: both workers answer some
            head, body = read_response(
                raw_get(
                    served.port, f"/t/{token}/p.mp4", "Range: bytes=0-999\r\nConnection: close\r\n"
                )
            )
            assert head.startswith(b"HTTP/1.1 206") and body == data[:1000]
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(CONFIG / "alerts.yml")],
                    "scrape_configs": [
                        {
                            "job_name": "edge-proxies",
                            "static_configs": [{"targets": [f"127.0.0.1:{served.admin}"]}],
                        }
                    ],
                }
            )
        )
        server = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            requests: list[dict[str, Any]] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    requests = query(port, 'sum(s3proxy_requests_total{status="206"})')
                except OSError:
                    requests = []
                if requests and float(requests[0]["value"][1]) >= 30:
                    break
                time.sleep(0.5)
            assert requests and float(requests[0]["value"][1]) == 30, requests
            print("s3proxy_requests_total{status=206} via Prometheus:", requests)
            quantile = query(
                port,
                "histogram_quantile(0.5, sum by (le) (s3proxy_time_to_first_byte_seconds_bucket))",
            )
            assert quantile and 0 < float(quantile[0]["value"][1]) < 5, quantile
            print("median time to first byte via Prometheus:", quantile)
            assert query(port, "s3proxy_ready")
            for group in yaml.safe_load((CONFIG / "alerts.yml").read_text())["groups"]:
                for rule in group["rules"]:
                    query(port, rule["expr"])  # evaluates: no error from Prometheus
        finally:
            server.terminate()
            server.wait(timeout=30)
