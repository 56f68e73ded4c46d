"""The operators' surface in the engine's worker processes: audit log, metrics, HTTP.

mta/engine.py calls `check_http(cfg)` among its startup checks (the HTTP address can
be bound) and `start_operators(ctx, policy, live)` in every worker. Every worker opens
the audit log (O_APPEND lines, so all of them append to one file) and records its own
metrics (prometheus-client's multiprocess mode merges them, see mta.metrics). Worker 0
alone also runs the HTTP listener (`start_http`: /metrics, the admin API, the
dashboard, one-click unsubscribe); it reads LMDB directly (its own read transactions)
and writes through the policy guard's `PolicyOperations`, or without the guard through
`SpoolOperations` on its own group committer. If worker 0 dies, the supervisor restarts it
and the listener comes back with it.
"""

from __future__ import annotations

import logging

from aiohttp import web

from mta.audit import AuditLog, start_audit
from mta.config import Config, StartupError, check_bindable, parse_hostport
from mta.context import WorkerContext
from mta.http.api import AdminApi
from mta.http.app import HttpState, build_app
from mta.http.auth import FailureLimiter, TokenChecker
from mta.http.engagement_view import EngagementView
from mta.http.operations import PolicyOperations, SpoolOperations
from mta.metrics import EngineMetrics, LiveParts, start_metrics
from mta.tracking.hits import Tracker, tracking_secret
from mta.tracking.shared import SharedEngagement

log = logging.getLogger("mta.http")


def check_http(cfg: Config) -> None:
    """A startup check: the HTTP address can be bound (stops `mta serve` with one line)."""
    if not cfg.http.enabled:
        return
    check_bindable("[http] listen", cfg.http.listen)


async def start_http(ctx: WorkerContext, policy: PolicyOperations, audit: AuditLog | None,
                     metrics: EngineMetrics | None,
                     engagement: SharedEngagement | None = None) -> AdminApi | None:
    """Serve /metrics, the admin API, the dashboard and unsubscribe from this worker.
    `engagement`: the opens and clicks of other nodes (None: one node)."""
    cfg = ctx.cfg
    if not cfg.http.enabled:
        return None
    if engagement is not None:  # the admin views show the cluster's opens and clicks
        policy = EngagementView(policy, engagement)
    registry = metrics.registry if metrics is not None else None
    admin = AdminApi(cfg, ctx.spool, policy, audit, registry,
                     metrics.throughput if metrics is not None else None,
                     submit=ctx.committer.submit, emit=ctx.emit, outbox=ctx.outbox)
    tracker = Tracker(cfg.tracking, tracking_secret(cfg, ctx.spool), ctx.emit,
                      spool=ctx.spool, submit=ctx.committer.submit, shared=engagement,
                      record_events=ctx.outbox.record if ctx.outbox else None)
    st = HttpState(admin, TokenChecker(cfg.http.admin_token, cfg.http.operator_tokens),
                   FailureLimiter(cfg.http.max_auth_failures, cfg.http.auth_failure_window),
                   audit, registry, tracker)
    runner = web.AppRunner(build_app(st), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_hostport(cfg.http.listen)
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {cfg.http.listen} ([http] listen): "
                           f"{exc.strerror}") from None
    ctx.on_close(runner.cleanup)
    tracker.start()
    ctx.on_close(tracker.close)
    log.info("worker %d: operators' HTTP on %s", ctx.index, cfg.http.listen)
    return admin


async def start_operators(ctx: WorkerContext, policy: PolicyOperations | None,
                          live: LiveParts, engagement: SharedEngagement | None = None
                          ) -> EngineMetrics:
    """Everything of the operators' surface a worker runs: audit and metrics in every
    worker, the HTTP listener in worker 0. Without the policy guard, the admin API
    answers what the spool alone can (`SpoolOperations`)."""
    audit = start_audit(ctx)
    metrics = start_metrics(ctx, live)
    if ctx.seat.leader:
        policy = policy or SpoolOperations(ctx.cfg, ctx.spool, ctx.committer.submit, ctx.emit)
        await start_http(ctx, policy, audit, metrics, engagement)
    return metrics
