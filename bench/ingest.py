"""Upload to webhook: how long `s3proxy ingest` takes from the end of an upload to its
`asset.ready`, for an MP4 with its index at the end.

    python bench/ingest.py                   # 200 MB, 3 runs
    python bench/ingest.py --mb 50 --runs 5

The S3 emulator (moto) on 127.0.0.1 sends the upload bucket's real event notifications to
its SQS queue; one `s3proxy ingest` process takes them; a webhook receiver on loopback
records when each event arrives. Printed per run: seconds from the upload's end to the
webhook, and the job's own seconds from its log line; then the median. The file is made
once with ffmpeg (a short clip looped with `-c copy` to the size asked for).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
from aiohttp import web
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-webhook-secret-0123456789"


def make_media(directory: Path, megabytes: int) -> Path:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        sys.exit("ffmpeg is not installed (Debian: apt-get install ffmpeg)")
    clip = directory / "clip.mp4"
    subprocess.run(
        [
            ffmpeg, "-v", "error", "-y",
            "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25:duration=10",
            "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=48000:duration=10",
            "-c:v", "libx264", "-preset", "ultrafast", "-b:v", "12M",
            "-c:a", "aac", str(clip),
        ],
        check=True,
        timeout=600,
    )  # fmt: skip
    loops = max(1, round(megabytes * 1e6 / clip.stat().st_size))
    target = directory / "upload.mp4"  # the moov stays at the end (no faststart)
    subprocess.run(
        [
            ffmpeg, "-v", "error", "-y", "-stream_loop", str(loops - 1), "-i", str(clip),
            "-c", "copy", str(target),
        ],
        check=True,
        timeout=600,
    )  # fmt: skip
    return target


async def run(megabytes: int, runs: int) -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the emulator's request lines
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    s3, sqs = boto3.client("s3", **options), boto3.client("sqs", **options)
    name = uuid.uuid4().hex[:8]
    uploads, media = f"up-{name}", f"media-{name}"
    s3.create_bucket(Bucket=uploads)
    s3.create_bucket(Bucket=media)
    queue = sqs.create_queue(QueueName=f"q-{name}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    s3.put_bucket_notification_configuration(
        Bucket=uploads,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    arrived: dict[str, float] = {}

    async def hook(request: web.Request) -> web.Response:
        event = json.loads(await request.read())
        arrived[event["upload"]["key"]] = time.monotonic()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_port = runner.addresses[0][1]

    with tempfile.TemporaryDirectory(prefix="s3proxy-bench-ingest-") as tmp:
        work = Path(tmp)
        source = make_media(work, megabytes)
        size = source.stat().st_size
        config = work / "ingest.yaml"
        config.write_text(
            json.dumps(
                {
                    "s3": {"bucket": media, "endpoint_url": endpoint},
                    "ingest": {
                        "source": f"s3://{uploads}/raw/",
                        "queue_url": queue,
                        "queue_endpoint_url": endpoint,
                        "work_dir": str(work / "jobs"),
                        "notify_url": f"http://127.0.0.1:{hook_port}/hook",
                        "admin_port": 0,
                    },
                }
            )
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "s3proxy", "ingest", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "S3PROXY_WEBHOOK_SECRET": SECRET},
        )
        lines: list[dict[str, Any]] = []

        def read() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    lines.append({"unparsed": line})

        threading.Thread(target=read, daemon=True).start()
        print(f"upload: {size / 1e6:.1f} MB MP4, index at the end; emulator on {endpoint}")
        totals, jobs = [], []
        try:
            body = source.read_bytes()
            for index in range(runs):
                key = f"raw/film{index}.mp4"
                await asyncio.to_thread(s3.put_object, Bucket=uploads, Key=key, Body=body)
                uploaded = time.monotonic()
                deadline = uploaded + 600
                while key not in arrived and time.monotonic() < deadline:
                    if process.poll() is not None:
                        sys.exit(f"ingest exited: {lines[-5:]}")
                    await asyncio.sleep(0.05)
                if key not in arrived:
                    sys.exit(f"no webhook for {key} within 600 s: {lines[-5:]}")
                total = arrived[key] - uploaded
                job: dict[str, Any] = {}
                while not job and time.monotonic() < deadline:  # logged after the webhook
                    job = next((r for r in lines if _job_of(r, key)), {})
                    await asyncio.sleep(0.05)
                totals.append(total)
                jobs.append(job["seconds"])
                phases = ", ".join(f"{k} {v:.2f}" for k, v in job.get("phases_s", {}).items())
                print(
                    f"run {index + 1}: upload end -> webhook {total:6.2f} s "
                    f"(job {job['seconds']:.2f} s, outcome {job['outcome']}; {phases})"
                )
        finally:
            process.terminate()
            process.wait(timeout=60)
    print(
        f"median of {runs}: upload end -> webhook {statistics.median(totals):.2f} s, "
        f"job {statistics.median(jobs):.2f} s, {size / 1e6 / statistics.median(totals):.0f} MB/s"
    )
    await runner.cleanup()
    server.stop()


def _job_of(record: dict[str, Any], key: str) -> bool:
    return record.get("msg") == "ingest job" and str(record.get("upload", "")).endswith(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="upload size in MB (200)")
    parser.add_argument("--runs", type=int, default=3, help="uploads, one after another (3)")
    args = parser.parse_args()
    asyncio.run(run(args.mb, args.runs))


if __name__ == "__main__":
    main()
