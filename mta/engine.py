"""Wires the parts together and runs them: one supervisor, N worker processes.

Each worker runs one uvloop event loop with its own SMTP listener on the shared
address (SO_REUSEPORT, so the kernel spreads connections over the workers),
its own handle on the LMDB spool (opened after fork, never before) and the
delivery of its share of the destinations (partitioned by domain hash, so a
destination's limits are held by exactly one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
import sys
import time
from typing import Any

import uvloop

from mta.config import Config, ConfigError, check_bindable, parse_hostport
from mta.events import EventLog
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool
from mta.smtp.intake import Intake
from mta.smtp.server import IntakeSMTP

log = logging.getLogger("mta.engine")

SHUTDOWN_GRACE = 10.0


def worker_count(cfg: Config, requested: int | None) -> int:
    n = requested if requested else cfg.engine.workers
    return n if n > 0 else (os.cpu_count() or 1)


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    if not cfg.smtp.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.smtp.tls_cert, cfg.smtp.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[smtp] tls_cert/tls_key cannot be loaded: {exc}") from None
    return ctx


def check_startup(cfg: Config) -> None:
    """Everything that can fail at start fails here, with one line, before any fork."""
    tls_context(cfg)
    from mta.delivery.service import check_delivery_config

    check_delivery_config(cfg)
    from mta.http import check_http

    check_http(cfg)
    from mta.policy import check_policy

    check_policy(cfg)
    from mta.cluster import check_cluster

    check_cluster(cfg)
    for extension in startup_checks:
        extension(cfg)
    check_bindable("[smtp] listen", cfg.smtp.listen, socket.SO_REUSEPORT)


# Other parts add checks that must stop `mta serve` at start (DKIM keys, ...).
startup_checks: list[Any] = []
# Other parts add `async start(worker) -> None` hooks run in each worker.
worker_extensions: list[Any] = []


class Worker:
    """Everything one process runs."""

    def __init__(self, cfg: Config, index: int, workers: int) -> None:
        self.cfg = cfg
        self.index = index
        self.workers = workers
        self.stopping = asyncio.Event()
        self.closers: list[Any] = []

    async def run(self) -> None:
        cfg = self.cfg
        self.spool = Spool(cfg.spool.path, cfg.spool.map_size)
        self.events = EventLog(cfg.engine.event_log)
        self.events.start()
        self.committer = GroupCommitter(self.spool, cfg.spool.max_batch)
        self.committer.start()
        self.intake = Intake(cfg, self.spool, self.committer, emit=self.emit)
        from mta.cluster import start_cluster

        await start_cluster(self)  # Redis shared by several nodes, when configured
        if cfg.delivery.enabled:
            from mta.delivery.service import start_delivery

            self.deliverer = start_delivery(self)
        from mta.policy.wiring import wire_policy

        await wire_policy(self)  # the sending contract: intake checks, holds, footer, rates
        from mta.http import start_worker as start_operators

        await start_operators(self)  # audit log and metrics in every worker, HTTP in worker 0
        for extension in worker_extensions:
            await extension(self)
        host, port = parse_hostport(cfg.smtp.listen)
        tls = tls_context(cfg)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: IntakeSMTP(self.intake, tls), host, port, reuse_port=True, backlog=4096)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info("worker %d/%d listening on %s", self.index, self.workers, cfg.smtp.listen)
        await self.stopping.wait()
        await self.shutdown()

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("worker", self.index)
        self.events.emit(event)

    async def shutdown(self) -> None:
        self.server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), SHUTDOWN_GRACE)
        for close in reversed(self.closers):
            await close()
        await self.committer.close()
        self.events.close()
        self.spool.close()


def run_worker(cfg: Config, index: int, workers: int) -> None:
    _die_with_parent()
    setup_logging(cfg)
    uvloop.run(Worker(cfg, index, workers).run())


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the supervisor dies (kill -9 included)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def setup_logging(cfg: Config) -> None:
    logging.basicConfig(
        level=getattr(logging, cfg.engine.log_level.upper()),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter


def serve(cfg: Config, workers: int | None = None) -> int:
    """The supervisor: starts the workers, restarts one that dies, stops them all on TERM."""
    check_startup(cfg)
    setup_logging(cfg)
    from mta.metrics import cleanup_metrics_dir, metrics_process_dead, prepare_metrics_dir

    metrics_dir = prepare_metrics_dir(cfg)
    n = worker_count(cfg, workers)
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_worker(cfg, index, n)
            except ConfigError as exc:
                print(f"mta: config error: {exc}", file=sys.stderr)
                code = 2
            except BaseException:
                logging.getLogger("mta.engine").exception("worker %d failed", index)
                code = 1
            os._exit(code)
        children[pid] = index

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(n):
        spawn(index)
    log.info("engine started: %d workers, SMTP on %s", n, cfg.smtp.listen)
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        metrics_process_dead(pid)  # a dead worker's live gauges stop counting
        if index is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code == 2:  # a configuration problem: restarting would fail the same way
            stop(signal.SIGTERM, None)
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > 10:
            log.error("workers keep dying; stopping the engine")
            stop(signal.SIGTERM, None)
            continue
        log.warning("worker %d (pid %d) exited with %s; restarting", index, pid, code)
        spawn(index)
    cleanup_metrics_dir(cfg, metrics_dir)
    return 0
