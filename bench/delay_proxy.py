"""A TCP relay that adds latency to every request: bytes from the client reach the origin
`--delay-ms` later (responses flow back at once), so each request's time to first byte
grows by that much, as with an S3 region 30 ms away. For loopback benchmarks only.

    python bench/delay_proxy.py --listen 127.0.0.1:9000 --target 127.0.0.1:8000 --delay-ms 30
"""

from __future__ import annotations

import argparse
import asyncio
import time


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump_in() -> None:
        while data := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay_s, data))
        queue.put_nowait((time.monotonic() + delay_s, b""))

    async def pump_out() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        # The client is gone: like its kernel answering the origin's next segment with a
        # reset, abort the origin side instead of leaving it half-open and filling buffers.
        writer.transport.abort()

    try:
        await asyncio.gather(pump_in(), pump_out())
    except (ConnectionError, asyncio.CancelledError):
        writer.close()


async def _copy(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: asyncio.StreamWriter
) -> None:
    try:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        source.transport.abort()  # the client reset: so does the path back to the origin
    finally:
        writer.close()


async def main(listen: str, target: str, delay_ms: float) -> None:
    target_host, target_port = target.rsplit(":", 1)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            origin_r, origin_w = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _pipe(client_r, origin_w, delay_ms / 1000),
            _copy(origin_r, client_w, origin_w),
            return_exceptions=True,
        )

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.listen, args.target, args.delay_ms))
