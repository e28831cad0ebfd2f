"""`s3proxy prepare SOURCE --asset NAME`: the ingest stage.

Probe the input with ffprobe, refuse what is not playable media, remux it without
re-encoding to an MP4 with the index first (or keep TS/MKV streams that MP4 can not
hold, as they are), make Mist's `.dtsh` header when a Mist input binary is installed,
and upload: the sidecar first, the asset last, so the asset's presence means "ready".
Uploads are single PUTs or multipart uploads, both of which appear at once when
complete: a failure never leaves half an asset at the ready key.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from . import mp4
from .assets import InvalidAssetName, object_key, validate_asset_name
from .config import Config

MIST_LIMIT = 2 << 30  # Mist's Content-Length parsing overflows at 2 GiB
PART_SIZE = 16 << 20
PARTS_IN_FLIGHT = 4  # a multipart upload's parts sent at once (4 x 16 MiB in memory)
SHA_META = "s3proxy-sha256"  # of the published bytes
SOURCE_SHA_META = "s3proxy-source-sha256"  # of the upload they were prepared from
SOURCE_ETAG_META = "s3proxy-source-etag"  # the upload's ETag (ingest: skip without a download)
SUMMARY_META = "s3proxy-summary"  # what a later skip reports: container, duration, codecs
_SUMMARY_FIELDS = ("container", "duration_s", "codecs", "index", "sidecar")
# Mist's input per container, newest name first (3.10's Matroska input is MistInEBML)
_MIST_INPUTS = {
    "mp4": ("MistInMP4",),
    "mpegts": ("MistInTS",),
    "matroska": ("MistInEBML", "MistInMKV"),
}
# Mist picks its input by the source's extension: a published name must carry one of these
EXTENSIONS = {"mp4": (".mp4", ".m4v", ".mov"), "mpegts": (".ts",), "matroska": (".mkv", ".webm")}
# Before it writes a header, a Mist input reads six settings from the controller's global
# configuration page, and each look-up retries for about 10 s while the page does not
# exist (Mist 3.10: lib/comms.cpp sessionConfigCache, lib/shared_memory.cpp): about 60 s
# per file without a MistController. An empty page (4 KiB, the controller's size, "not
# ready") ends each look-up at once with Mist's defaults, and a controller started later
# fills it in (src/controller/controller_storage.cpp writeConfig).
MIST_CONFIG_PAGE = Path("/dev/shm/MstGlobalConfig")
MIST_CONFIG_PAGE_BYTES = 4096
# A guard, not an expected wait: an input that gives no header in this time is reported.
MIST_TIMEOUT_S = 120


class PrepareError(Exception):
    """A refusal: the one line an operator sees (exit 2)."""


class Unavailable(PrepareError):
    """Not the upload's fault (S3 unreachable, a tool missing): worth another try later."""


@dataclass(frozen=True)
class Options:
    """What the ingest service adds to a prepare run."""

    client: Any = None  # an open aiobotocore S3 client (else one is made for the run)
    work_dir: str | None = None  # where the temporary files go (else the system's)
    source_etag: str | None = None  # download exactly this version of an s3:// source
    fit_extension: bool = False  # publish under the container's extension, not refuse
    quiet: bool = False  # no progress or notes on stderr (they stay in the summary)
    published: Published | None = None  # what the caller found at the asset's key already


@dataclass
class Summary:
    asset: str
    bucket: str
    key: str
    size: int = 0
    duration_s: float | None = None
    container: str = ""
    codecs: list[str] = field(default_factory=list)
    index: str = "n/a"  # where an MP4's moov sits: start | end
    sidecar: str = "skipped"  # uploaded | skipped (why in notes)
    uploaded: str = ""  # uploaded | unchanged
    source_sha256: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # by phase
    notes: list[str] = field(default_factory=list)

    def timed(self, phase: str, since: float) -> float:
        """Record a phase that began at `since` (monotonic); the next one begins now."""
        now = time.monotonic()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - since, 3)
        return now


_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("quiet", default=False)


def _say(message: str) -> None:
    if _QUIET.get():
        return
    print(f"prepare: {message}", file=sys.stderr, flush=True)


def _progress(label: str, done: float, total: float) -> None:
    if total > 0 and not _QUIET.get() and sys.stderr.isatty():
        print(
            f"\rprepare: {label} {min(100.0, 100 * done / total):5.1f}%",
            end="",
            file=sys.stderr,
            flush=True,
        )
        if done >= total:
            print(file=sys.stderr, flush=True)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Unavailable(f"{name} is not installed (Debian: apt-get install ffmpeg)")
    return path


def probe(path: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            _tool("ffprobe"),
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_format",
            "-show_streams",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unreadable"])[-1]
        raise PrepareError(
            f"{path.name} is not a media file ffprobe can read: {_scrub(reason, path)}"
        )
    info: dict[str, Any] = json.loads(result.stdout or "{}")
    kinds = {s.get("codec_type") for s in info.get("streams", [])}
    if not kinds & {"audio", "video"}:
        raise PrepareError(f"{path.name} has no audio or video stream")
    return info


def _scrub(line: str, path: Path) -> str:
    """A tool's message without the temporary file's path (the refusal names the upload)."""
    return line.replace(f"{path}: ", "").replace(str(path), path.name)


def top_level_boxes(path: Path) -> list[tuple[str, int, int]]:
    """(type, offset, size) of an MP4's top-level boxes."""
    boxes = []
    size = path.stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset + 8 <= size:
            handle.seek(offset)
            box = mp4.box_at(handle.read(mp4.HEADER_BYTES), offset, size, known_only=False)
            if box is None:
                break
            boxes.append((box.kind, box.offset, box.size))
            offset = box.end
    return boxes


def _ffmpeg(args: list[str], duration: float | None) -> subprocess.CompletedProcess[str]:
    """Run ffmpeg with `-progress`, showing it on a terminal."""
    command = [
        _tool("ffmpeg"),
        "-hide_banner",
        "-nostdin",
        "-v",
        "error",
        "-y",
        "-progress",
        "pipe:1",
        *args,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    for line in process.stdout:
        if line.startswith("out_time_us=") and duration:
            with contextlib.suppress(ValueError):  # a partial line: the next one will do
                _progress("remux", int(line.split("=", 1)[1]) / 1e6, duration)
    stderr = process.stderr.read()
    process.wait()
    return subprocess.CompletedProcess(command, process.returncode, "", stderr)


def remux(source: Path, work: Path, info: dict[str, Any], summary: Summary) -> Path:
    """An MP4 with the index first, or the input itself when MP4 can not hold it."""
    duration = float(info.get("format", {}).get("duration") or 0) or None
    target = work / "prepared.mp4"
    result = _ffmpeg(
        [
            "-xerror",
            "-i",
            str(source),
            "-map",
            "0",
            "-c",
            "copy",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
            str(target),
        ],
        duration,
    )
    if result.returncode == 0:
        summary.container = "mp4"
        return target
    lines = result.stderr.strip().splitlines() or ["ffmpeg failed"]
    unsupported = [
        line
        for line in lines
        if "Could not find tag" in line or "not currently supported in container" in line
    ]
    reason = unsupported[0] if unsupported else lines[-1]
    if unsupported:
        container = info.get("format", {}).get("format_name", "")
        if "mpegts" in container or "matroska" in container:
            summary.container = "mpegts" if "mpegts" in container else "matroska"
            summary.notes.append(
                f"kept as {summary.container}: its streams can not go into MP4 ({reason})"
            )
            _say(summary.notes[-1])
            return source
    raise PrepareError(
        f"{source.name} could not be remuxed (truncated or damaged?): {_scrub(reason, source)}"
    )


def verify_complete(path: Path, info: dict[str, Any]) -> None:
    """Read every packet once: a truncated file fails here, before anything is uploaded."""
    duration = float(info.get("format", {}).get("duration") or 0) or None
    result = _ffmpeg(
        ["-xerror", "-i", str(path), "-map", "0", "-c", "copy", "-f", "null", "-"], duration
    )
    damaged = [
        line
        for line in result.stderr.splitlines()
        if "partial file" in line or "Invalid data" in line or "corrupt" in line
    ]
    if result.returncode != 0 or damaged:
        reason = (damaged or result.stderr.strip().splitlines() or ["read error"])[-1]
        raise PrepareError(f"{path.name} is truncated or damaged: {_scrub(reason, path)}")


def stream_name(asset: str) -> str:
    """A name Mist accepts for `-s` (letters, digits, `_`, `-`, `.`; no `/`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", asset)[:100] or "asset"


def make_sidecar(
    path: Path, container: str, asset: str, summary: Summary, required: bool = False
) -> Path | None:
    """Mist's `.dtsh` header for the prepared file, if a Mist input is installed. A
    failure is reported with the input's exit status and last stderr line; with
    `required` it stops the run (nothing is uploaded)."""
    names = _MIST_INPUTS.get(container, ())
    found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    binary = Path(found).name if found else (names[0] if names else "a Mist input")
    if found is None:
        return _no_sidecar(summary, f"{binary} is not on PATH", required)
    mist_config_page()
    try:
        result = subprocess.run(
            [found, "-H", "-s", stream_name(asset), str(path)],
            capture_output=True,
            text=True,
            timeout=MIST_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return _no_sidecar(summary, f"{binary} gave no header within {MIST_TIMEOUT_S} s", required)
    sidecar = Path(str(path) + ".dtsh")
    if result.returncode != 0 or not sidecar.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
        why = (
            f"{binary} exited {result.returncode}: {last}"
            if result.returncode
            else (f"{binary} wrote no header: {last}")
        )
        return _no_sidecar(summary, why, required)
    return sidecar


def mist_config_page(page: Path = MIST_CONFIG_PAGE) -> bool:
    """Make sure Mist's global configuration page exists, so an input run without a
    controller does not wait for it: an empty one is made when there is none (a running
    controller's own page is left as it is). False when none could be made (no
    `/dev/shm`, say): the input then waits, within MIST_TIMEOUT_S."""
    try:
        handle = os.open(page, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    except FileExistsError:
        return True
    except OSError:
        return False
    try:
        os.ftruncate(handle, MIST_CONFIG_PAGE_BYTES)
    finally:
        os.close(handle)
    return True


def _no_sidecar(summary: Summary, why: str, required: bool) -> Path | None:
    if required:
        raise PrepareError(f"no .dtsh header (--require-dtsh): {why}")
    summary.notes.append(f"no .dtsh: {why}")
    _say(f"skipped the .dtsh header: {why}")
    return None


def published_name(asset: str, container: str, fit_extension: bool = False) -> str:
    """The asset name to publish under: one without an extension gets its container's;
    one whose extension Mist would take for another container is refused, or with
    `fit_extension` given the container's (`x/master.mp4` kept as TS: `x/master.ts`)."""
    allowed = EXTENSIONS.get(container)
    if allowed is None:
        return asset
    suffix = Path(asset).suffix.lower()
    if not suffix:
        return asset + allowed[0]
    if suffix not in allowed:
        right = str(Path(asset).with_suffix(allowed[0]))
        if fit_extension:
            return right
        shown = {"mp4": "MP4", "mpegts": "MPEG-TS", "matroska": "Matroska"}[container]
        raise PrepareError(
            f"{asset}: the prepared file is {shown}, which Mist reads only under "
            f"{', '.join(allowed)}: publish it as {right}"
        )
    return asset


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def _download(client: Any, bucket: str, key: str, target: Path, etag: str | None) -> None:
    where = f"s3://{bucket}/{key}"
    try:
        version = {"IfMatch": f'"{etag}"'} if etag else {}
        response = await client.get_object(Bucket=bucket, Key=key, **version)
        total = int(response.get("ContentLength") or 0)
        done = 0
        async with response["Body"] as body:
            with open(target, "wb") as handle:
                while chunk := await body.read(1 << 20):
                    handle.write(chunk)
                    done += len(chunk)
                    _progress("download", done, total)
    except OSError as exc:  # the work directory, not the upload
        raise Unavailable(f"can not write {target.parent}: {exc.strerror}") from None
    except Exception as exc:
        reason = s3_reason(exc)
        if reason in ("NoSuchKey", "404"):
            raise PrepareError(f"can not read {where}: {reason}") from None
        raise Unavailable(f"can not read {where}: {reason}") from None
    if total and done != total:
        raise Unavailable(f"can not read {where}: {done} of {total} bytes arrived")


def s3_reason(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", type(exc).__name__))
    return type(exc).__name__


async def _upload(
    client: Any,
    bucket: str,
    key: str,
    path: Path,
    content_type: str,
    sha: str,
    extra: dict[str, str] | None = None,
) -> None:
    size = path.stat().st_size
    metadata = {SHA_META: sha, **(extra or {})}
    if size <= PART_SIZE:
        await client.put_object(
            Bucket=bucket,
            Key=key,
            Body=path.read_bytes(),
            ContentType=content_type,
            Metadata=metadata,
        )
        return
    upload = await client.create_multipart_upload(
        Bucket=bucket, Key=key, ContentType=content_type, Metadata=metadata
    )
    upload_id = upload["UploadId"]
    count = -(-size // PART_SIZE)
    sent = 0
    slots = asyncio.Semaphore(PARTS_IN_FLIGHT)

    async def send(number: int) -> dict[str, Any]:
        nonlocal sent
        async with slots:
            chunk = await asyncio.to_thread(_read_part, path, number)
            part = await client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
            )
        sent += len(chunk)
        _progress("upload", sent, size)
        return {"ETag": part["ETag"], "PartNumber": number}

    try:
        async with asyncio.TaskGroup() as group:  # one failing part cancels the others
            tasks = [group.create_task(send(number)) for number in range(1, count + 1)]
        parts = [task.result() for task in tasks]
        await client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException as exc:
        await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        if isinstance(exc, BaseExceptionGroup):  # from the task group: its first cause
            raise exc.exceptions[0] from None
        raise


def _read_part(path: Path, number: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek((number - 1) * PART_SIZE)
        return handle.read(PART_SIZE)


@dataclass(frozen=True)
class Published:
    """What is published at a key: its size and s3proxy metadata (empty: nothing is)."""

    size: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


async def published_at(client: Any, bucket: str, key: str) -> Published:
    try:
        head = await client.head_object(Bucket=bucket, Key=key)
    except Exception:
        return Published()
    metadata = head.get("Metadata", {})
    ours = {k: v for k, v in metadata.items() if k.startswith("s3proxy-") and isinstance(v, str)}
    return Published(int(head.get("ContentLength") or 0), ours)


async def prepare(
    source: str,
    asset: str,
    config: Config,
    require_dtsh: bool = False,
    options: Options | None = None,
) -> Summary:
    options = options or Options()
    validate_asset_name(asset)
    quiet = _QUIET.set(options.quiet)
    try:
        if options.client is not None:
            return await _prepare(options.client, source, asset, config, require_dtsh, options)
        session = get_session()
        async with session.create_client(
            "s3", region_name=config.s3.region, endpoint_url=config.s3.endpoint_url
        ) as client:
            return await _prepare(client, source, asset, config, require_dtsh, options)
    finally:
        _QUIET.reset(quiet)


async def _prepare(
    client: Any, source: str, asset: str, config: Config, require_dtsh: bool, options: Options
) -> Summary:
    bucket = config.s3.bucket
    summary = Summary(asset=asset, bucket=bucket, key=object_key(config.s3.prefix, asset))
    with tempfile.TemporaryDirectory(prefix="s3proxy-prepare-", dir=options.work_dir) as tmp:
        work = Path(tmp)
        extra: dict[str, str] = {}
        began = time.monotonic()
        if source.startswith("s3://"):
            src_bucket, _, src_key = source[5:].partition("/")
            if not src_bucket or not src_key:
                raise PrepareError(f"{source}: expected s3://bucket/key")
            local = work / (Path(src_key).name or "source")  # messages name the upload
            await _download(client, src_bucket, src_key, local, options.source_etag)
            began = summary.timed("download", began)
            if options.source_etag:
                extra[SOURCE_ETAG_META] = options.source_etag
        else:
            local = Path(source)
            if not local.is_file():
                raise PrepareError(f"{source}: no such file")
        summary.source_sha256 = extra[SOURCE_SHA_META] = await asyncio.to_thread(_sha256, local)
        began = summary.timed("hash", began)
        if await _unchanged(client, summary, config, extra, options.published):
            return summary
        info = await asyncio.to_thread(probe, local)
        await asyncio.to_thread(verify_complete, local, info)
        began = summary.timed("check", began)
        prepared = await asyncio.to_thread(remux, local, work, info, summary)
        began = summary.timed("remux", began)
        asset = published_name(asset, summary.container, options.fit_extension)  # before upload
        if asset != summary.asset:
            summary.asset, summary.key = asset, object_key(config.s3.prefix, asset)
            if await _unchanged(client, summary, config, extra):
                return summary
        key = summary.key
        final_info = await asyncio.to_thread(probe, prepared)
        _describe(summary, final_info, prepared)
        sidecar = await asyncio.to_thread(
            make_sidecar, prepared, summary.container, asset, summary, require_dtsh
        )
        began = summary.timed("sidecar", began)
        sha = await asyncio.to_thread(_sha256, prepared)
        began = summary.timed("hash", began)
        content_type = {
            "mp4": "video/mp4",
            "mpegts": "video/mp2t",
            "matroska": "video/x-matroska",
        }.get(summary.container, "application/octet-stream")
        try:
            if sidecar is not None:  # first: the asset's presence means "ready"
                await _upload(
                    client,
                    bucket,
                    key + ".dtsh",
                    sidecar,
                    "application/octet-stream",
                    await asyncio.to_thread(_sha256, sidecar),
                )
                summary.sidecar = "uploaded"
            published = (await published_at(client, bucket, key)).metadata
            if published.get(SHA_META) == sha and all(
                published.get(k) == v for k, v in extra.items()
            ):
                summary.uploaded = "unchanged"
            else:
                described = {name: getattr(summary, name) for name in _SUMMARY_FIELDS}
                extra[SUMMARY_META] = json.dumps(described, separators=(",", ":"))
                await _upload(client, bucket, key, prepared, content_type, sha, extra)
                summary.uploaded = "uploaded"
            summary.timed("upload", began)
        except PrepareError:
            raise
        except Exception as exc:
            raise Unavailable(f"upload to s3://{bucket}/{key} failed: {s3_reason(exc)}") from None
    return summary


async def _unchanged(
    client: Any,
    summary: Summary,
    config: Config,
    extra: dict[str, str],
    published: Published | None = None,
) -> bool:
    """Is this upload (by its content hash) what is published already? Then the summary
    is filled from the published object and nothing is done again. `published`: the key
    looked up already (else it is looked up here)."""
    if published is None:
        published = await published_at(client, config.s3.bucket, summary.key)
    if published.metadata.get(SOURCE_SHA_META) != extra[SOURCE_SHA_META]:
        return False
    summary.uploaded = "unchanged"
    summary.notes.append("this upload is published already (same content hash)")
    describe_published(summary, published)
    return True


def describe_published(summary: Summary, published: Published) -> None:
    """Fill a summary from what is published at its key."""
    try:
        described = json.loads(published.metadata.get(SUMMARY_META, "{}"))
    except ValueError:
        described = {}
    for name in _SUMMARY_FIELDS:
        if isinstance(described, dict) and name in described:
            setattr(summary, name, described[name])
    summary.size = published.size


def _describe(summary: Summary, info: dict[str, Any], prepared: Path) -> None:
    streams = info.get("streams", [])
    summary.codecs = [f"{s.get('codec_type')}:{s.get('codec_name')}" for s in streams]
    duration = info.get("format", {}).get("duration")
    summary.duration_s = round(float(duration), 3) if duration else None
    summary.size = prepared.stat().st_size
    if summary.container == "mp4":
        kinds = [kind for kind, _, _ in top_level_boxes(prepared)]
        if "moov" in kinds and "mdat" in kinds:
            summary.index = "start" if kinds.index("moov") < kinds.index("mdat") else "end"
    if summary.size >= MIST_LIMIT:
        summary.notes.append("2 GiB or more: MistServer can not play files this large")
        _say("warning: " + summary.notes[-1])


def run_prepare(source: str, asset: str, config: Config, require_dtsh: bool = False) -> int:
    try:
        summary = asyncio.run(prepare(source, asset, config, require_dtsh))
    except (PrepareError, InvalidAssetName) as exc:
        print(f"s3proxy: prepare: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.__dict__, indent=2))
    return 0
