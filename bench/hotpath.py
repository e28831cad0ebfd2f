"""What one memory hit costs s3proxy in Python: the fast lane's answer to a plain 64 KiB
range GET (parse, token, range, head, memory read) and its accounting (metrics), timed
in-process with no socket, so a change to the hot path shows in microseconds instead of
in bench case (b)'s noise.

    python bench/hotpath.py                  # us per answer, best and median of 9 rounds
    python bench/hotpath.py --profile        # and cProfile's top functions
    python bench/hotpath.py --single         # metrics as with server.workers: 1
    python /tmp/old/bench/hotpath.py         # an older tree (git archive), side by side

The origin is the tests' scriptable S3-like origin on 127.0.0.1 (64 MiB object, warmed
into memory through the proxy first). By default the metrics are multiprocess ones, as
every worker has them with `server.workers: 2`. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET_ENV = "S3PROXY_BENCH_JWT_SECRET"
SECRET = "bench-only-placeholder-secret-" + "0123456789abcdef" * 2
MIB = 1 << 20


async def measure(rounds: int, count: int, profile: bool) -> None:
    import aiohttp
    import jwt
    from aiohttp.test_utils import TestServer

    from s3proxy.app import create_app
    from s3proxy.config import config_from_dict
    from s3proxy.fastlane import FAST_LANE
    from tests.origin import OriginState, make_origin

    origin = TestServer(make_origin(OriginState(size=64 * MIB)), host="127.0.0.1")
    await origin.start_server()
    config = config_from_dict(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "s3": {"bucket": "bench", "endpoint_url": f"http://127.0.0.1:{origin.port}"},
            "auth": {"keys": [{"kid": "bench", "secret_env": SECRET_ENV}]},
            "log": {"level": "warning"},
        },
        source="<bench>",
    )
    app = create_app(config)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    claims = {"exp": int(time.time()) + 3600, "assets": ["**"]}
    token = jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "bench"})
    path = f"/t/{token}/hot.mp4"
    async with aiohttp.ClientSession() as session:  # every block into memory
        for block in range(64):
            first = block * MIB
            headers = {"Range": f"bytes={first}-{first + MIB - 1}"}
            async with session.get(f"http://127.0.0.1:{server.port}{path}", headers=headers) as r:
                await r.read()
                assert r.status == 206, r.status
    rng = random.Random(7)  # as bench case (b): aligned 64 KiB ranges anywhere in 64 MiB
    heads = []
    for _ in range(64):
        first = rng.randrange(1024) * 65536
        heads.append(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Range: bytes={first}-{first + 65535}\r\n\r\n".encode()
        )
    lane = app[FAST_LANE]

    class Connection:  # what the lane keys a connection's read history by
        pass

    connection = Connection()

    def answer(k: int) -> None:
        found = lane(heads[k & 63], connection, "127.0.0.1")
        assert found is not None, "not answered from memory"
        found.finish(65536, True)

    for k in range(count // 4):
        answer(k)
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        for k in range(count):
            answer(k)
        timings.append((time.perf_counter() - started) / count * 1e6)
    print(
        f"fast-lane memory hit, 64 KiB: {min(timings):.1f} us best, "
        f"{statistics.median(timings):.1f} us median ({rounds} rounds of {count})"
    )
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for k in range(count):
            answer(k)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    await server.close()
    await origin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--count", type=int, default=10000, help="answers per round")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--single", action="store_true", help="single-process metrics")
    args = parser.parse_args()
    os.environ[SECRET_ENV] = SECRET
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    sys.path.insert(0, str(ROOT))  # tests.origin, and s3proxy of the tree this script is in
    with tempfile.TemporaryDirectory(prefix="s3proxy-hotpath-") as metrics_dir:
        if not args.single:  # before prometheus_client is imported, as the supervisor does
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            try:  # as a worker does (trees before it read the pid at every update)
                from s3proxy.metrics import fix_process_identity
            except ImportError:
                pass
            else:
                fix_process_identity()
        asyncio.run(measure(args.rounds, args.count, args.profile))


if __name__ == "__main__":
    main()
