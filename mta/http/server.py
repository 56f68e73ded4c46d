"""Starting the operators' surface inside the engine's worker processes.

With N workers, worker 0 alone runs the HTTP listener: it reads LMDB directly
(its own read transactions) and writes through its own group committer. Metrics
stay right across the processes through prometheus-client's multiprocess mode
(see mta.metrics); the audit log is appended to by every worker (O_APPEND lines).
If worker 0 dies, the supervisor restarts it and the listener comes back with it.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from aiohttp import web

from mta.audit import AuditLog, start_audit
from mta.config import Config, ConfigError, check_bindable, parse_hostport
from mta.http.admin import Admin
from mta.http.app import HttpState, build_app
from mta.http.auth import FailureLimiter, TokenChecker
from mta.http.policy_port import PolicyAdmin, SpoolPolicy
from mta.metrics import start_metrics

log = logging.getLogger("mta.http")


def check_http(cfg: Config) -> None:
    """A startup check: the HTTP address can be bound (stops `mta serve` with one line)."""
    if not cfg.http.enabled:
        return
    check_bindable("[http] listen", cfg.http.listen, socket.SO_REUSEADDR)


def policy_source(worker: Any) -> Any:
    """The worker's `PolicyAdmin`: `worker.policy_admin` once the guard is wired, else the
    spool-only stand-in."""
    fallback = SpoolPolicy(worker.cfg, worker.spool, worker.committer.submit, worker.emit)

    def current() -> PolicyAdmin:
        return getattr(worker, "policy_admin", None) or fallback

    return current


async def start_http(worker: Any) -> None:
    """Serve /metrics, the admin API, the dashboard and unsubscribe from this worker."""
    cfg: Config = worker.cfg
    if not cfg.http.enabled:
        return
    audit: AuditLog | None = getattr(worker, "audit", None)
    metrics = getattr(worker, "metrics", None)
    registry = metrics.registry if metrics is not None else None
    admin = Admin(cfg, worker.spool, policy_source(worker), audit, registry)
    st = HttpState(admin, TokenChecker(cfg.http.admin_token, cfg.http.operator_tokens),
                   FailureLimiter(cfg.http.max_auth_failures, cfg.http.auth_failure_window),
                   audit, registry)
    runner = web.AppRunner(build_app(st), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_hostport(cfg.http.listen)
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"[http] listen {cfg.http.listen}: {exc.strerror}") from None
    worker.closers.append(runner.cleanup)
    worker.http_admin = admin
    log.info("worker %d: operators' HTTP on %s", worker.index, cfg.http.listen)


async def start_worker(worker: Any) -> None:
    """Everything of the operators' surface a worker runs: audit and metrics in every
    worker, the HTTP listener in worker 0 (a `worker_extensions` hook)."""
    start_audit(worker)
    start_metrics(worker)
    if worker.index == 0:
        await start_http(worker)
