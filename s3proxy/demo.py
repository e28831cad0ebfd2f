"""`s3proxy demo`: the proxy in front of an embedded S3 emulator holding a sample video.

No AWS account and no network: moto's ThreadedMotoServer runs on 127.0.0.1, the bundled
sample is uploaded to it, and the real proxy serves it with a freshly minted token.

The sample (data/sample.mp4, 10 s, H.264 + AAC, moov first) was made with:
  ffmpeg -f lavfi -i testsrc2=size=640x360:rate=25:duration=10 \
         -f lavfi -i sine=frequency=440:sample_rate=44100:duration=10 \
         -c:v libx264 -crf 28 -pix_fmt yuv420p -g 50 -c:a aac -b:a 64k \
         -movflags +faststart -map_metadata -1 -fflags +bitexact sample.mp4
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import shlex
import socket
import sys
from importlib import resources

from aiobotocore.session import get_session

from .auth import mint_token
from .config import Config, config_from_dict
from .logs import configure_logging
from .server import Listening, run

BUCKET = "s3proxy-demo"
ASSET = "sample.mp4"
SECRET_ENV = "S3PROXY_DEMO_JWT_SECRET"


def _sample_bytes() -> bytes:
    return resources.files("s3proxy").joinpath("data", "sample.mp4").read_bytes()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def demo_config(endpoint_url: str, host: str, port: int, admin_port: int = 0) -> Config:
    return config_from_dict(
        {
            "server": {"host": host, "port": port, "shutdown_timeout_s": 5},
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "s3": {"bucket": BUCKET, "endpoint_url": endpoint_url, "max_attempts": 2},
            "auth": {"algorithms": ["HS256"], "keys": [{"kid": "demo", "secret_env": SECRET_ENV}]},
            "cache": {"preallocate": False},  # one small sample: 512 MiB held for nothing
            "log": {"level": "info", "format": "text"},
        },
        source="<demo>",
    )


async def _upload_sample(config: Config) -> int:
    data = _sample_bytes()
    session = get_session()
    async with session.create_client(
        "s3", region_name=config.s3.region, endpoint_url=config.s3.endpoint_url
    ) as client:
        await client.create_bucket(Bucket=BUCKET)
        await client.put_object(Bucket=BUCKET, Key=ASSET, Body=data, ContentType="video/mp4")
    return len(data)


def _announce(config: Config, size: int, ttl_s: int, listening: Listening) -> None:
    host, port = listening.main
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    token = mint_token(config.auth, config.source, [ASSET], ttl_s)
    base = f"http://{shown_host}:{port}"
    url = f"{base}/t/{token}/{ASSET}"
    admin = f"http://{listening.admin[0]}:{listening.admin[1]}"
    print(
        f"s3proxy demo: serving {ASSET} ({size} bytes, H.264 + AAC) from an embedded "
        f"S3 emulator ({config.s3.endpoint_url}, bucket {BUCKET})\n"
        f"\n"
        f"  URL ({ttl_s // 60} min token): {url}\n"
        f"  query form:          {base}/vod/{ASSET}?token={token}\n"
        f"\n"
        f"  curl -s -r 0-1023 -o /dev/null -w '%{{http_code}} %{{size_download}}\\n' "
        f"{shlex.quote(url)}\n"
        f"  ffprobe -hide_banner {shlex.quote(url)}\n"
        f"  curl -s {admin}/metrics | grep ^s3proxy_\n"
        f"\n"
        f"Press Ctrl-C to stop.",
        flush=True,
    )


def run_demo(
    host: str = "127.0.0.1", port: int = 8080, ttl_s: int = 3600, admin_port: int = 9101
) -> int:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("s3proxy demo needs the S3 emulator: pip install 's3proxy[demo]'", file=sys.stderr)
        return 2
    if port and not _port_free(host, port):
        print(f"s3proxy demo: port {port} is taken, using a free one", file=sys.stderr)
        port = 0
    if admin_port and not _port_free("127.0.0.1", admin_port):
        print(f"s3proxy demo: admin port {admin_port} is taken, using a free one", file=sys.stderr)
        admin_port = 0
    # The emulator accepts any credentials; never send the operator's real ones to it.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "demo-placeholder",
            "AWS_SECRET_ACCESS_KEY": "demo-placeholder",
            "AWS_EC2_METADATA_DISABLED": "true",
            SECRET_ENV: secrets.token_urlsafe(32),
        }
    )
    configure_logging("info", "text")  # one access line per request, tokens redacted
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the emulator's access log
    logging.getLogger("aiobotocore").setLevel(logging.WARNING)
    emulator = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    emulator.start()
    try:
        emulator_host, emulator_port = emulator.get_host_and_port()
        config = demo_config(f"http://{emulator_host}:{emulator_port}", host, port, admin_port)

        async def main() -> int:
            size = await _upload_sample(config)
            return await run(config, on_started=lambda where: _announce(config, size, ttl_s, where))

        code = asyncio.run(main())
    finally:
        emulator.stop()
    print("s3proxy demo: stopped", flush=True)
    return code
