"""The `s3proxy` command: serve, demo, token, check-config, prepare, ingest, warm."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from . import __version__
from .auth import load_verification_keys, mint_token
from .config import Config, ConfigError, admin_secret, config_as_dict, load_config
from .errors import StartupError
from .logs import configure_logging

if TYPE_CHECKING:
    from .ingest.service import IngestService

EXIT_USAGE = 2

_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90', '90s', '15m', '1h', '7d' -> seconds."""
    match = _DURATION_RE.match(text)
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 90s, 15m, 1h or 7d, got {text!r}"
        )
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _fail(message: str) -> int:
    print(f"s3proxy: {message}", file=sys.stderr)
    return EXIT_USAGE


def _config_path(path: str | None) -> str | None:
    return path or os.environ.get("S3PROXY_CONFIG")


def _load(path: str | None, require_bucket: bool = True) -> Config:
    return load_config(_config_path(path), require_bucket=require_bucket)


def cmd_serve(args: argparse.Namespace) -> int:
    path = _config_path(args.config)  # kept: SIGHUP re-reads it
    config = load_config(path)
    if config.auth.mode == "jwt":
        load_verification_keys(config.auth, config.source)  # fail here, once, not per worker
    admin_secret(config)
    if config.server.workers > 1:
        return _supervise(config, path)
    from .server import run

    configure_logging(config.log.level, config.log.format)
    return asyncio.run(run(config, config_path=path))


def _supervise(config: Config, path: str | None) -> int:
    import shutil
    import tempfile

    # Must be set before prometheus_client is first imported (by the workers).
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="s3proxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    try:
        from .server import supervise

        return supervise(config, path)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(host=args.host, port=args.port, ttl_s=args.ttl, admin_port=args.admin_port)


def cmd_token(args: argparse.Namespace) -> int:
    config = _load(args.config, require_bucket=False)  # signing needs no bucket
    private_key = None
    if args.private_key:
        try:
            private_key = Path(args.private_key).read_bytes()
        except OSError as exc:
            return _fail(f"--private-key: can not read {args.private_key}: {exc.strerror}")
    extra = {k: v for k, v in (("sub", args.sub), ("jti", args.jti)) if v}
    try:
        token = mint_token(
            config.auth,
            config.source,
            args.asset,
            args.ttl,
            kid=args.kid,
            private_key_pem=private_key,
            algorithm=args.algorithm,
            extra_claims=extra,
        )
    except (ValueError, TypeError) as exc:
        return _fail(
            f"can not sign: {type(exc).__name__}: the key does not suit "
            f"{args.algorithm or config.auth.algorithms[0]}"
        )
    print(token)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import run_prepare

    return run_prepare(args.source, args.asset, _load(args.config), args.require_dtsh)


def cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest.service import IngestService

    path = _config_path(args.config)  # kept: SIGHUP re-reads its log level
    config = load_config(path)
    service = IngestService(config)  # the section's problems (a missing secret) stop it here
    configure_logging(config.log.level, config.log.format)
    return asyncio.run(_ingest(service, path))


async def _ingest(service: IngestService, path: str | None) -> int:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload, path)
    return await service.run(stop)


def cmd_warm(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    config = _load(args.config, require_bucket=False)  # the proxy knows its bucket
    host = "127.0.0.1" if config.admin.host in ("0.0.0.0", "::", "") else config.admin.host
    url = f"http://{host}:{config.admin.port}/warm/{urllib.parse.quote(args.name)}"
    secret = admin_secret(config)
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    request = urllib.request.Request(url, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            print(json.dumps(json.loads(response.read()), indent=2))
            return 0
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        print(f"s3proxy: warm {args.name}: {exc.code} {detail}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"s3proxy: warm: no proxy answering at {host}:{config.admin.port} ({reason})",
            file=sys.stderr,
        )
    return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    if config.auth.mode == "jwt":
        load_verification_keys(config.auth, config.source)
    admin_secret(config)
    print(f"# {config.source}: OK")
    print(yaml.safe_dump(config_as_dict(config), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3proxy", description="Authenticating HTTP byte-range proxy from S3 to MistServer."
    )
    parser.add_argument("--version", action="version", version=f"s3proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML file (default: $S3PROXY_CONFIG)")
    serve.set_defaults(func=cmd_serve)

    demo = commands.add_parser(
        "demo", help="serve a bundled sample from an embedded S3 emulator (no AWS account)"
    )
    demo.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    demo.add_argument(
        "--port",
        type=int,
        default=8080,
        help="listen port (default 8080, or a free one if taken; 0: any)",
    )
    demo.add_argument(
        "--admin-port",
        type=int,
        default=9101,
        help="admin listener port, /metrics (default 9101; 0 or taken: a free one)",
    )
    demo.add_argument(
        "--ttl",
        type=parse_duration,
        default=3600,
        help="lifetime of the printed token (default 1h)",
    )
    demo.set_defaults(func=cmd_demo)

    token = commands.add_parser("token", help="print a signed token")
    token.add_argument("--config", help="YAML file (default: $S3PROXY_CONFIG)")
    token.add_argument(
        "--asset",
        action="append",
        required=True,
        metavar="GLOB",
        help="asset glob the token opens (repeatable; *, **, ?)",
    )
    token.add_argument(
        "--ttl", type=parse_duration, default=3600, help="lifetime: 90s, 15m, 1h, 7d (default 1h)"
    )
    token.add_argument("--kid", help="key id to sign with (and put in the header)")
    token.add_argument("--algorithm", help="default: the first of auth.algorithms")
    token.add_argument("--private-key", help="PEM private key for RS/PS/ES/EdDSA algorithms")
    token.add_argument("--sub", help="subject claim (revocable with sub:<id>)")
    token.add_argument("--jti", help="token id claim (revocable with jti:<id>)")
    token.set_defaults(func=cmd_token)

    prepare = commands.add_parser(
        "prepare", help="ingest: remux to a streamable MP4 (index first), .dtsh, upload"
    )
    prepare.add_argument("source", help="a local file or s3://bucket/key (a raw upload)")
    prepare.add_argument(
        "--asset",
        required=True,
        help="asset name to publish it as (without an extension: the container's is added)",
    )
    prepare.add_argument(
        "--require-dtsh",
        action="store_true",
        help="fail (exit 2, nothing uploaded) when no .dtsh header can be made",
    )
    prepare.add_argument(
        "--config", help="YAML file (default: $S3PROXY_CONFIG): bucket, prefix, endpoint"
    )
    prepare.set_defaults(func=cmd_prepare)

    ingest = commands.add_parser(
        "ingest", help="run the ingest service: prepare every upload, signal when ready"
    )
    ingest.add_argument("--config", help="YAML file (default: $S3PROXY_CONFIG): the ingest section")
    ingest.set_defaults(func=cmd_ingest)

    warm = commands.add_parser("warm", help="ask a running proxy to load an asset's start")
    warm.add_argument("name", help="asset name, as in /vod/<name>")
    warm.add_argument("--config", help="YAML file (default: $S3PROXY_CONFIG): admin address")
    warm.add_argument("--timeout", type=float, default=60, help="seconds (default 60)")
    warm.set_defaults(func=cmd_warm)

    check = commands.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except ConfigError as exc:
        return _fail(str(exc))
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `s3proxy check-config | head`: the reader left, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
