"""`s3proxy ingest` as processes against the emulator's S3 and SQS: moto's S3 sends the
bucket's real event notifications to its queue; a webhook receiver on loopback checks
every signature; real ffmpeg files (an MP4 with its index at the end, a TS, a text file
named .mp4, a truncated MP4)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp import web

from s3proxy.ingest.notify import SIGNATURE_HEADER, verify
from s3proxy.prepare import top_level_boxes

from .conftest import SUITE_LOGS, Emulator, StartProxy, make_token, require_tool
from .test_media_clients import codecs_of
from .test_serve import free_port

WEBHOOK_SECRET = "webhook-secret-for-tests-only-0123"
UPLOADS = {  # file -> (key under raw/, what ingest must do with it)
    "moov_end.mp4": ("film.mp4", "ready"),
    "clip.ts": ("news.ts", "ready"),
    "text.mp4": ("notes.mp4", "failed"),
    "cut.mp4": ("cut.mp4", "failed"),
}


@dataclass
class Webhooks:
    """A control plane's endpoint: records each event whose signature holds; answers 503
    to the first `fail_first` deliveries (a retry must follow)."""

    fail_first: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    bad_signatures: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        if not verify(body, request.headers.get(SIGNATURE_HEADER, ""), WEBHOOK_SECRET):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.attempts <= self.fail_first:
            return web.Response(status=503)
        self.events.append(json.loads(body))
        return web.Response(status=204)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def wait(self, count: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while len(self.events) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(self.events) >= count, f"{len(self.events)} of {count} events: {self.events}"


@pytest.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()
    app = web.Application()
    app.router.add_post("/hooks", hooks.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    hooks.url = f"http://{host}:{port}/hooks"
    yield hooks
    await runner.cleanup()


@dataclass
class Stage:
    """Buckets and a queue wired as on AWS: uploads land under raw/ in the upload bucket,
    whose ObjectCreated events go to the queue; assets go to the media bucket."""

    emulator: Emulator
    uploads: str
    media: str
    queue_url: str

    def sqs(self) -> Any:
        return boto3.client(
            "sqs",
            endpoint_url=self.emulator.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def upload(self, path: Path, key: str) -> None:
        self.emulator.client().put_object(Bucket=self.uploads, Key=key, Body=path.read_bytes())

    def waiting(self) -> int:
        attributes = self.sqs().get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        listed = self.emulator.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(entry["Key"] for entry in listed.get("Contents", []))


@pytest.fixture
def stage(emulator: Emulator) -> Stage:
    name = uuid.uuid4().hex[:12]
    s3 = emulator.client()
    uploads, media = f"up-{name}", f"media-{name}"
    s3.create_bucket(Bucket=uploads)
    s3.create_bucket(Bucket=media)
    stage = Stage(emulator, uploads, media, "")
    sqs = stage.sqs()
    stage.queue_url = sqs.create_queue(QueueName=f"q-{name}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=stage.queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=uploads,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "raw/"}]}},
                }
            ]
        },
    )
    # S3 announces the configuration with a test event: ingest must drop it quietly
    return stage


class Ingest:
    """One `s3proxy ingest` process; its JSON log read in a thread into `lines`."""

    def __init__(self, process: subprocess.Popen[str], admin: int) -> None:
        self.process, self.admin = process, admin
        self.lines: list[dict[str, Any]] = []
        assert process.stderr is not None
        stream = process.stderr

        def read() -> None:
            for line in stream:
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.lines.append({"unparsed": line})

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def jobs(self) -> list[dict[str, Any]]:
        return [r for r in self.lines if r.get("msg") == "ingest job"]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any(predicate(r) for r in list(self.lines)):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"not seen in {seconds} s; log: {self.lines}")

    async def until(self, predicate: Callable[[dict[str, Any]], bool], seconds: float = 60) -> None:
        """wait_for, leaving the event loop (the webhook receiver) running meanwhile."""
        await asyncio.to_thread(self.wait_for, predicate, seconds)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


@contextmanager
def ingest_process(
    stage: Stage,
    tmp_path: Path,
    webhooks: Webhooks | None,
    path_env: str | None = None,
    **ingest: Any,
) -> Iterator[Ingest]:
    admin = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    work = tmp_path / "work"
    settings: dict[str, Any] = {
        "source": f"s3://{stage.uploads}/raw/",
        "match": "{id}.{ext}",
        "publish_as": "{id}/master.mp4",
        "queue_url": stage.queue_url,
        "queue_endpoint_url": stage.emulator.endpoint_url,
        "lease_s": 30,
        "max_concurrent": 2,
        "work_dir": str(work),
        "min_free_bytes": "1MiB",
        "notify_url": webhooks.url if webhooks else None,
        "notify_attempts": 4,
        "notify_backoff_s": 0.2,
        "shutdown_timeout_s": 10,
        "admin_host": "127.0.0.1",
        "admin_port": admin,
        **ingest,
    }
    config = tmp_path / f"ingest-{admin}.yaml"
    config.write_text(
        json.dumps(
            {
                "s3": {
                    "bucket": stage.media,
                    "prefix": "vod/",
                    "endpoint_url": stage.emulator.endpoint_url,
                },
                "ingest": settings,
                "log": {"level": "info", "format": "json"},
            }
        )
    )
    env = {**os.environ, "S3PROXY_WEBHOOK_SECRET": WEBHOOK_SECRET}
    if path_env is not None:
        env["PATH"] = path_env
    process = subprocess.Popen(
        [sys.executable, "-m", "s3proxy", "ingest", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    running = Ingest(process, admin)
    try:
        running.wait_for(lambda r: r.get("msg") == "ingest started", 30)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        running.reader.join(timeout=10)
        SUITE_LOGS.keep([json.dumps(line) for line in running.lines])


def _all_jobs(*processes: Ingest) -> list[dict[str, Any]]:
    return [job for p in processes for job in p.jobs()]


async def _wait_jobs(
    processes: tuple[Ingest, ...], count: int, seconds: float = 90
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        settled = [j for j in _all_jobs(*processes) if j["outcome"] != "released"]
        if len(settled) >= count:
            return settled
        await asyncio.sleep(0.1)
    raise AssertionError(f"jobs: {_all_jobs(*processes)}")


async def test_uploads_become_ready_or_fail_with_signed_webhooks_and_each_is_prepared_once(
    stage: Stage,
    tmp_path: Path,
    media: dict[str, Path],
    webhooks: Webhooks,
    start_proxy: StartProxy,
) -> None:
    webhooks.fail_first = 2  # the first deliveries meet a 503: retried with back-off
    with (
        ingest_process(stage, tmp_path / "a", webhooks) as first,
        ingest_process(stage, tmp_path / "b", webhooks) as second,
    ):
        for name, (key, _) in UPLOADS.items():
            stage.upload(media[name], f"raw/{key}")
        stage.upload(media["moov_end.mp4"], "elsewhere/film.mp4")  # not under raw/
        jobs = await _wait_jobs((first, second), len(UPLOADS))
        await webhooks.wait(len(UPLOADS))
        await asyncio.sleep(1.0)  # anything taken twice would show now
        jobs = [j for j in _all_jobs(first, second) if j["outcome"] != "released"]
        by_upload = {j["upload"]: j for j in jobs}
        assert len(jobs) == len(by_upload) == len(UPLOADS), jobs  # each exactly once
        for name, (key, outcome) in UPLOADS.items():
            assert by_upload[f"s3://{stage.uploads}/raw/{key}"]["outcome"] == outcome, name
        assert webhooks.bad_signatures == 0 and webhooks.attempts == len(UPLOADS) + 2
        assert len(webhooks.events) == len(UPLOADS)

        ready = {e["asset"]: e for e in webhooks.of("asset.ready")}
        assert sorted(ready) == ["film/master.mp4", "news/master.mp4"]
        for event in ready.values():
            assert event["container"] == "mp4" and event["index"] == "start"
            assert sorted(event["codecs"]) == ["audio:aac", "video:h264"]
            assert 1.9 < event["duration_s"] < 2.2 and event["size"] > 0
            assert event["sidecar"] is False and event["repeat"] is False
            assert event["upload"]["bucket"] == stage.uploads and event["id"]
        failed = {e["upload"]["key"]: e for e in webhooks.of("asset.failed")}
        assert sorted(failed) == ["raw/cut.mp4", "raw/notes.mp4"]
        assert failed["raw/notes.mp4"]["error"].startswith("notes.mp4 is not a media file")
        assert failed["raw/cut.mp4"]["error"].startswith("cut.mp4 is not a media file")
        assert all("s3proxy-ingest-" not in e["error"] for e in failed.values()), "no work path"
        # refused uploads are moved aside, so nothing takes them again
        assert stage.keys(stage.uploads, "refused/") == [
            "refused/raw/cut.mp4",
            "refused/raw/notes.mp4",
        ]
        assert stage.keys(stage.uploads, "raw/") == ["raw/film.mp4", "raw/news.ts"]
        assert stage.keys(stage.media) == ["vod/film/master.mp4", "vod/news/master.mp4"]
        assert stage.waiting() == 0, "every message deleted once its job was settled"

        # what is published plays through s3proxy, index first
        running = await start_proxy(s3={"bucket": stage.media, "prefix": "vod/"})
        for asset in ready:
            local = tmp_path / asset.replace("/", "_")
            local.write_bytes(
                stage.emulator.client()
                .get_object(Bucket=stage.media, Key=f"vod/{asset}")["Body"]
                .read()
            )
            kinds = [b[0] for b in top_level_boxes(local)]
            assert kinds.index("moov") < kinds.index("mdat")
            url = running.url(f"/t/{make_token(asset)}/{asset}")
            assert await codecs_of(url) == ["aac", "h264"]

        # observable: metrics, health, one JSON line per job
        metrics = first.get("/metrics")[1].decode() + second.get("/metrics")[1].decode()
        total = {
            outcome: sum(
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith(f's3proxy_ingest_jobs_total{{outcome="{outcome}"}}')
            )
            for outcome in ("ready", "failed", "skipped")
        }
        assert total == {"ready": 2.0, "failed": 2.0, "skipped": 0.0}
        assert "s3proxy_ingest_job_seconds_count" in metrics
        assert "s3proxy_ingest_queue_lag_seconds_count" in metrics
        assert "s3proxy_ingest_inflight 0.0" in metrics
        for process in (first, second):
            assert process.get("/healthz")[0] == 200
            assert process.get("/readyz")[0] == 200
        for job in jobs:
            assert job["level"] == "info" and job["seconds"] >= 0 and job["asset"]


async def test_a_repeated_event_or_the_same_bytes_again_are_skipped_and_told_again(
    stage: Stage, tmp_path: Path, media: dict[str, Path], webhooks: Webhooks
) -> None:
    with ingest_process(stage, tmp_path, webhooks) as ingest:
        stage.upload(media["moov_end.mp4"], "raw/film.mp4")
        await webhooks.wait(1)
        # SQS delivers at least once: the same event again
        listed = stage.emulator.client().head_object(Bucket=stage.uploads, Key="raw/film.mp4")
        record = {
            "eventSource": "aws:s3",
            "eventName": "ObjectCreated:Put",
            "eventTime": "2026-12-02T00:00:00.000Z",
            "s3": {
                "bucket": {"name": stage.uploads},
                "object": {"key": "raw/film.mp4", "size": 1, "eTag": listed["ETag"].strip('"')},
            },
        }
        stage.sqs().send_message(
            QueueUrl=stage.queue_url, MessageBody=json.dumps({"Records": [record]})
        )
        await webhooks.wait(2)
        # the same bytes as a multipart upload: another ETag, the same content hash
        s3 = stage.emulator.client()
        body = media["moov_end.mp4"].read_bytes()
        upload = s3.create_multipart_upload(Bucket=stage.uploads, Key="raw/film.mp4")
        part = s3.upload_part(
            Bucket=stage.uploads,
            Key="raw/film.mp4",
            UploadId=upload["UploadId"],
            PartNumber=1,
            Body=body,
        )
        s3.complete_multipart_upload(
            Bucket=stage.uploads,
            Key="raw/film.mp4",
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
        )
        await webhooks.wait(3)
        await asyncio.sleep(1)  # the emulator announces a multipart upload twice
    outcomes = [(j["outcome"], j.get("why", "")) for j in ingest.jobs()]
    assert outcomes[:2] == [("ready", ""), ("skipped", "published already (same ETag)")]
    assert set(outcomes[2:]) == {("skipped", "published already (same content hash)")}
    first, again, same_bytes = webhooks.events[:3]
    assert first["type"] == again["type"] == same_bytes["type"] == "asset.ready"
    assert again["id"] == first["id"] and again["repeat"] is True  # a receiver drops it
    assert same_bytes["id"] != first["id"] and same_bytes["duration_s"] == first["duration_s"]
    assert again["codecs"] == first["codecs"] and again["size"] == first["size"]


def slow_tool(tmp_path: Path, name: str, seconds: float) -> str:
    """A PATH where `name` waits `seconds` before running the real one."""
    real = require_tool(name)
    directory = tmp_path / f"slow-{name}"
    directory.mkdir(exist_ok=True)
    script = directory / name
    script.write_text(f'#!/bin/sh\nsleep {seconds}\nexec {real} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{directory}:{os.environ['PATH']}"


MODES = {"queue": {}, "poll": {"queue_url": None, "poll_interval_s": 0.3}}


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_a_process_killed_mid_job_leaves_the_upload_to_the_other(
    stage: Stage, tmp_path: Path, media: dict[str, Path], webhooks: Webhooks, mode: str
) -> None:
    slow = slow_tool(tmp_path, "ffmpeg", 60)
    shared = {"work_dir": str(tmp_path / "work"), "lease_s": 3, **MODES[mode]}
    with ingest_process(stage, tmp_path / "a", webhooks, path_env=slow, **shared) as doomed:
        stage.upload(media["moov_end.mp4"], "raw/film.mp4")
        await doomed.until(lambda r: r.get("msg") == "ingest job taken")
        await asyncio.sleep(0.5)  # inside prepare: ffmpeg is "running"
        left = sorted((tmp_path / "work").glob("s3proxy-ingest-*"))
        assert left, "the job's directory"
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        with ingest_process(stage, tmp_path / "b", webhooks, **shared) as other:
            assert not any(path.exists() for path in left), "the dead job's files removed"
            await webhooks.wait(1, seconds=60)
            await asyncio.sleep(4)  # a second publish would come within a lease
    assert [e["type"] for e in webhooks.events] == ["asset.ready"]
    assert [j["outcome"] for j in other.jobs()] == ["ready"]
    assert doomed.jobs() == [], "killed: no outcome line"
    assert stage.keys(stage.media) == ["vod/film/master.mp4"]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("timeout_s", [20, 0.5])
async def test_sigterm_finishes_the_running_job_or_gives_it_back(
    stage: Stage,
    tmp_path: Path,
    media: dict[str, Path],
    webhooks: Webhooks,
    timeout_s: float,
    mode: str,
) -> None:
    slow = slow_tool(tmp_path, "ffmpeg", 2)
    settings = {"lease_s": 300, **MODES[mode]}
    with ingest_process(
        stage, tmp_path / "a", webhooks, path_env=slow, shutdown_timeout_s=timeout_s, **settings
    ) as stopping:
        stage.upload(media["moov_end.mp4"], "raw/film.mp4")
        await stopping.until(lambda r: r.get("msg") == "ingest job taken")
        stopping.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(stopping.process.wait, 30) == 0
        stopping.reader.join(timeout=10)
    (job,) = stopping.jobs()
    if timeout_s > 2:
        assert job["outcome"] == "ready", job
        await webhooks.wait(1)
        return
    assert job["outcome"] == "released" and job["why"] == "stopped before it ended"
    # given back at once: another process takes it long before the 300 s lease ends
    with ingest_process(stage, tmp_path / "b", webhooks, **settings) as other:
        await webhooks.wait(1, seconds=30)
        await other.until(lambda r: r.get("msg") == "ingest job")  # logged after the webhook
    assert [j["outcome"] for j in other.jobs()] == ["ready"], stopping.lines


async def test_two_pollers_without_a_queue_take_each_upload_once(
    stage: Stage, tmp_path: Path, media: dict[str, Path], webhooks: Webhooks
) -> None:
    for index in range(3):
        stage.upload(media["moov_end.mp4"], f"raw/film{index}.mp4")
    stage.upload(media["text.mp4"], "raw/notes.mp4")
    poll = {"queue_url": None, "poll_interval_s": 0.3, "lease_s": 10, "on_refused": "tag"}
    with (
        ingest_process(stage, tmp_path / "a", webhooks, **poll) as first,
        ingest_process(stage, tmp_path / "b", webhooks, **poll) as second,
    ):
        await _wait_jobs((first, second), 4)
        await webhooks.wait(4)
        await asyncio.sleep(2)  # several more passes: nothing is taken again
        jobs = [j for j in _all_jobs(first, second) if j["outcome"] != "released"]
    assert sorted((j["upload"].rsplit("/", 1)[1], j["outcome"]) for j in jobs) == [
        ("film0.mp4", "ready"),
        ("film1.mp4", "ready"),
        ("film2.mp4", "ready"),
        ("notes.mp4", "failed"),
    ]
    assert len(webhooks.events) == 4
    tags = stage.emulator.client().get_object_tagging(Bucket=stage.uploads, Key="raw/notes.mp4")
    assert tags["TagSet"] == [{"Key": "s3proxy-ingest", "Value": "refused"}]
    leases = stage.keys(stage.uploads, ".s3proxy-ingest/leases/")
    assert len(leases) == 4
    for key in leases:
        record = json.loads(
            stage.emulator.client().get_object(Bucket=stage.uploads, Key=key)["Body"].read()
        )
        assert record["state"] == "done"


async def test_a_work_dir_without_room_gives_the_job_back_and_is_not_ready(
    stage: Stage, tmp_path: Path, media: dict[str, Path], webhooks: Webhooks
) -> None:
    with ingest_process(stage, tmp_path, webhooks, min_free_bytes="1000000GiB") as ingest:
        stage.upload(media["moov_end.mp4"], "raw/film.mp4")
        await ingest.until(lambda r: r.get("msg") == "ingest job")
        status, body = ingest.get("/readyz")
    (job,) = ingest.jobs()
    assert job["outcome"] == "released" and "MiB free" in job["why"], job
    assert status == 503 and b"MiB free" in body
    assert webhooks.events == [] and stage.keys(stage.media) == []


@pytest.mark.parametrize(
    ("ingest", "env", "message"),
    [
        ({}, {}, "ingest.source: is required"),
        (
            {"source": "s3://up-x/raw/", "notify_url": "http://127.0.0.1:9/h"},
            {},
            "ingest.notify_secret_env: environment variable S3PROXY_WEBHOOK_SECRET must hold",
        ),
        ({"source": "s3://up-x/raw/", "match": "{a}{b}.{ext}"}, {}, "ingest.match: "),
        ({"source": "s3://up-x/raw/", "publish_as": "{nope}/m.mp4"}, {}, "ingest.publish_as: "),
        ({"source": "s3://up-x/raw/", "refused_prefix": "raw/bad/"}, {}, "ingest.refused_prefix"),
    ],
)
def test_bad_ingest_config_is_one_line_and_exit_2(
    tmp_path: Path, ingest: dict[str, Any], env: dict[str, str], message: str
) -> None:
    config = tmp_path / "ingest.yaml"
    config.write_text(json.dumps({"s3": {"bucket": "media-x"}, "ingest": ingest}))
    environment = {k: v for k, v in os.environ.items() if k != "S3PROXY_WEBHOOK_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "s3proxy", "ingest", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**environment, **env},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_a_new_asset_is_warmed_on_the_pool_before_the_webhook(
    stage: Stage,
    tmp_path: Path,
    media: dict[str, Path],
    webhooks: Webhooks,
    start_proxy: StartProxy,
) -> None:
    node = await start_proxy(s3={"bucket": stage.media, "prefix": "vod/"})
    base = node.admin_url("")
    with ingest_process(stage, tmp_path, webhooks, warm_urls=[base]) as ingest:
        stage.upload(media["moov_end.mp4"], "raw/film.mp4")
        await webhooks.wait(1)
        assert node.metric("s3proxy_cache_bytes", tier="memory") > 0, "warm before the webhook"
        await ingest.until(lambda r: r.get("msg") == "ingest job")
    (job,) = ingest.jobs()
    assert job["outcome"] == "ready" and job["warm"] == {base: "ok"}


async def test_sighup_reloads_the_log_level_and_sigterm_with_nothing_running_exits_0(
    stage: Stage, tmp_path: Path, webhooks: Webhooks
) -> None:
    with ingest_process(stage, tmp_path, webhooks) as ingest:
        ingest.process.send_signal(signal.SIGHUP)
        await ingest.until(lambda r: r.get("msg") == "SIGHUP: reloaded the log level")
        assert ingest.process.poll() is None and ingest.get("/healthz")[0] == 200
        ingest.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(ingest.process.wait, 30) == 0
