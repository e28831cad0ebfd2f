"""`s3proxy demo` as a user runs it: it starts, its URL serves the sample, SIGTERM stops it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import resources

from .conftest import SUITE_LOGS

SAMPLE = resources.files("s3proxy").joinpath("data", "sample.mp4").read_bytes()


def test_demo_serves_the_sample_and_stops_on_sigterm() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "s3proxy", "demo", "--port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = None
        deadline = time.monotonic() + 30
        lines = []
        assert process.stdout is not None
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"URL \(.*\): (http://\S+)", line)
            if match:
                url = match.group(1)
        assert url, "no URL printed: " + "".join(lines)
        assert re.match(r"http://127\.0\.0\.1:\d+/t/[\w-]+\.[\w-]+\.[\w-]+/sample\.mp4$", url)
        request = urllib.request.Request(url, headers={"Range": "bytes=0-1023"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 206
            assert response.read() == SAMPLE[:1024]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == SAMPLE
        while not lines[-1].startswith("Press Ctrl-C") and time.monotonic() < deadline:
            lines.append(process.stdout.readline())
        admin = re.search(r"curl -s (http://\S+)/metrics", "".join(lines))
        assert admin, "".join(lines)
        with urllib.request.urlopen(admin.group(1) + "/metrics", timeout=10) as response:
            assert b"s3proxy_requests_total" in response.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert "stopped" in process.stdout.read()
        assert process.stderr is not None
        log = process.stderr.read()
        SUITE_LOGS.minted(url.split("/t/")[1].split("/")[0])
        SUITE_LOGS.keep(log)
        assert "/t/-/sample.mp4" in log and "status=206" in log, log  # access lines, at info
        assert url.split("/t/")[1].split("/")[0] not in log, "no token in the log"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
