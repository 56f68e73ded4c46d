"""The TLS policy of one worker, as mta/engine.py wires it (`start_tls`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from mta.config import Config, ConfigError
from mta.context import WorkerContext
from mta.delivery.tls.certs import TrustError, load_trust_store
from mta.delivery.tls.reporter import TlsReporter, check_tlsrpt_config
from mta.delivery.tls.service import LookupFn, TlsParts, build_tls
from mta.delivery.tls.store import TlsStore
from mta.queue.spool import NewMessage


def check_tls_config(cfg: Config) -> None:
    """Stops `mta serve` at start, with one line: an unreadable CA file, a reporting
    domain without a DKIM key."""
    try:
        load_trust_store(cfg.delivery.tls_ca_file, cfg.delivery.tls_system_ca)
    except TrustError as exc:
        raise ConfigError(f"[delivery] tls_ca_file: {exc}") from None
    check_tlsrpt_config(cfg)


def start_tls(ctx: WorkerContext, lookup: LookupFn,
              on_stored: Callable[[NewMessage], None] | None = None) -> TlsParts:
    """The worker's TLS plans and session checker; with `[tlsrpt] enabled`, its session
    counts flushed to LMDB and (the first delivering worker) the daily reports sent."""
    store = TlsStore(ctx.spool)
    parts = build_tls(ctx.cfg, lookup, store, ctx.committer.submit)
    tasks: list[asyncio.Task[None]] = []
    reporter = None
    if parts.ledger is not None:
        reporter = TlsReporter(ctx.cfg, store, lookup, parts.https, ctx.committer.submit,
                               on_stored)
        tasks.append(asyncio.get_running_loop().create_task(
            reporter.run(parts.ledger, ctx.seat.delivery_leader, ctx.cfg.tlsrpt.check_interval)))

    async def close() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if reporter is not None and parts.ledger is not None:
            with contextlib.suppress(Exception):
                await reporter.flush(parts.ledger)  # the last second's sessions
        await parts.https.close()

    ctx.on_close(close)
    return parts
