"""Running the proxy: the main and admin listeners, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from .app import Proxy, create_admin_app, create_app
from .config import Config, ConfigError, load_config
from .logs import set_level

log = logging.getLogger("s3proxy.server")


@dataclass(frozen=True)
class Listening:
    """Where the listeners ended up (ports may have been chosen by the kernel)."""

    main: tuple[str, int]
    admin: tuple[str, int]


OnStarted = Callable[[Listening], Awaitable[None] | None]


def _bound(runner: web.AppRunner) -> tuple[str, int]:
    address = runner.addresses[0]
    return str(address[0]), int(address[1])


async def run(config: Config, *, config_path: str | None = None,
              on_started: OnStarted | None = None,
              stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set); drain in-flight requests; return 0.

    SIGHUP re-reads `config_path` and applies the auth keys, revocations and log level.
    """
    if config.auth.mode == "none":
        log.warning("auth.mode is none: every request is served without a token check")
    proxy = Proxy(config)
    runner = web.AppRunner(create_app(config, proxy), access_log=None, handle_signals=False,
                           shutdown_timeout=config.server.shutdown_timeout_s)
    admin_runner = web.AppRunner(create_admin_app(proxy), access_log=None,
                                 handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await admin_runner.setup()
        await web.TCPSite(runner, config.server.host, config.server.port,
                          backlog=min(config.server.max_connections, 65535)).start()
        await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
        listening = Listening(_bound(runner), _bound(admin_runner))
        log.info("listening", extra={"fields": {
            "main": f"{listening.main[0]}:{listening.main[1]}",
            "admin": f"{listening.admin[0]}:{listening.admin[1]}",
            "bucket": config.s3.bucket}})
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _reload, proxy, config_path)
        if on_started is not None:
            result = on_started(listening)
            if result is not None:
                await result
        await stop.wait()
        log.info("stopping: draining in-flight requests",
                 extra={"fields": {"timeout_s": config.server.shutdown_timeout_s}})
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    finally:
        await admin_runner.cleanup()
        await runner.cleanup()
    log.info("stopped")
    return 0


def _reload(proxy: Proxy, config_path: str | None) -> None:
    if config_path is None:
        log.warning("SIGHUP ignored: no configuration file to re-read")
        return
    try:
        fresh = load_config(config_path)
        proxy.verifier.reload(fresh.auth, fresh.source)
    except ConfigError as exc:
        log.error("SIGHUP: configuration not reloaded", extra={"fields": {"error": str(exc)}})
        return
    set_level(fresh.log.level)
    log.info("SIGHUP: reloaded auth keys, revocations and log level")
