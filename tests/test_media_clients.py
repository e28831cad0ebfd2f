"""Real media clients (Debian's ffprobe and ffmpeg) read the bundled sample through the
proxy with range requests, as Mist does."""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path

import pytest

from .conftest import Emulator, RunningProxy, StartProxy, make_token, put_object, require_tool

SAMPLE = resources.files("s3proxy").joinpath("data", "sample.mp4").read_bytes()


@pytest.fixture
async def sample(emulator: Emulator, bucket: str, start_proxy: StartProxy) -> RunningProxy:
    put_object(emulator, bucket, "movies/sample.mp4", SAMPLE, content_type="video/mp4")
    return await start_proxy()


async def run(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def codecs_of(url: str) -> list[str]:
    """The sorted codec names ffprobe reads from a URL (it must read it without error)."""
    code, out, err = await run(
        require_tool("ffprobe"), "-v", "error", "-print_format", "json", "-show_streams", url
    )
    assert code == 0, err
    return sorted(s["codec_name"] for s in json.loads(out)["streams"])


def test_bundled_sample_is_small_faststart_mp4() -> None:
    assert len(SAMPLE) <= 2 << 20
    assert SAMPLE[4:8] == b"ftyp"
    ftyp_size = int.from_bytes(SAMPLE[0:4], "big")
    assert SAMPLE[ftyp_size + 4 : ftyp_size + 8] == b"moov", "the index comes first"


async def test_ffprobe_reads_the_sample_through_the_proxy(sample: RunningProxy) -> None:
    ffprobe = require_tool("ffprobe")
    token = make_token("movies/*")
    code, out, err = await run(
        ffprobe,
        "-v",
        "error",
        "-print_format",
        "json",
        "-show_format",
        "-show_streams",
        sample.url(f"/vod/movies/sample.mp4?token={token}"),
    )
    assert code == 0, err
    info = json.loads(out)
    codecs = sorted(s["codec_name"] for s in info["streams"])
    assert codecs == ["aac", "h264"]
    assert int(info["format"]["size"]) == len(SAMPLE)
    assert 9.5 < float(info["format"]["duration"]) < 10.5
    assert sample.metric("s3proxy_requests_total", method="GET", status="206") >= 1


async def test_ffmpeg_reads_the_whole_stream_with_a_query_token(
    sample: RunningProxy, tmp_path: Path
) -> None:
    ffmpeg = require_tool("ffmpeg")
    token = make_token("movies/sample.mp4")
    copy_to_md5 = ("-map", "0", "-c", "copy", "-f", "md5", "-")
    code, through_proxy, err = await run(
        ffmpeg,
        "-v",
        "error",
        "-xerror",
        "-i",
        sample.url(f"/vod/movies/sample.mp4?token={token}"),
        *copy_to_md5,
    )
    assert code == 0, err
    local = tmp_path / "sample.mp4"
    local.write_bytes(SAMPLE)
    code, direct, err = await run(ffmpeg, "-v", "error", "-i", str(local), *copy_to_md5)
    assert code == 0, err
    # Every packet copied through the proxy equals the one copied from the file itself.
    assert direct.startswith("MD5=") and through_proxy == direct
    assert sample.metric("s3proxy_response_bytes_total") >= len(SAMPLE)


async def test_ffmpeg_seeks_with_ranges_through_a_path_token(sample: RunningProxy) -> None:
    ffmpeg = require_tool("ffmpeg")
    token = make_token("movies/*")
    code, _, err = await run(
        ffmpeg,
        "-v",
        "error",
        "-ss",
        "6",
        "-i",
        sample.url(f"/t/{token}/movies/sample.mp4"),
        "-t",
        "2",
        "-c",
        "copy",
        "-f",
        "null",
        "-",
    )
    assert code == 0, err
    assert sample.metric("s3proxy_requests_total", method="GET", status="206") >= 2
