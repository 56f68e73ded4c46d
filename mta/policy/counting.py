"""Counting what happens to each campaign's mail, and pausing it past the contract.

`Counting` listens to the event log (receptions, delivery outcomes, and the inbound
path's asynchronous bounces, complaints and opt-outs), batches what it counts, and
writes a batch every `[policy] flush_interval` through the group committer
(`Ledger.apply`, one transaction). A batch that breaches a threshold pauses its
campaign: the pause is announced (an event, the notice mail the ledger spooled) and
the campaign's mail that is not due yet is held.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from mta.bounce import classify_reply
from mta.config import Config
from mta.policy.admission import Reservations
from mta.policy.holds import hold_campaign_op
from mta.policy.ledger import Applied, Batch, Ledger, Outcome, Pause, Submission
from mta.policy.model import month_of
from mta.policy.notice import ReplyCount, notice_sender, pause_notice
from mta.policy.rates import Breach, Thresholds
from mta.policy.shared import LocalPolicy, SharedPolicy
from mta.policy.snapshot import SnapshotCache
from mta.policy.store import PolicyStore
from mta.queue.commit import GroupCommitter
from mta.queue.spool import NewMessage, SpoolFullError
from mta.text import shown

log = logging.getLogger("mta.policy")

OUTCOME_EVENTS = ("Delivery", "Bounce", "Expiration")
FEEDBACK_KINDS = ("hard", "soft", "complaint", "unsubscribe")

Emit = Callable[[dict[str, Any]], None]


def outcome_kind(event: dict[str, Any]) -> str | None:
    """delivered / hard / soft for a delivery outcome event."""
    kind = event.get("type")
    if kind == "Delivery":
        return "delivered"
    if kind == "Expiration":
        return "soft"
    if kind == "Bounce":
        if event.get("kind") in ("hard", "soft"):
            return str(event["kind"])
        bounce, _ = classify_reply(int(event.get("code") or 0), event.get("status") or None,
                                   str(event.get("reply") or ""))
        return bounce
    return None


class Counting:
    def __init__(self, cfg: Config, store: PolicyStore, committer: GroupCommitter,
                 cache: SnapshotCache, reservations: Reservations, counts: Counter[str],
                 emit: Emit, clock: Callable[[], float],
                 record_events: Callable[[Any, list[dict[str, Any]]], None] | None = None
                 ) -> None:
        self.cfg = cfg
        # The event outbox (mta.outbox.wiring): a batch's events (CampaignPaused, an
        # Unsubscribe) are recorded in the batch's own transaction, then emitted as built.
        self.record_events = record_events
        self.pc = cfg.policy
        self.store = store
        self.committer = committer
        self.cache = cache
        self.reservations = reservations
        self.counts = counts
        self.emit = emit
        self.clock = clock
        self.accounts = {a.name: a for a in cfg.accounts}
        self.thresholds = Thresholds.from_config(cfg.policy)
        self.ledger = Ledger(store, self.thresholds, self._notice)
        self.shared: SharedPolicy = LocalPolicy()  # PolicyGuard.share may plug in another
        self.pending = Batch()
        self._flushing = Batch()

    def unwritten(self, account: str, month: str | None) -> int:
        """E-mails of `account` (in `month`, or all) counted but not written yet."""
        return (self.pending.submitted_by(account, month)
                + self._flushing.submitted_by(account, month))

    # --- what is counted ---------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        """An EventLog listener: what is received, delivery outcomes, and what the inbound
        path reports later (asynchronous bounces, complaints, ARF opt-outs)."""
        kind = event.get("type")
        if kind == "Reception":
            self._received(event)
        elif event.get("source") == "async":
            self._feedback(event)
        elif kind in OUTCOME_EVENTS and "attempt" in event and event.get("account"):
            if event.get("dsn") or event.get("notice"):
                return
            outcome = outcome_kind(event)
            if outcome is not None:
                self.pending.outcomes.append(Outcome(
                    outcome, event["account"], event.get("campaign", ""),
                    str(event.get("recipient", "")), True, str(event.get("reply", ""))[:300]))

    def _feedback(self, event: dict[str, Any]) -> None:
        kind = {"Complaint": "complaint", "Unsubscribe": "unsubscribe"}.get(event["type"])
        if event["type"] == "Bounce" and event.get("kind") in ("hard", "soft"):
            kind = event["kind"]
        if kind is not None and event.get("recipient"):
            detail = f"{event.get('reason') or ''} {event.get('status') or ''}".strip()
            self.record_event(kind, str(event.get("account") or ""),
                              str(event.get("campaign") or ""), str(event["recipient"]), detail,
                              str(event.get("id") or ""))

    def _received(self, event: dict[str, Any]) -> None:
        message_id = str(event.get("id", ""))
        self.reservations.drop(message_id)
        account = event.get("account")
        if account:
            ts = float(event.get("time") or self.clock())
            self.pending.submissions.append(Submission(
                account, event.get("campaign", ""), int(event.get("recipients", 0)),
                month_of(ts), self.shared.consumed(message_id)))

    def record_event(self, kind: str, account: str, campaign: str, recipient: str,
                     detail: str = "", message_id: str = "") -> None:
        """Feedback that arrives after delivery: kind hard | soft | complaint | unsubscribe.

        An empty account is looked up from the campaign (when one account has it).
        Written with the next batch; hard bounces, complaints and unsubscribes suppress
        the address; complaints and unsubscribes count once per address and campaign.
        """
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"unknown feedback kind {kind!r}")
        self.pending.outcomes.append(Outcome(kind, account, campaign, recipient, False,
                                             detail[:300], message_id))

    def record_bounce(self, result: Any, account: str = "", campaign: str = "") -> str | None:
        """Record a parsed inbound report (mta.bounce.BounceResult); the kind recorded."""
        kind = {"hard": "hard", "soft": "soft", "complaint": "complaint"}.get(result.kind)
        if kind == "complaint" and (result.feedback_type or "").lower() == "opt-out":
            kind = "unsubscribe"
        if kind is None or not result.recipient:
            return None
        self.record_event(kind, account, campaign or result.campaign or "", result.recipient,
                          f"{result.reason} {result.status or ''}".strip())
        return kind

    # --- writing it ------------------------------------------------------------------

    async def flush(self) -> Applied | None:
        """Write what was counted since the last flush (one transaction).

        A batch that fails is written again one entry at a time, so that one entry that
        can never be written (logged once, then dropped) does not hold back the others.
        """
        if not self.pending:
            return None
        batch, self.pending = self.pending, Batch()
        self._flushing = batch
        try:
            applied = await self.apply(batch)
        except SpoolFullError:
            log.warning("policy counters wait: the spool is full")
            batch.extend(self.pending)
            self.pending = batch
            return None
        except Exception:
            log.exception("policy counters not written as one batch; writing them one by one")
            applied = await self._apply_each(batch)
        finally:
            self._flushing = Batch()
        await self.announce(applied)
        return applied

    async def _apply_each(self, batch: Batch) -> Applied:
        applied = Applied()
        singles = [Batch(submissions=[s]) for s in batch.submissions] + [
            Batch(outcomes=[o]) for o in batch.outcomes]
        for single in singles:
            try:
                applied.merge(await self.apply(single))
            except SpoolFullError:
                self.pending.extend(single)  # no room now: kept for the next flush
            except Exception as exc:
                self.counts["count_failures"] += 1
                log.error("policy: dropped one entry that cannot be counted (%s): %s",
                          shown(repr(single)[:300]), shown(str(exc), 200))
        return applied

    async def apply(self, batch: Batch,
                    events_of: Callable[[Applied], list[dict[str, Any]]] | None = None
                    ) -> Applied:
        """Count a batch (and share it; on several nodes it is judged on the totals).
        The events of what it did (`events_of(applied)`, then its pauses) are built in
        its transaction, in `applied.events`, and recorded there when an outbox is kept."""
        now = self.clock()

        def op(txn: Any) -> Applied:
            applied = self.ledger.apply(txn, batch, now)
            applied.events = [*(events_of(applied) if events_of else []),
                              *(self.pause_event(pause) for pause in applied.pauses)]
            if self.record_events is not None and applied.events:
                self.record_events(txn, applied.events)
            return applied

        applied: Applied = await self.committer.submit(op)
        await self.shared.counted(batch, applied)
        return applied

    @staticmethod
    def pause_event(pause: Pause) -> dict[str, Any]:
        return {"type": "CampaignPaused", "account": pause.account,
                "campaign": pause.campaign, "rule": pause.breach.rule,
                "rate": round(pause.breach.rate, 4),
                "threshold": pause.breach.threshold, "count": pause.breach.count,
                "base": pause.breach.base, "reason": pause.breach.describe(),
                "by": "policy", "notice": pause.notice_id}

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.pc.flush_interval)
            try:
                await self.flush()
            except Exception:
                log.exception("policy flush failed")

    async def announce(self, applied: Applied) -> None:
        """Announce pauses, then hold the paused campaigns' mail that is not due yet."""
        if not applied.pauses:
            return
        self.cache.refresh()
        for pause in applied.pauses:
            self.counts["pauses"] += 1
            self.counts[f"pauses_{pause.breach.rule}"] += 1
            log.warning("campaign %s of account %s paused: %s", pause.campaign, pause.account,
                        pause.breach.describe())
            self.emit(next((e for e in applied.events if e["type"] == "CampaignPaused"
                            and (e["account"], e["campaign"]) == (pause.account, pause.campaign)),
                           None) or self.pause_event(pause))
            await self.committer.submit(hold_campaign_op(
                self.store, pause.account, pause.campaign, int(self.clock() * 1000)))

    def _notice(self, account: str, campaign: str, breach: Breach,
                replies: list[ReplyCount]) -> NewMessage | None:
        config = self.accounts.get(account)
        if config is None or not config.email:
            return None
        hostname = self.cfg.engine.hostname
        return pause_notice(config.email, notice_sender(self.pc.notice_from, hostname),
                            hostname, account, campaign, breach, self.clock(), replies)
