"""The policy guard in a worker: intake checks, delivery holds, counting, unsubscribes.

One `PolicyGuard` per worker process. What must be shared between workers (counters,
pauses, suspensions, suppression lists) is in the spool's LMDB environment; each
worker keeps a copy of the pauses and suspensions for at most `[policy] cache_ttl`
seconds, so a pause decided by another worker or by `mta campaign pause` is honoured
by every worker within a second. Counting is batched: events feed a `Batch` that is
written every `flush_interval` through the group committer (`Ledger.apply`).

Hooks (see the package docstring for the wiring):

- intake: `check_mail`, `check_rcpt`, `check_message` (replies to refuse, or None);
- scheduler / deliverer: `hold_reason(item)` before delivering, `hold_item(item, why)`;
- deliverer: `transform(item, sender, data)`, inserted before DKIM signing;
- event log listener: `on_event(event)` (Reception and delivery outcomes);
- inbound path: its Bounce/Complaint/Unsubscribe events (source "async") through
  `on_event`; the unsubscribe mailbox `unsubscribe_mailbox(rcpt, data)`; or directly
  `record_event(...)`, `record_bounce(...)`, `unsubscribe_mail(...)`;
- HTTP one-click: `unsubscribe(token)`.
"""

from __future__ import annotations

import asyncio
import email.policy
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import parseaddr
from typing import Any

from mta.bounce import classify_reply
from mta.config import AccountConfig, Config
from mta.policy import jobs
from mta.policy.footer import add_footer
from mta.policy.headers import HeaderInjection, Unsubscriber
from mta.policy.ledger import Applied, Batch, Ledger, Outcome, Submission
from mta.policy.model import (
    ACTIVE,
    DROPPED,
    PAUSED,
    REVIEW,
    AccountState,
    CampaignState,
    account_hold,
    campaign_hold,
    month_of,
    normalize_address,
)
from mta.policy.notice import notice_sender, pause_notice, printable
from mta.policy.rates import Breach, Thresholds, monthly_cap
from mta.policy.retention import (
    PurgeReport,
    due_accounts,
    log_report,
    purge_account_records,
    purge_event_logs,
)
from mta.policy.store import PolicyStore, account_key, month_key
from mta.policy.tokens import UnsubscribeTarget, find_token, read_token
from mta.queue.commit import GroupCommitter
from mta.queue.outcome import all_recipients
from mta.queue.spool import NewMessage, Spool

log = logging.getLogger("mta.policy")

OUTCOME_EVENTS = ("Delivery", "Bounce", "Expiration")
SUPPRESSION_WORDS = {"hard-bounce": "hard bounce", "complaint": "complaint",
                     "unsubscribe": "unsubscribed", "manual": "added by an operator",
                     "import": "imported"}
RESERVATION_GRACE = 5.0
PURGE_INTERVAL = 86400.0
PURGE_SETTLE = 2.0


class InvalidUnsubscribe(ValueError):
    """A forged, altered or malformed unsubscribe token."""


@dataclass
class Snapshot:
    """Campaigns and accounts that are not active, as one worker last read them."""

    campaigns: dict[tuple[str, str], CampaignState] = field(default_factory=dict)
    accounts: dict[str, AccountState] = field(default_factory=dict)


@dataclass(frozen=True)
class UnsubscribeResult:
    account: str
    campaign: str
    recipient: str
    counted: bool  # False: this address had already unsubscribed from this campaign


def load_snapshot(store: PolicyStore, txn: Any) -> Snapshot:
    snap = Snapshot()
    for key, data in store.states(txn):
        if data.get("status", ACTIVE) == ACTIVE:
            continue
        if key.startswith(b"C"):
            account, _, campaign = key[1:].partition(b"\0")
            snap.campaigns[(account.decode(), campaign.decode())] = CampaignState.from_dict(data)
        elif key.startswith(b"A"):
            snap.accounts[key[1:].decode()] = AccountState.from_dict(data)
    return snap


def account_refusal(name: str, state: AccountState) -> str:
    if state.status in ("suspended",):
        return f"550 5.7.1 Account {name} is suspended: {printable(state.reason)}"
    return f"550 5.7.1 Account {name} is closed and may not send mail"


def campaign_refusal(account: str, campaign: str, state: CampaignState) -> str:
    name = printable(campaign)
    if state.status == DROPPED:
        return f"550 5.7.1 Campaign {name} of account {account} was dropped by an operator"
    return f"550 5.7.1 Campaign {name} of account {account} is paused: {printable(state.reason)}"


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


class PolicyGuard:
    def __init__(self, cfg: Config, spool: Spool, committer: GroupCommitter,
                 emit: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.pc = cfg.policy
        self.spool = spool
        self.committer = committer
        self.emit = emit or (lambda event: None)
        self.clock = clock
        self.store = PolicyStore(spool)
        self.thresholds = Thresholds.from_config(cfg.policy)
        self.ledger = Ledger(self.store, self.thresholds, self._notice)
        self.accounts: dict[str, AccountConfig] = {a.name: a for a in cfg.accounts}
        self.local_domains = {d.lower() for d in (cfg.bounce.domain, cfg.bounce.fbl_domain,
                                                  *cfg.smtp.local_domains) if d}
        self.pending = Batch()
        self._flushing = Batch()
        self._reserved: dict[str, tuple[str, int, float, str]] = {}
        self._snapshot = Snapshot()
        self._loaded_at = float("-inf")
        self.unsubscriber: Unsubscriber | None = None
        self.secret = b""
        self.counts: Counter[str] = Counter()  # for metrics
        self._tasks: list[asyncio.Task[None]] = []
        self.cluster: Any = None  # mta.cluster.policy.PolicySync on several nodes

    # --- life cycle -----------------------------------------------------------

    async def start(self, daily_purge: bool = False) -> None:
        """Load the unsubscribe key (made once per spool), start batching (and the purge)."""
        if self.pc.unsubscribe_secret:
            self.secret = self.pc.unsubscribe_secret.encode()
        else:
            self.secret = await self.committer.submit(self.store.ensure_secret)
        self.unsubscriber = make_unsubscriber(self.cfg, self.secret)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._flush_loop()))
        if daily_purge:
            self._tasks.append(loop.create_task(self._purge_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            while not task.done():  # again if a cancellation got lost (asyncio.wait_for)
                task.cancel()
                await asyncio.wait([task], timeout=0.2)
        self._tasks.clear()
        await self.flush()

    # --- shared state, cached ---------------------------------------------------

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        if now - self._loaded_at >= self.pc.cache_ttl:
            with self.store.read() as txn:
                self._snapshot = load_snapshot(self.store, txn)
            self._loaded_at = now
        return self._snapshot

    def refresh(self) -> None:
        self._loaded_at = float("-inf")

    # --- intake -------------------------------------------------------------------

    def check_mail(self, account: str, sender: Any) -> str | None:
        if not self.pc.enabled:
            return None
        state = self.snapshot().accounts.get(account)
        if state is not None:
            return self._refuse("account", account_refusal(account, state))
        return self._cap_refusal(account, 1)

    def check_rcpt(self, account: str, rcpt: str) -> str | None:
        if not self.pc.enabled:
            return None
        address = normalize_address(rcpt)
        with self.store.read() as txn:
            entry = self.store.get_suppression(txn, account, address)
        if entry is None:
            return None
        why = SUPPRESSION_WORDS.get(entry.reason, entry.reason)
        return self._refuse("suppressed", f"550 5.7.1 <{address}> is on the suppression list "
                                          f"of account {account} ({why}); not sent")

    def check_message(self, message: NewMessage) -> str | None:
        if not self.pc.enabled or not message.account:
            return None
        account, campaign = message.account, message.campaign
        snap = self.snapshot()
        if account in snap.accounts:
            return self._refuse("account", account_refusal(account, snap.accounts[account]))
        state = snap.campaigns.get((account, campaign)) if campaign else None
        if state is not None and state.status in (PAUSED, DROPPED):
            return self._refuse("paused", campaign_refusal(account, campaign, state))
        refusal = self._cap_refusal(account, len(message.recipients))
        if refusal:
            return refusal
        config = self.accounts.get(account)
        if config is not None and config.plan == "trial":
            message.hold = REVIEW
            self.counts["held_review"] += 1
        if self._limited(account):
            self._reserve(message.id, account, len(message.recipients))
        return None

    async def admit(self, message: NewMessage) -> str | None:
        """`check_message`, then (several nodes) the cluster-wide trial and monthly limits."""
        refusal = self.check_message(message)
        if refusal or self.cluster is None or message.id not in self._reserved:
            return refusal
        refusal = await self.cluster.reserve(message.id, message.account,
                                             len(message.recipients))
        if refusal:
            self._reserved.pop(message.id, None)
        return refusal

    def _limited(self, account: str) -> bool:
        config = self.accounts.get(account)
        return config is not None and (config.plan == "trial" or monthly_cap(
            config.subscriber_level, self.pc.monthly_cap_factor) is not None)

    def _refuse(self, why: str, reply: str) -> str:
        self.counts[f"refused_{why}"] += 1
        return reply

    def _cap_refusal(self, account: str, count: int) -> str | None:
        """The refusal when `count` more e-mails would pass a trial or monthly limit."""
        config = self.accounts.get(account)
        if config is None or not self._limited(account):
            return None
        month = month_of(self.clock())
        total, monthly = self.usage(account, month)
        if self.cluster is not None:
            total, monthly = self.cluster.known_usage(account, month, total, monthly)
        return self.limit_reply(account, count, total, monthly, month)

    def limits(self, account: str) -> tuple[int | None, int | None]:
        """(trial limit, monthly cap) of an account; None where it has none."""
        config = self.accounts.get(account)
        if config is None:
            return None, None
        trial = self.pc.trial_limit if config.plan == "trial" else None
        return trial, monthly_cap(config.subscriber_level, self.pc.monthly_cap_factor)

    def limit_reply(self, account: str, count: int, total: int, monthly: int, month: str,
                    note: str = "") -> str | None:
        """The refusal when `count` more e-mails pass the account's trial or monthly limit,
        `total` and `monthly` sent already."""
        config = self.accounts[account]
        cap = monthly_cap(config.subscriber_level, self.pc.monthly_cap_factor)
        if config.plan == "trial" and total + count > self.pc.trial_limit:
            return self._refuse("trial", (
                f"550 5.7.1 Trial account {account} may send at most {self.pc.trial_limit} "
                f"e-mails in all; {total} already sent{note}"))
        if cap is not None and monthly + count > cap:
            return self._refuse("monthly_cap", (
                f"452 4.7.1 Monthly limit reached: account {account} may send {cap} e-mails "
                f"in {month} ({self.pc.monthly_cap_factor} x subscriber level "
                f"{config.subscriber_level}); {monthly} already sent{note}"))
        return None

    def usage(self, account: str, month: str) -> tuple[int, int]:
        """(all-time, this month's) e-mails submitted, counting what is not written yet."""
        with self.store.read() as txn:
            total = self.store.get_counters(txn, account_key(account)).submitted
            monthly = self.store.get_counters(txn, month_key(account, month)).submitted
        local = self.pending.submitted_by(account) + self._flushing.submitted_by(account)
        local_month = (self.pending.submitted_by(account, month)
                       + self._flushing.submitted_by(account, month))
        reserved = self._reserved_by(account, month)
        return total + local + reserved[0], monthly + local_month + reserved[1]

    def _reserve(self, message_id: str, account: str, count: int) -> None:
        expires = time.monotonic() + self.cfg.smtp.commit_timeout + RESERVATION_GRACE
        self._reserved[message_id] = (account, count, expires, month_of(self.clock()))

    def _reserved_by(self, account: str, month: str) -> tuple[int, int]:
        now = time.monotonic()
        for mid in [m for m, r in self._reserved.items() if r[2] < now]:
            del self._reserved[mid]  # its commit failed: intake answered 4xx
        mine = [r for r in self._reserved.values() if r[0] == account]
        return sum(r[1] for r in mine), sum(r[1] for r in mine if r[3] == month)

    # --- delivery -----------------------------------------------------------------

    def hold_reason(self, item: Any) -> str | None:
        """Why this due item must not be delivered now (hold its job), or None."""
        if not self.pc.enabled:
            return None
        message = item.message
        account = message.get("account", "")
        if (not account or message.get("notice") or message.get("dsn_for")
                or item.domain in self.local_domains):
            return None
        snap = self.snapshot()
        if account in snap.accounts:
            return account_hold(account)
        campaign = message.get("campaign", "")
        if campaign and (account, campaign) in snap.campaigns:
            state = snap.campaigns[(account, campaign)]
            if state.status in (PAUSED, DROPPED):
                return campaign_hold(account, campaign)
        return None

    def hold_op(self, item: Any, reason: str) -> Callable[[Any], str]:
        """An operation holding the item's job: 'held', 'gone' (removed or held already)
        or 'stale' (the pause or suspension was lifted since this worker last looked)."""

        def hold(txn: Any) -> str:
            job = self.spool.get_job(txn, item.job_id)
            if job is None or job.get("held"):
                return "gone"
            if not self._still_holds(txn, job, reason):
                return "stale"
            self.spool.hold_job(txn, item.job_id, job, reason)
            return "held"

        return hold

    def _still_holds(self, txn: Any, job: dict[str, Any], reason: str) -> bool:
        account = job.get("account", "")
        if reason == account_hold(account):
            return self.store.get_account(txn, account).status != ACTIVE
        state = self.store.get_campaign(txn, account, job.get("campaign", ""))
        return state.status in (PAUSED, DROPPED)

    async def hold_item(self, item: Any, reason: str) -> bool:
        """Hold a due item's job (the scheduler then forgets the item); True if held."""
        result = await self.committer.submit(self.hold_op(item, reason))
        if result == "stale":
            self.refresh()  # the item stays due and goes out at the next scan
        elif result == "held":
            self.counts["held_paused"] += 1
        return result == "held"

    def transform(self, item: Any, sender: str, data: bytes) -> tuple[str, bytes]:
        """Footer (not for pro accounts) and List-Unsubscribe (campaign mail); before DKIM."""
        message = item.message
        if not self.pc.enabled or not sender or message.get("notice") or message.get("dsn_for"):
            return sender, data
        account, campaign = message.get("account", ""), message.get("campaign", "")
        config = self.accounts.get(account)
        if config is not None and config.plan != "pro" and self.pc.footer_text:
            data = self._with_footer(message, data)
        if campaign and self.unsubscriber is not None:
            rcpts = all_recipients(item.job)
            try:
                data = self.unsubscriber.apply(data, account, campaign,
                                               rcpts[0] if len(rcpts) == 1 else "")
                self.counts["list_unsubscribe"] += 1
            except HeaderInjection:
                log.error("no List-Unsubscribe for %s: unsafe header value", message.get("id"))
        return sender, data

    def _with_footer(self, message: dict[str, Any], data: bytes) -> bytes:
        try:
            out = add_footer(data, self.pc.footer_text, self.pc.footer_html)
        except Exception:
            log.exception("footer not added to %s", message.get("id"))
            return data
        self.counts["footers"] += out is not data
        return out

    # --- counting ---------------------------------------------------------------------

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
                              str(event.get("campaign") or ""), str(event["recipient"]), detail)

    def _received(self, event: dict[str, Any]) -> None:
        message_id = str(event.get("id", ""))
        self._reserved.pop(message_id, None)
        account = event.get("account")
        if account:
            ts = float(event.get("time") or self.clock())
            shared = self.cluster is not None and self.cluster.consumed(message_id)
            self.pending.submissions.append(Submission(
                account, event.get("campaign", ""), int(event.get("recipients", 0)),
                month_of(ts), shared))

    def record_event(self, kind: str, account: str, campaign: str, recipient: str,
                     detail: str = "") -> None:
        """Feedback that arrives after delivery: kind hard | soft | complaint | unsubscribe.

        An empty account is looked up from the campaign (when one account has it).
        Written with the next batch; hard bounces, complaints and unsubscribes suppress
        the address; complaints and unsubscribes count once per address and campaign.
        """
        if kind not in ("hard", "soft", "complaint", "unsubscribe"):
            raise ValueError(f"unknown feedback kind {kind!r}")
        self.pending.outcomes.append(Outcome(kind, account, campaign, recipient, False,
                                             detail[:300]))

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

    async def flush(self) -> Applied | None:
        """Write what was counted since the last flush (one transaction)."""
        if not self.pending:
            return None
        batch, self.pending = self.pending, Batch()
        self._flushing = batch
        try:
            applied = await self._apply(batch)
        except Exception:
            log.exception("policy counters not written; retrying with the next batch")
            batch.extend(self.pending)
            self.pending = batch
            return None
        finally:
            self._flushing = Batch()
        await self._after(applied)
        return applied

    async def _apply(self, batch: Batch) -> Applied:
        """Count a batch (and, on several nodes, share it and judge on cluster totals)."""
        now = self.clock()
        applied: Applied = await self.committer.submit(
            lambda txn: self.ledger.apply(txn, batch, now))
        if self.cluster is not None:
            await self.cluster.counted(batch, applied)
        return applied

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.pc.flush_interval)
            try:
                await self.flush()
            except Exception:
                log.exception("policy flush failed")

    async def _after(self, applied: Applied) -> None:
        """Announce pauses, then hold the paused campaigns' mail that is not due yet."""
        if not applied.pauses:
            return
        self.refresh()
        for pause in applied.pauses:
            self.counts["pauses"] += 1
            self.counts[f"pauses_{pause.breach.rule}"] += 1
            log.warning("campaign %s of account %s paused: %s", pause.campaign, pause.account,
                        pause.breach.describe())
            self.emit({"type": "CampaignPaused", "account": pause.account,
                       "campaign": pause.campaign, "rule": pause.breach.rule,
                       "rate": round(pause.breach.rate, 4),
                       "threshold": pause.breach.threshold, "count": pause.breach.count,
                       "base": pause.breach.base, "reason": pause.breach.describe(),
                       "by": "policy", "notice": pause.notice_id})
            await self.committer.submit(self._hold_campaign_op(pause.account, pause.campaign))

    def _hold_campaign_op(self, account: str, campaign: str) -> Callable[[Any], int]:
        def hold(txn: Any) -> int:
            found = jobs.find_jobs(self.spool, txn, account, campaign)
            return jobs.hold_waiting(self.spool, txn, found, campaign_hold(account, campaign),
                                     int(self.clock() * 1000))

        return hold

    def _notice(self, account: str, campaign: str, breach: Breach) -> NewMessage | None:
        config = self.accounts.get(account)
        if config is None or not config.email:
            return None
        hostname = self.cfg.engine.hostname
        return pause_notice(config.email, notice_sender(self.pc.notice_from, hostname),
                            hostname, account, campaign, breach, self.clock())

    # --- unsubscribes -------------------------------------------------------------------

    def token_for(self, account: str, campaign: str, recipient: str) -> str:
        if self.unsubscriber is None:
            raise RuntimeError("the policy guard is not started")
        return self.unsubscriber.token(account, campaign, recipient)

    def read_token(self, token: str) -> UnsubscribeTarget:
        target = read_token(self.secret, token)
        if target is None:
            self.counts["forged_tokens"] += 1
            raise InvalidUnsubscribe("this unsubscribe link is not valid")
        return target

    async def unsubscribe(self, token: str, via: str = "one-click",
                          recipient: str = "") -> UnsubscribeResult:
        """Record an unsubscribe: suppress the address, count it toward the campaign's rate.

        Raises InvalidUnsubscribe for a forged, altered or malformed token. Durable when
        it returns (the HTTP endpoint answers after this).
        """
        target = self.read_token(token)
        address = target.recipient or normalize_address(recipient)
        await self.flush()  # judge against everything counted so far
        batch = Batch(outcomes=[Outcome("unsubscribe", target.account, target.campaign,
                                        address, False, via)])
        applied = await self._apply(batch)
        counted = applied.counted > 0
        self.counts["unsubscribes"] += counted
        self.emit({"type": "Unsubscribe", "account": target.account,
                   "campaign": target.campaign, "recipient": address, "via": via,
                   "counted": counted})
        await self._after(applied)
        return UnsubscribeResult(target.account, target.campaign, address, counted)

    async def unsubscribe_mail(self, subject: str, rcpt_to: str = "",
                               sender: str = "") -> UnsubscribeResult:
        """A mail to the List-Unsubscribe mailto: the token is in its subject (or in the
        local part after '+'); `sender` stands for the recipient when the token has none."""
        token = find_token(subject) or find_token(rcpt_to.partition("@")[0].partition("+")[2])
        if token is None:
            self.counts["forged_tokens"] += 1
            raise InvalidUnsubscribe("no unsubscribe token in this mail")
        return await self.unsubscribe(token, via="mailto", recipient=sender)

    async def unsubscribe_mailbox(self, rcpt: str, data: bytes) -> tuple[int, str]:
        """The inbound handler of the List-Unsubscribe mailto (`[policy] unsubscribe_mailbox`):
        the token from the subject (or the address), the recipient from From: when the
        token names none. Answers 250 even to a bad request (no backscatter)."""
        headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        sender = parseaddr(str(headers.get("From", "")))[1]
        try:
            result = await self.unsubscribe_mail(str(headers.get("Subject", "")), rcpt, sender)
        except InvalidUnsubscribe as exc:
            return 250, f"2.0.0 ignored: {exc}"
        return 250, f"2.0.0 {result.recipient or 'recipient'} unsubscribed"

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
            if self.cluster is not None:  # its shared records go too
                await self.cluster.forget_account(account)
            log_report(report)
            self.emit({"type": "AccountPurged", "purged_account": account,
                       **{k: v for k, v in report.as_dict().items() if k != "account"}})
            reports.append(report)
        return reports

    async def _purge_loop(self) -> None:
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
