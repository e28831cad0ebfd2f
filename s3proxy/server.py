"""Running the proxy: the main and admin listeners, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .app import RUNNER_OPTIONS, Proxy, create_admin_app, create_app
from .config import Config, reread
from .connections import GuardedRunner, Limits
from .errors import S3ProxyError, StartupError
from .logs import set_level
from .store.memory import preallocate
from .store.tiers import SHM
from .workdirs import make_locked_dir, remove_abandoned

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


def _preallocate(size: int, block_size: int, worker: int) -> dict[str, float]:
    """cache.preallocate: this process's memory tier, held (and touched) from here on;
    what was held, for the "listening" line (nothing when the tier holds no block)."""
    if size < block_size:
        return {}
    started = time.monotonic()
    if not preallocate(size, block_size):
        log.warning(
            "cache.preallocate: not done here (it needs glibc and blocks under 32MiB)",
            extra={"fields": {"worker": worker}},
        )
        return {}
    return {"preallocated_bytes": size, "preallocated_s": round(time.monotonic() - started, 3)}


def open_files_needed(config: Config) -> int:
    """The open files a worker may need at once: for each main connection its socket
    and the block file a response is sent from (`sendfile`), for each admin connection
    its socket (each listener is bounded by server.max_connections), the connections
    to S3, and a few for logs, metrics and the cache's directories."""
    return 3 * config.server.max_connections + config.s3.max_connections + 64


def _raise_open_files(needed: int, worker: int) -> None:
    """Raise the soft limit on open files (`ulimit -n`, often 1024) to what the limits
    configured need, as far as the hard limit allows; say so when that is not enough,
    rather than failing at accept or sending from S3 what a block file holds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            target = soft
    if worker != 0:
        return
    fields = {"fields": {"from": soft, "to": target, "needed": needed, "hard": hard}}
    if target < needed:
        log.warning(
            "the open files limit (ulimit -n) is below what server.max_connections may "
            "need: raise its hard limit (LimitNOFILE=, docker --ulimit nofile=) or lower "
            "server.max_connections",
            extra=fields,
        )
    else:
        log.info("raised the open files limit", extra=fields)


async def run(
    config: Config,
    *,
    config_path: str | None = None,
    on_started: OnStarted | None = None,
    stop: asyncio.Event | None = None,
    worker: int = 0,
    workers: int = 1,
    shared_dir: str | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set); drain in-flight requests; return 0.

    SIGHUP re-reads `config_path` and applies the auth keys, revocations and log level.
    With several workers, each calls this with its index; the ports are shared
    (SO_REUSEPORT) and the kernel spreads connections over them.
    """
    if config.auth.mode == "none" and worker == 0:
        log.warning("auth.mode is none: every request is served without a token check")
    _raise_open_files(open_files_needed(config), worker)
    proxy = Proxy(config, worker=worker, workers=workers, shared_dir=shared_dir)
    held = (
        _preallocate(proxy.store.tiers.memory.max_bytes, int(config.cache.block_size), worker)
        if config.cache.preallocate
        else {}
    )
    shared = workers > 1
    # aiohttp waits its shutdown timeout for handlers, then again after cancelling them:
    # the drain below is ours, so the whole stop stays within server.shutdown_timeout_s
    limits = Limits.of(config.server)
    runner = GuardedRunner(
        create_app(config, proxy),
        limits,
        proxy.metrics,
        handle_signals=False,
        shutdown_timeout=CANCEL_GRACE_S / 2,
        **RUNNER_OPTIONS,
    )
    admin_runner = GuardedRunner(
        create_admin_app(proxy),
        limits,
        None,
        handle_signals=False,
        shutdown_timeout=CANCEL_GRACE_S / 2,
        **RUNNER_OPTIONS,
    )
    try:
        await runner.setup()  # opens the S3 client and the cache tiers
    except (OSError, S3ProxyError) as exc:  # an unwritable cache.disk.path, say
        raise StartupError(f"can not start: {_reason(exc)}") from None
    try:
        await admin_runner.setup()
        main_site = web.TCPSite(
            runner,
            config.server.host,
            config.server.port,
            backlog=min(config.server.max_connections, 65535),
            reuse_port=shared,
        )
        await _listen(main_site, "server", config.server.host, config.server.port)
        await _listen(
            web.TCPSite(admin_runner, config.admin.host, config.admin.port, reuse_port=shared),
            "admin",
            config.admin.host,
            config.admin.port,
        )
        listening = Listening(_bound(runner), _bound(admin_runner))
        log.info(
            "listening",
            extra={
                "fields": {
                    "worker": worker,
                    "main": f"{listening.main[0]}:{listening.main[1]}",
                    "admin": f"{listening.admin[0]}:{listening.admin[1]}",
                    "bucket": config.s3.bucket,
                    **held,
                }
            },
        )
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _reload, proxy, config_path)
        if on_started is not None:
            result = on_started(listening)
            if result is not None:
                await result
        orphaned = asyncio.ensure_future(_stop_when_orphaned(stop)) if workers > 1 else None
        await stop.wait()
        if orphaned is not None:
            orphaned.cancel()
        log.info(
            "stopping: draining in-flight requests",
            extra={"fields": {"timeout_s": config.server.shutdown_timeout_s}},
        )
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        await _drain(main_site, proxy, config.server.shutdown_timeout_s)
    finally:
        await admin_runner.cleanup()
        await runner.cleanup()
    log.info("stopped")
    return 0


CANCEL_GRACE_S = 0.5  # after the drain: what is still running is cancelled within this


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc) or type(exc).__name__


async def _listen(site: web.TCPSite, what: str, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(
            f"{what}.host/{what}.port: can not listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


async def _drain(site: web.TCPSite, proxy: Proxy, timeout_s: float) -> None:
    """Stop accepting, then let in-flight responses finish until `timeout_s` (less the
    time cancelling the rest takes) has passed."""
    deadline = time.monotonic() + max(0.0, timeout_s - CANCEL_GRACE_S)
    await site.stop()
    while proxy.inflight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (even by SIGKILL) drains and exits, rather than
    serving on with nobody to restart or stop it."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the supervisor is gone: stopping")
    stop.set()


def _reload(proxy: Proxy, config_path: str | None) -> None:
    fresh = reread(config_path, lambda fresh: proxy.verifier.reload(fresh.auth, fresh.source))
    if fresh is not None:
        set_level(fresh.log.level)
        log.info("SIGHUP: reloaded auth keys, revocations and log level")


SHARED_PREFIX = "s3proxy-blocks-"


def shared_tier_dir(config: Config) -> tuple[str, int] | None:
    """Where the workers of this supervisor share blocks (several workers, no disk tier),
    and a descriptor holding its lock: a new directory on tmpfs (/dev/shm) when it has
    room for cache.max_bytes, else in the temporary directory (page cache, still shared).
    Directories whose lock nobody holds (their supervisor died) are removed first; the
    lock, not a process id, tells (other instances may share /dev/shm or /tmp)."""
    import tempfile

    if config.server.workers < 2 or (config.cache.disk.path and config.cache.disk.max_bytes):
        return None
    candidates = [root for root in (SHM, tempfile.gettempdir()) if os.path.isdir(root)]
    for root in candidates:
        remove_abandoned(root, SHARED_PREFIX)
    for root in candidates:
        try:
            stats = os.statvfs(root)
        except OSError:
            continue
        if stats.f_bavail * stats.f_frsize < int(config.cache.max_bytes) and root == SHM:
            continue
        if root != SHM:
            log.warning(
                "the workers share blocks through the temporary directory: "
                f"{SHM} lacks room for cache.max_bytes (Docker: --shm-size)",
                extra={"fields": {"path": root}},
            )
        return make_locked_dir(root, SHARED_PREFIX)  # the lock is held until the group is gone
    return None


def supervise(config: Config, config_path: str | None) -> int:
    """server.workers > 1: fork that many workers sharing the ports, restart any that dies,
    forward SIGTERM/SIGINT (drain, exit 0) and SIGHUP (reload) to them.

    The caller has set PROMETHEUS_MULTIPROC_DIR and has not imported prometheus_client,
    so every worker writes its metrics where any of them can report the sum. Without a
    disk tier the workers share blocks through a directory on tmpfs, removed at exit.
    """
    import multiprocessing
    import shutil

    from prometheus_client import multiprocess

    from .logs import configure_logging

    configure_logging(config.log.level, config.log.format)
    context = multiprocessing.get_context("fork")  # before any event loop or thread exists
    workers = config.server.workers
    shared = shared_tier_dir(config)
    shared_dir = shared[0] if shared is not None else None

    reasons = context.SimpleQueue()  # a worker that can not start says why here

    def start(index: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=_worker_main,
            args=(config, config_path, index, workers, shared_dir, reasons),
            daemon=False,
        )
        process.start()
        return process

    processes = {index: start(index) for index in range(workers)}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for process in processes.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    log.info(
        "supervising workers", extra={"fields": {"workers": workers, "shared_tier": shared_dir}}
    )
    crashes: list[float] = []  # when workers died, recently
    try:
        while True:
            for index, process in list(processes.items()):
                process.join(timeout=0.2)
                if process.exitcode is None:
                    continue
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                del processes[index]
                if stopping:
                    continue
                if process.exitcode == EXIT_STARTUP:
                    why = reasons.get() if not reasons.empty() else "no reason given"
                    return _give_up(processes, f"worker {index} could not start: {why}")
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < CRASH_WINDOW_S] + [now]
                if len(crashes) > MAX_CRASHES:
                    return _give_up(
                        processes, f"workers crashed {len(crashes)} times in {CRASH_WINDOW_S:.0f} s"
                    )
                delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (len(crashes) - 1))
                log.error(
                    "worker exited; restarting it",
                    extra={
                        "fields": {"worker": index, "exitcode": process.exitcode, "after_s": delay}
                    },
                )
                time.sleep(delay)
                processes[index] = start(index)
            if stopping and not processes:
                return 0
    finally:
        if shared is not None:
            shutil.rmtree(shared[0], ignore_errors=True)
            os.close(shared[1])


EXIT_STARTUP = 2
MAX_CRASHES = 5  # in CRASH_WINDOW_S: then the supervisor gives up (exit 1)
CRASH_WINDOW_S = 60.0
MAX_BACKOFF_S = 10.0


def _give_up(processes: dict[int, multiprocessing.process.BaseProcess], why: str) -> int:
    log.error(f"giving up: {why}")
    for process in processes.values():
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    for process in processes.values():
        process.join(timeout=30)
    return 1


def _worker_main(
    config: Config,
    config_path: str | None,
    index: int,
    workers: int,
    shared_dir: str | None,
    reasons: Any,
) -> None:
    from .logs import configure_logging
    from .metrics import fix_process_identity

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    configure_logging(config.log.level, config.log.format)
    fix_process_identity()
    try:
        code = asyncio.run(
            run(
                config,
                config_path=config_path,
                worker=index,
                workers=workers,
                shared_dir=shared_dir,
            )
        )
    except StartupError as exc:
        reasons.put(str(exc))  # the supervisor says it, once
        code = EXIT_STARTUP
    os._exit(code)
