"""The policy guard in a worker: the contract's parts, assembled.

One `PolicyGuard` per worker process, made of parts with one job each:

- `admission` (mta.policy.admission): intake's checks, trial and monthly limits;
- `holds` (mta.policy.holds): the scheduler's hold check;
- `transform` (mta.policy.transform): footer and List-Unsubscribe, before DKIM;
- `counting` (mta.policy.counting): counters from the event log, pauses, notices;
- `unsubscribes` (mta.policy.unsubscribes): one-click and mailto;
- the daily purge of deleted accounts (mta.policy.retention).

What must be shared between workers (counters, pauses, suspensions, suppression lists)
is in the spool's LMDB environment; pauses and suspensions are read through a
per-worker cache (mta.policy.snapshot). What other nodes share goes through the
`SharedPolicy` port (mta.policy.shared), local-only unless the wiring plugs in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from mta.config import AccountConfig, Config
from mta.policy.admission import RESERVATION_GRACE, Admission, Reservations
from mta.policy.counting import Counting
from mta.policy.headers import HeaderInjection, Unsubscriber
from mta.policy.holds import PolicyHolds
from mta.policy.model import PAUSED
from mta.policy.retention import (
    PurgeReport,
    due_accounts,
    log_report,
    purge_account_records,
    purge_event_logs,
)
from mta.policy.shared import SharedPolicy
from mta.policy.snapshot import Snapshot, SnapshotCache
from mta.policy.store import PolicyStore
from mta.policy.transform import PolicyTransform
from mta.policy.unsubscribes import InvalidUnsubscribe, UnsubscribeResult, Unsubscribes
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool

log = logging.getLogger("mta.policy")

PURGE_INTERVAL = 86400.0
PURGE_SETTLE = 2.0

__all__ = ["InvalidUnsubscribe", "PolicyGuard", "UnsubscribeResult", "check_policy"]


class PolicyGuard:
    def __init__(self, cfg: Config, spool: Spool, committer: GroupCommitter,
                 emit: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 record_events: Callable[[Any, list[dict[str, Any]]], None] | None = None
                 ) -> None:
        self.cfg = cfg
        self.pc = cfg.policy
        self.record_events = record_events  # the event outbox (mta.outbox.wiring), if kept
        self.spool = spool
        self.committer = committer
        self.emit = emit or (lambda event: None)
        self.clock = clock
        self.store = PolicyStore(spool, journal=bool(cfg.cluster.redis))
        self.accounts: dict[str, AccountConfig] = {a.name: a for a in cfg.accounts}
        self.counts: Counter[str] = Counter()  # for metrics
        self.cache = SnapshotCache(self.store, self.pc.cache_ttl)
        reservations = Reservations(cfg.smtp.commit_timeout + RESERVATION_GRACE)
        self.counting = Counting(cfg, self.store, committer, self.cache, reservations,
                                 self.counts, self.emit, clock, record_events)
        self.admission = Admission(cfg, self.store, self.cache, reservations, self.counts,
                                   self.counting.unwritten, clock)
        local_domains = {d.lower() for d in (cfg.bounce.domain, cfg.bounce.fbl_domain,
                                             *cfg.smtp.local_domains) if d}
        self.holds = PolicyHolds(self.store, self.cache, local_domains, self.counts)
        self.thresholds = self.counting.thresholds
        self.ledger = self.counting.ledger
        # Made at start: they need the unsubscribe key, which may be made in the spool.
        self.unsubscriber: Unsubscriber | None = None
        self.transform: PolicyTransform | None = None
        self.unsubscribes: Unsubscribes | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Intake's checks (mta.smtp.intake.IntakePolicy) and the limits' arithmetic.
        self.check_mail = self.admission.check_mail
        self.check_rcpt = self.admission.check_rcpt
        self.check_message = self.admission.check_message
        self.admit = self.admission.admit
        self.limits = self.admission.limits
        self.limit_reply = self.admission.limit_reply
        self.usage = self.admission.usage
        # The event log's listener, and feedback from the inbound path.
        self.on_event = self.counting.on_event
        self.record_event = self.counting.record_event
        self.record_bounce = self.counting.record_bounce
        self.flush = self.counting.flush

    def share(self, shared: SharedPolicy) -> None:
        """Share state with other nodes through `shared` (before `start`)."""
        self.admission.shared = self.counting.shared = shared
        self.ledger.judge = not shared.judges

    # --- life cycle -----------------------------------------------------------

    async def start(self, daily_purge: bool = False) -> None:
        """Load the unsubscribe key (made once per spool), start batching (and the purge)."""
        if self.pc.unsubscribe_secret:
            secret = self.pc.unsubscribe_secret.encode()
        else:
            secret = await self.committer.submit(self.store.ensure_secret)
        self.unsubscriber = make_unsubscriber(self.cfg, secret)
        self.transform = PolicyTransform(self.pc, self.accounts, self.unsubscriber, self.counts)
        self.unsubscribes = Unsubscribes(secret, self.counting, self.counts, self.emit)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.counting.flush_forever()))
        if daily_purge:
            self._tasks.append(loop.create_task(self._purge_forever()))

    async def close(self) -> None:
        for task in self._tasks:
            while not task.done():  # again if a cancellation got lost (asyncio.wait_for)
                task.cancel()
                await asyncio.wait([task], timeout=0.2)
        self._tasks.clear()
        await self.flush()

    # --- shared state, cached ---------------------------------------------------

    def snapshot(self) -> Snapshot:
        return self.cache.get()

    def refresh(self) -> None:
        self.cache.refresh()

    # --- unsubscribes -------------------------------------------------------------

    def _started(self) -> Unsubscribes:
        if self.unsubscribes is None:
            raise RuntimeError("the policy guard is not started")
        return self.unsubscribes

    def token_for(self, account: str, campaign: str, recipient: str) -> str:
        if self.unsubscriber is None:
            raise RuntimeError("the policy guard is not started")
        return self.unsubscriber.token(account, campaign, recipient)

    async def unsubscribe(self, token: str, via: str = "one-click") -> UnsubscribeResult:
        return await self._started().unsubscribe(token, via)

    async def unsubscribe_mailbox(self, rcpt: str, data: bytes) -> tuple[int, str]:
        return await self._started().mailbox(rcpt, data)

    # --- retention ------------------------------------------------------------------------

    async def purge_due(self, settle: float = PURGE_SETTLE) -> list[PurgeReport]:
        """Purge every deleted account past its retention (run daily by the engine)."""
        now = self.clock()
        with self.store.read() as txn:
            due = due_accounts(self.store, txn, now)
        reports = []
        for account in due:
            report: PurgeReport = await self.committer.submit(
                lambda txn, a=account: purge_account_records(self.store, txn, a, now))
            report.event_lines, report.files = await asyncio.to_thread(
                purge_event_logs, self.cfg.engine.event_log, {account}, settle)
            await self.counting.shared.forget_account(account)  # its shared records go too
            log_report(report)
            self.emit({"type": "AccountPurged", "purged_account": account,
                       **{k: v for k, v in report.as_dict().items() if k != "account"}})
            reports.append(report)
        return reports

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.purge_due()
            except Exception:
                log.exception("account purge failed")
            await asyncio.sleep(PURGE_INTERVAL)

    # --- metrics -------------------------------------------------------------------------------

    def metrics(self) -> dict[str, int]:
        """Counters since the worker started (pauses, refusals by reason, unsubscribes...)."""
        return dict(self.counts)

    def paused_campaigns(self) -> int:
        return sum(1 for s in self.snapshot().campaigns.values() if s.status == PAUSED)

    @property
    def shared(self) -> SharedPolicy:
        return self.counting.shared


def make_unsubscriber(cfg: Config, secret: bytes) -> Unsubscriber:
    return Unsubscriber(secret, cfg.http.public_url, cfg.policy.unsubscribe_path,
                        cfg.policy.unsubscribe_mailbox, cfg.bounce.domain)


def check_policy(cfg: Config) -> None:
    """A startup check: the unsubscribe fields can be built from this config."""
    from mta.config import ConfigError

    try:
        make_unsubscriber(cfg, b"x").fields("a", "c", "r@example.com")
    except HeaderInjection as exc:
        raise ConfigError(f"[policy] {exc}") from None
