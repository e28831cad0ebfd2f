"""`s3proxy prepare` with real ffmpeg/ffprobe against the S3 emulator: remux to an
index-first MP4, keep what MP4 can not hold, refuse what is not media, upload safely."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from s3proxy.prepare import (
    MIST_CONFIG_PAGE,
    MIST_CONFIG_PAGE_BYTES,
    mist_config_page,
    top_level_boxes,
)

from .conftest import Emulator, StartProxy, make_token
from .test_media_clients import codecs_of


def prepare(
    emulator: Emulator,
    bucket: str,
    tmp_path: Path,
    source: str,
    asset: str,
    path_env: str | None = None,
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "prepare.yaml"
    config.write_text(
        json.dumps(
            {"s3": {"bucket": bucket, "prefix": "vod/", "endpoint_url": emulator.endpoint_url}}
        )
    )
    env = dict(os.environ)
    if path_env is not None:
        env["PATH"] = path_env
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "s3proxy",
            "prepare",
            source,
            "--asset",
            asset,
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def stored(emulator: Emulator, bucket: str, key: str) -> bytes:
    body: bytes = emulator.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


async def test_moov_at_end_mp4_is_remuxed_index_first_and_plays_through_the_proxy(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path], start_proxy: StartProxy
) -> None:
    assert [b[0] for b in top_level_boxes(media["moov_end.mp4"])][-1] == "moov"
    result = prepare(emulator, bucket, tmp_path, str(media["moov_end.mp4"]), "movies/a.mp4")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["index"] == "start" and summary["container"] == "mp4"
    assert sorted(summary["codecs"]) == ["audio:aac", "video:h264"]
    assert 1.9 < summary["duration_s"] < 2.2
    assert summary["sidecar"] == "skipped" and "MistInMP4 is not on PATH" in result.stderr
    data = stored(emulator, bucket, "vod/movies/a.mp4")
    local = tmp_path / "got.mp4"
    local.write_bytes(data)
    kinds = [b[0] for b in top_level_boxes(local)]
    assert kinds.index("moov") < kinds.index("mdat")
    running = await start_proxy(s3={"prefix": "vod/"})
    url = running.url(f"/t/{make_token('movies/*')}/movies/a.mp4")
    assert await codecs_of(url) == ["aac", "h264"]


def test_rerunning_is_safe_and_uploads_nothing_new(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path]
) -> None:
    first = prepare(emulator, bucket, tmp_path, str(media["moov_end.mp4"]), "a.mp4")
    second = prepare(emulator, bucket, tmp_path, str(media["moov_end.mp4"]), "a.mp4")
    assert first.returncode == second.returncode == 0
    assert json.loads(first.stdout)["uploaded"] == "uploaded"
    assert json.loads(second.stdout)["uploaded"] == "unchanged"


def test_ts_is_remuxed_to_mp4(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path]
) -> None:
    result = prepare(emulator, bucket, tmp_path, str(media["clip.ts"]), "clip.mp4")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["container"], summary["index"]) == ("mp4", "start")
    assert stored(emulator, bucket, "vod/clip.mp4")[4:8] == b"ftyp"


def test_streams_mp4_can_not_hold_are_kept_as_they_are(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path]
) -> None:
    result = prepare(emulator, bucket, tmp_path, str(media["pcm.mkv"]), "pcm.mkv")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["container"] == "matroska"
    assert "kept as matroska" in result.stderr
    assert stored(emulator, bucket, "vod/pcm.mkv") == media["pcm.mkv"].read_bytes()


@pytest.mark.parametrize(
    "name, reason",
    [
        ("text.mp4", "is not a media file ffprobe can read"),
        ("cut.mp4", "is not a media file ffprobe can read"),
        ("cut_fast.mp4", "is truncated or damaged"),
        ("subs.srt", "has no audio or video stream"),
    ],
)
def test_bad_input_is_refused_with_one_line_and_nothing_uploaded(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path], name: str, reason: str
) -> None:
    result = prepare(emulator, bucket, tmp_path, str(media[name]), "bad.mp4")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"s3proxy: prepare: {name} ") and reason in lines[-1]
    assert "Traceback" not in result.stderr
    listing = emulator.client().list_objects_v2(Bucket=bucket)
    assert listing.get("KeyCount", 0) == 0


def test_prepare_from_an_s3_raw_upload(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path]
) -> None:
    emulator.client().put_object(
        Bucket=bucket, Key="raw/upload.mp4", Body=media["moov_end.mp4"].read_bytes()
    )
    result = prepare(emulator, bucket, tmp_path, f"s3://{bucket}/raw/upload.mp4", "ready.mp4")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["index"] == "start"
    assert stored(emulator, bucket, "vod/ready.mp4")[4:8] == b"ftyp"
    missing = prepare(emulator, bucket, tmp_path, f"s3://{bucket}/raw/none.mp4", "x.mp4")
    assert missing.returncode == 2
    assert "can not read s3://" in missing.stderr


def test_sidecar_goes_first_when_a_mist_input_is_installed(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path]
) -> None:
    # No MistServer package exists in the registries this project may use; this stand-in
    # follows MistInMP4's header-only contract (`-H -s NAME FILE` writes FILE.dtsh) so the
    # ordering and upload of the sidecar are exercised.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "MistInMP4"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = -H ] && [ "$2" = -s ] || exit 9\n'
        "printf 'DTSC\\000\\000\\000\\004abcd' > \"$4.dtsh\"\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = prepare(
        emulator,
        bucket,
        tmp_path,
        str(media["moov_end.mp4"]),
        "m.mp4",
        path_env=f"{bin_dir}:{os.environ['PATH']}",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sidecar"] == "uploaded"
    assert stored(emulator, bucket, "vod/m.mp4.dtsh") == b"DTSC\x00\x00\x00\x04abcd"
    puts = [r.path for r in emulator.requests_for(bucket) if r.method == "PUT"]
    assert puts.index(f"/{bucket}/vod/m.mp4.dtsh") < puts.index(f"/{bucket}/vod/m.mp4")


def mist_stand_in(tmp_path: Path, name: str, script: str) -> str:
    """A Mist input stand-in on PATH; returns the PATH to use."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / name
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}:{os.environ['PATH']}"


# As Mist's inputs do: a stream name with a `/` (or other such characters) is refused.
REFUSES_SLASH = (
    '[ "$1" = -H ] && [ "$2" = -s ] || exit 9\n'
    'case "$3" in */*) echo "invalid stream name" >&2; exit 1;; esac\n'
    "printf 'DTSC\\000\\000\\000\\004abcd' > \"$4.dtsh\"\n"
)


def test_a_nested_asset_name_gets_its_sidecar(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path]
) -> None:
    path = mist_stand_in(tmp_path, "MistInMP4", REFUSES_SLASH)
    result = prepare(
        emulator,
        bucket,
        tmp_path,
        str(media["moov_end.mp4"]),
        "movies/abc/master.mp4",
        path_env=path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sidecar"] == "uploaded"
    assert stored(emulator, bucket, "vod/movies/abc/master.mp4.dtsh").startswith(b"DTSC")


# As Mist 3.10's inputs do: without the controller's global configuration page, a
# header-only run first waits about 60 s for it (here: fails at once, to show it).
NEEDS_CONFIG_PAGE = (
    f'[ -s {MIST_CONFIG_PAGE} ] || {{ echo "waited 60 s for the configuration" >&2; exit 4; }}\n'
    "printf 'DTSC\\000\\000\\000\\004abcd' > \"$4.dtsh\"\n"
)


def test_a_mist_input_does_not_wait_for_a_controller(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path]
) -> None:
    if MIST_CONFIG_PAGE.exists():
        if MIST_CONFIG_PAGE.read_bytes() != bytes(MIST_CONFIG_PAGE_BYTES):
            pytest.skip(f"{MIST_CONFIG_PAGE} holds a running MistController's configuration")
        MIST_CONFIG_PAGE.unlink()  # an empty page, as prepare leaves it: start without one
    path = mist_stand_in(tmp_path, "MistInMP4", NEEDS_CONFIG_PAGE)
    result = prepare(
        emulator, bucket, tmp_path, str(media["moov_end.mp4"]), "nowait.mp4", path_env=path
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sidecar"] == "uploaded", result.stderr
    assert MIST_CONFIG_PAGE.stat().st_size == MIST_CONFIG_PAGE_BYTES
    assert mist_config_page(), "an existing page is left as it is"
    assert MIST_CONFIG_PAGE.read_bytes() == bytes(MIST_CONFIG_PAGE_BYTES)


def test_a_failing_mist_input_is_reported_and_can_be_made_fatal(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path]
) -> None:
    path = mist_stand_in(tmp_path, "MistInMP4", 'echo "boom: no codec" >&2\nexit 3\n')
    result = prepare(emulator, bucket, tmp_path, str(media["moov_end.mp4"]), "f.mp4", path_env=path)
    assert result.returncode == 0, result.stderr
    assert "MistInMP4 exited 3: boom: no codec" in result.stderr
    required = subprocess.run(
        [
            sys.executable,
            "-m",
            "s3proxy",
            "prepare",
            str(media["moov_end.mp4"]),
            "--asset",
            "g.mp4",
            "--require-dtsh",
            "--config",
            str(tmp_path / "prepare.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": path},
    )
    assert required.returncode == 2
    assert required.stderr.strip().endswith("MistInMP4 exited 3: boom: no codec")
    keys = [r.path for r in emulator.requests_for(bucket) if r.method == "PUT"]
    assert f"/{bucket}/vod/g.mp4" not in keys, "nothing uploaded"


def test_matroska_sidecars_use_mist_in_ebml() -> None:
    from s3proxy.prepare import _MIST_INPUTS

    assert _MIST_INPUTS["matroska"][0] == "MistInEBML"


def test_an_extension_that_does_not_match_the_container_is_refused(
    emulator: Emulator, bucket: str, tmp_path: Path, media: dict[str, Path]
) -> None:
    result = prepare(emulator, bucket, tmp_path, str(media["clip.ts"]), "x.ts")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "s3proxy: prepare: x.ts: the prepared file is MP4, which Mist reads only under "
        ".mp4, .m4v, .mov: publish it as x.mp4"
    )
    assert not [
        r
        for r in emulator.requests_for(bucket)
        if r.method == "PUT" and r.path.startswith(f"/{bucket}/vod/")
    ]
    picked = prepare(emulator, bucket, tmp_path, str(media["clip.ts"]), "shows/y")
    assert picked.returncode == 0, picked.stderr
    assert json.loads(picked.stdout)["key"] == "vod/shows/y.mp4"


async def test_a_multipart_upload_sends_parts_side_by_side_and_aborts_on_a_failure(
    emulator: Emulator, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiobotocore.session import get_session

    from s3proxy import prepare as module

    monkeypatch.setattr(module, "PART_SIZE", 5 << 20)  # S3's smallest part
    path = tmp_path / "big.bin"
    data = os.urandom((11 << 20) + 12345)  # three parts, the last one short
    path.write_bytes(data)
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=emulator.endpoint_url
    ) as client:
        await module._upload(client, bucket, "big.bin", path, "application/octet-stream", "x")
        assert stored(emulator, bucket, "big.bin") == data
        real = client.upload_part

        async def failing(**kwargs: object) -> object:
            if kwargs["PartNumber"] == 2:
                raise OSError("the link went down")
            return await real(**kwargs)

        monkeypatch.setattr(client, "upload_part", failing)
        with pytest.raises(OSError, match="the link went down"):
            await module._upload(client, bucket, "half.bin", path, "application/octet-stream", "x")
    s3 = emulator.client()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="half.bin")
