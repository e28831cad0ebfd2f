"""The ingest service: take uploads, prepare each once, publish, tell the control plane.

One job per upload, at most `ingest.max_concurrent` at a time, each in its own
lock-held directory under `ingest.work_dir` (a crashed process's directories are removed
at the next start). A job's outcome is `ready` (published), `failed` (refused: the upload
is moved or tagged and never retried), `skipped` (published already, by its ETag or its
content hash; gone; or s3proxy's own output), or `released` (given back: S3 or the disk
failed, the lease was lost, or SIGTERM came first). Every job ends in one JSON log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web

from ..assets import InvalidAssetName, object_key
from ..config import Config, ConfigError, notify_secret, reread
from ..logs import set_level
from ..metrics import IngestMetrics
from ..prepare import (
    SHA_META,
    SOURCE_ETAG_META,
    Options,
    PrepareError,
    Summary,
    Unavailable,
    describe_published,
    prepare,
    published_at,
    s3_reason,
)
from ..workdirs import make_locked_dir, remove_abandoned
from .events import Upload
from .notify import Notifier, warm
from .rules import NameRule
from .sources import Job, PollSource, QueueSource

log = logging.getLogger("s3proxy.ingest")

JOB_PREFIX = "s3proxy-ingest-"
SIDECAR_ROOM = 64 << 20  # a job's room beyond twice the upload (the sidecar, ffmpeg's slack)
RETRY_AFTER_S = 30.0  # a job given back for a failure that is not the upload's
RECEIVE_WAIT_S = 5  # an SQS long poll: also the longest SIGTERM waits for one to end


def event_id(kind: str, upload: Upload) -> str:
    """The same for every delivery of one outcome of one version of one upload."""
    text = f"{kind}\0{upload.bucket}\0{upload.key}\0{upload.etag}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def job_room(size: int, min_free: int) -> int:
    """Bytes a job needs free in the work directory: the download, the remuxed copy and
    the sidecar, plus the margin kept for everything else."""
    return 2 * size + SIDECAR_ROOM + min_free


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


@dataclass(eq=False)  # one per job, kept in a set by identity
class _Running:
    """A job's state as its lease keeper and its body share it."""

    job: Job
    task: asyncio.Task[None] | None = None
    lost: bool = False
    fields: dict[str, Any] = field(default_factory=dict)


class IngestService:
    def __init__(self, config: Config, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        ingest = config.ingest
        if not ingest.source:
            raise ConfigError(config.source, "ingest.source", "is required (s3://bucket/prefix/)")
        self.config = config
        self.ingest = ingest
        self.bucket, self.prefix = ingest.location
        self.rule = NameRule.compile(ingest.match, ingest.publish_as)
        self.metrics = IngestMetrics()
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.work_root = ingest.work_dir or tempfile.gettempdir()
        self.secret = notify_secret(config, env)  # with notify_url, ConfigError without it
        self.warm_token = env.get(ingest.warm_token_env) if ingest.warm_token_env else None
        self.notifier: Notifier  # made with the HTTP session, in run()
        self._running: set[_Running] = set()
        self._reserved = 0
        self._busy: dict[tuple[str, str], asyncio.Event] = {}  # uploads being prepared
        self._freed = asyncio.Event()  # a job ended: a slot (and its room) is free
        self._source_ok_at = 0.0
        self._source_problem = "the work source has not answered yet"

    # -- which uploads -------------------------------------------------------------

    def asset_for(self, upload: Upload) -> str | None:
        if upload.bucket != self.bucket or not upload.key.startswith(self.prefix):
            return None
        return self.rule.asset_for(upload.key[len(self.prefix) :])

    def wanted(self, upload: Upload) -> bool:
        return self.asset_for(upload) is not None

    # -- the loop ------------------------------------------------------------------

    async def run(
        self,
        stop: asyncio.Event,
        on_started: Callable[[tuple[str, int]], Awaitable[None] | None] | None = None,
    ) -> int:
        os.makedirs(self.work_root, exist_ok=True)
        remove_abandoned(self.work_root, JOB_PREFIX)  # a crashed run's half-done files
        session = get_session()
        s3_config = AioConfig(
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=max(10, 4 * self.ingest.max_concurrent),
        )
        async with contextlib.AsyncExitStack() as stack:
            s3 = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    region_name=self.config.s3.region,
                    endpoint_url=self.config.s3.endpoint_url,
                    config=s3_config,
                )
            )
            http = await stack.enter_async_context(aiohttp.ClientSession())
            self.notifier = Notifier(
                http,
                self.ingest.notify_url,
                self.secret,
                self.ingest.notify_attempts,
                self.ingest.notify_backoff_s,
                self.ingest.notify_timeout_s,
            )
            source: QueueSource | PollSource
            if self.ingest.queue_url:
                sqs = await stack.enter_async_context(
                    session.create_client(
                        "sqs",
                        region_name=self.config.s3.region,
                        endpoint_url=self.ingest.queue_endpoint_url,
                    )
                )
                source = QueueSource(sqs, self.ingest.queue_url, self.ingest.lease_s, self.wanted)
            else:
                source = PollSource(
                    s3,
                    self.bucket,
                    self.prefix,
                    self.ingest.lease_prefix,
                    self.ingest.lease_s,
                    self.owner,
                    self.wanted,
                )
            runner = web.AppRunner(self.admin_app(), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, self.ingest.admin_host, self.ingest.admin_port)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(
                    self.config.source,
                    "ingest.admin_port",
                    f"can not listen on {self.ingest.admin_host}:{self.ingest.admin_port}: "
                    f"{exc.strerror}",
                ) from None
            address = runner.addresses[0]
            bound = (str(address[0]), int(address[1]))
            log.info(
                "ingest started",
                extra={
                    "fields": {
                        "source": self.ingest.source,
                        "mode": "queue" if self.ingest.queue_url else "poll",
                        "admin": f"{bound[0]}:{bound[1]}",
                        "max_concurrent": self.ingest.max_concurrent,
                    }
                },
            )
            if on_started is not None:
                result = on_started(bound)
                if result is not None:
                    await result
            looping = asyncio.create_task(self._loop(source, s3, http, stop))
            await _first(stop.wait(), asyncio.shield(looping))
            # from SIGTERM on, both at once: the receive under way ends (its messages are
            # given back) while the running jobs have their shutdown_timeout_s
            await asyncio.gather(looping, self._finish_running())
        log.info("ingest stopped")
        return 0

    async def _loop(
        self, source: QueueSource | PollSource, s3: Any, http: Any, stop: asyncio.Event
    ) -> None:
        polling = isinstance(source, PollSource)
        failures = 0
        measured_at = 0.0
        while not stop.is_set():
            free = self.ingest.max_concurrent - len(self._running)
            if free <= 0:
                self._freed.clear()
                await _first(stop.wait(), self._freed.wait())
                continue
            try:
                # never abandoned half-way: a receive cut off may still be answered, its
                # messages then hidden for a whole lease with nobody working on them
                jobs = await source.take(free, wait_s=RECEIVE_WAIT_S)
                if stop.is_set():  # SIGTERM came during the receive: give them back
                    for job in jobs:
                        await self._release(job, 0.0)
                    break
                if time.monotonic() - measured_at > 15:  # queue depth (a pass counts its own)
                    measured_at = time.monotonic()
                    await source.measure()
            except Exception as exc:
                failures += 1
                self._source_problem = f"the work source failed: {s3_reason(exc)}"
                log.warning(self._source_problem, extra={"fields": {"failures": failures}})
                await _first(stop.wait(), asyncio.sleep(min(30.0, 2.0**failures)))
                continue
            failures = 0
            self._source_ok_at = time.monotonic()
            if source.depth is not None:
                self.metrics.queue_depth.set(source.depth)
            for job in jobs:
                self._start(job, s3, http)
            if polling and not (jobs and source.depth):  # nothing more waiting: next pass
                await _first(stop.wait(), asyncio.sleep(self.ingest.poll_interval_s))

    def _start(self, job: Job, s3: Any, http: Any) -> None:
        running = _Running(job)
        running.task = asyncio.create_task(self._job(running, s3, http))
        self._running.add(running)

    async def _finish_running(self) -> None:
        """SIGTERM: running jobs get ingest.shutdown_timeout_s to finish; the rest are
        given back at once (another process takes them without waiting for the lease)."""
        tasks = [r.task for r in self._running if r.task is not None]
        if not tasks:
            return
        log.info(
            "stopping: waiting for running jobs",
            extra={"fields": {"jobs": len(tasks), "timeout_s": self.ingest.shutdown_timeout_s}},
        )
        _, pending = await asyncio.wait(tasks, timeout=self.ingest.shutdown_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # -- one job -------------------------------------------------------------------

    async def _job(self, running: _Running, s3: Any, http: Any) -> None:
        job = running.job
        started = time.monotonic()
        if job.upload.time:
            self.metrics.queue_lag.observe(max(0.0, time.time() - job.upload.time))
        self.metrics.inflight.inc()
        keeper = asyncio.create_task(self._keep_lease(running))
        outcome = "released"
        fields = running.fields
        fields.update(upload=f"s3://{job.upload.bucket}/{job.upload.key}")
        log.info("ingest job taken", extra={"fields": dict(fields)})
        try:
            async with self._one_at_a_time(job.upload):
                outcome = await self._process(job, s3, http, fields)
        except asyncio.CancelledError:
            fields["why"] = "its lease was lost" if running.lost else "stopped before it ended"
            if not running.lost:
                await asyncio.shield(self._release(job, 0.0))
        except Unavailable as exc:
            fields["why"] = str(exc)
            await self._release(job, RETRY_AFTER_S)
        except Exception as exc:  # a bug, or S3 failing outside prepare: given back
            log.exception("ingest job failed", extra={"fields": {"upload": fields["upload"]}})
            fields["why"] = s3_reason(exc)
            await self._release(job, RETRY_AFTER_S)
        finally:
            keeper.cancel()
            self.metrics.inflight.dec()
            seconds = time.monotonic() - started
            self.metrics.jobs.labels(outcome=outcome).inc()
            self.metrics.job_seconds.observe(seconds)
            self._running.discard(running)
            self._freed.set()
            level = logging.WARNING if outcome == "released" else logging.INFO
            log.log(
                level,
                "ingest job",
                extra={"fields": {"outcome": outcome, "seconds": round(seconds, 3), **fields}},
            )

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, upload: Upload) -> Any:
        """Two events for one upload (queues deliver at least once; a multipart upload may
        be announced twice) run one after the other here, so the second finds the first's
        result and is skipped instead of preparing the same file again."""
        key = (upload.bucket, upload.key)
        while (busy := self._busy.get(key)) is not None:
            await busy.wait()
        self._busy[key] = done = asyncio.Event()
        try:
            yield
        finally:
            del self._busy[key]
            done.set()

    async def _keep_lease(self, running: _Running) -> None:
        while True:
            await asyncio.sleep(self.ingest.lease_s / 3)
            if not await running.job.lease.renew():
                running.lost = True
                if running.task is not None:
                    running.task.cancel()
                return

    async def _release(self, job: Job, delay_s: float) -> None:
        try:
            await job.lease.release(delay_s)
        except Exception as exc:
            log.warning("lease not given back", extra={"fields": {"why": s3_reason(exc)}})

    async def _process(self, job: Job, s3: Any, http: Any, fields: dict[str, Any]) -> str:
        asset = self.asset_for(job.upload)
        assert asset is not None  # sources take only wanted uploads
        fields["asset"] = asset
        try:
            head = await s3.head_object(Bucket=job.upload.bucket, Key=job.upload.key)
        except Exception as exc:
            if s3_reason(exc) in ("404", "NoSuchKey", "NotFound"):
                fields["why"] = "the upload is gone"
                await job.lease.settle("skipped")
                return "skipped"
            raise Unavailable(f"can not read the upload: {s3_reason(exc)}") from None
        upload = replace(
            job.upload, etag=str(head["ETag"]).strip('"'), size=int(head["ContentLength"])
        )
        fields.update(etag=upload.etag, size=upload.size)
        if SHA_META in head.get("Metadata", {}):
            fields["why"] = "s3proxy's own output, not an upload"
            await job.lease.settle("skipped")
            return "skipped"
        summary = Summary(
            asset=asset,
            bucket=self.config.s3.bucket,
            key=object_key(self.config.s3.prefix, asset),
        )
        published = await published_at(s3, summary.bucket, summary.key)
        if published.metadata.get(SOURCE_ETAG_META) == upload.etag:
            describe_published(summary, published)
            fields["why"] = "published already (same ETag)"
            return await self._announce_ready(job, upload, summary, http, fields, "skipped")
        async with self._room(job_room(upload.size, int(self.ingest.min_free_bytes))):
            directory, lock = await asyncio.to_thread(make_locked_dir, self.work_root, JOB_PREFIX)
            try:
                summary = await prepare(
                    f"s3://{upload.bucket}/{upload.key}",
                    asset,
                    self.config,
                    self.ingest.require_dtsh,
                    Options(
                        client=s3,
                        work_dir=directory,
                        source_etag=upload.etag,
                        fit_extension=True,
                        quiet=True,
                        published=published,
                    ),
                )
            except Unavailable:
                raise
            except (PrepareError, InvalidAssetName) as exc:
                return await self._refuse(job, upload, asset, str(exc), s3, fields)
            finally:
                await asyncio.to_thread(shutil.rmtree, directory, True)
                os.close(lock)
        fields["phases_s"] = summary.seconds
        outcome = "skipped" if summary.uploaded == "unchanged" else "ready"
        if outcome == "skipped":
            fields["why"] = "published already (same content hash)"
        return await self._announce_ready(job, upload, summary, http, fields, outcome)

    @contextlib.asynccontextmanager
    async def _room(self, need: int) -> Any:
        """Hold `need` bytes of the work directory while the job runs; wait while other
        jobs hold what is missing; refuse at once what could never fit."""
        while True:
            try:
                free = shutil.disk_usage(self.work_root).free
            except OSError as exc:
                raise Unavailable(f"work_dir {self.work_root}: {exc.strerror}") from None
            if free - self._reserved >= need:
                break
            if self._reserved == 0:
                raise Unavailable(
                    f"work_dir {self.work_root} has {free >> 20} MiB free; "
                    f"this upload needs {need >> 20} MiB (2 x its size + margin)"
                )
            self._freed.clear()
            await self._freed.wait()
        self._reserved += need
        try:
            yield
        finally:
            self._reserved -= need

    async def _announce_ready(
        self,
        job: Job,
        upload: Upload,
        summary: Summary,
        http: Any,
        fields: dict[str, Any],
        outcome: str,
    ) -> str:
        fields.update(asset=summary.asset, published=f"s3://{summary.bucket}/{summary.key}")
        if self.ingest.warm_urls and outcome == "ready":
            warmed = await warm(http, self.ingest.warm_urls, summary.asset, self.warm_token)
            fields["warm"] = warmed
        event = {
            "type": "asset.ready",
            "asset": summary.asset,
            "bucket": summary.bucket,
            "key": summary.key,
            "size": summary.size,
            "duration_s": summary.duration_s,
            "container": summary.container,
            "codecs": summary.codecs,
            "index": summary.index,
            "sidecar": summary.sidecar == "uploaded",
            "repeat": outcome == "skipped",
        }
        if await self._notify(event, upload, fields):
            await job.lease.settle(outcome)
        else:  # published, but not told: taken again later, skipped, told again
            await self._release(job, self.ingest.lease_s)
        return outcome

    async def _refuse(
        self,
        job: Job,
        upload: Upload,
        asset: str,
        reason: str,
        s3: Any,
        fields: dict[str, Any],
    ) -> str:
        """Not media, truncated, damaged: moved aside (or tagged) and never taken again."""
        fields["error"] = reason
        where = await self._set_aside(upload, s3)
        fields["refused_to"] = where
        event = {"type": "asset.failed", "asset": asset, "error": reason, "refused_to": where}
        await self._notify(event, upload, fields)
        await job.lease.settle("failed")
        return "failed"

    async def _set_aside(self, upload: Upload, s3: Any) -> str:
        if self.ingest.on_refused == "move":
            target = self.ingest.refused_prefix + upload.key
            try:
                await s3.copy_object(
                    Bucket=upload.bucket,
                    Key=target,
                    CopySource={"Bucket": upload.bucket, "Key": upload.key},
                    CopySourceIfMatch=f'"{upload.etag}"',
                )
                await s3.delete_object(Bucket=upload.bucket, Key=upload.key)
                return f"s3://{upload.bucket}/{target}"
            except Exception as exc:  # too large for one copy, say: tagged instead
                log.warning(
                    "refused upload not moved, tagged",
                    extra={"fields": {"upload": upload.key, "why": s3_reason(exc)}},
                )
        await s3.put_object_tagging(
            Bucket=upload.bucket,
            Key=upload.key,
            Tagging={"TagSet": [{"Key": "s3proxy-ingest", "Value": "refused"}]},
        )
        return "tag:s3proxy-ingest=refused"

    async def _notify(self, event: dict[str, Any], upload: Upload, fields: dict[str, Any]) -> bool:
        """Send one webhook event; True when delivered (or none is configured)."""
        kind = event["type"]
        ident = event_id(kind, upload)
        body = {
            "id": ident,
            **event,
            "time": _iso(time.time()),
            "upload": {
                "bucket": upload.bucket,
                "key": upload.key,
                "etag": upload.etag,
                "size": upload.size,
            },
        }
        outcome = await self.notifier.send(kind, ident, json.dumps(body).encode())
        fields["webhook"] = outcome
        if outcome != "off":
            self.metrics.webhooks.labels(outcome=outcome).inc()
        return outcome != "failed"

    def reload(self, path: str | None) -> None:
        """SIGHUP (`systemctl reload`): the log level; the rest needs a restart."""
        fresh = reread(path)
        if fresh is not None:
            set_level(fresh.log.level)
            log.info("SIGHUP: reloaded the log level", extra={"fields": {"level": fresh.log.level}})

    # -- admin ---------------------------------------------------------------------

    def readiness(self) -> str | None:
        """None when ready, else why not."""
        fresh_s = max(60.0, 3 * self.ingest.poll_interval_s)
        if time.monotonic() - self._source_ok_at > fresh_s:
            return self._source_problem
        try:
            free = shutil.disk_usage(self.work_root).free
        except OSError as exc:
            return f"work_dir {self.work_root}: {exc.strerror}"
        if free < int(self.ingest.min_free_bytes):
            return f"work_dir {self.work_root} has {free >> 20} MiB free"
        return None

    def admin_app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            why = self.readiness()
            self.metrics.ready.set(0 if why else 1)
            if why:
                return web.json_response({"status": "unready", "why": why}, status=503)
            return web.json_response({"status": "ready", "inflight": len(self._running)})

        async def metrics(_: web.Request) -> web.Response:
            self.metrics.ready.set(0 if self.readiness() else 1)
            return web.Response(
                body=self.metrics.exposition(),
                headers={"Content-Type": IngestMetrics.CONTENT_TYPE},
            )

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app


async def _first(stop: Awaitable[Any], work: Awaitable[Any]) -> Any:
    """`work`'s result, or None when `stop` comes first (work is then cancelled)."""
    stopper = asyncio.ensure_future(stop)
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({stopper, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None
