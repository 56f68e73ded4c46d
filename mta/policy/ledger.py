"""Counting what happens to mail, and pausing campaigns that cross a threshold.

A `Batch` gathers submissions and outcomes in a worker's event loop; `Ledger.apply`
writes it in one transaction in the spool writer thread: counters are read, added to
and written back (LMDB has one writer at a time across processes, so increments from
several workers never get lost), suppression entries are added, and every campaign
the batch touched is judged against the thresholds. A campaign that crosses one is
paused in the same transaction, and its account's notice is stored with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mta.policy.model import ACTIVE, PAUSED, CampaignState, Counters, Suppression
from mta.policy.notice import ReplyCount, frequent_replies
from mta.policy.rates import Breach, Thresholds, find_breach
from mta.policy.store import PolicyStore, account_key, campaign_key, month_key
from mta.queue.spool import NewMessage
from mta.text import shown

log = logging.getLogger("mta.policy")

KINDS = ("delivered", "hard", "soft", "complaint", "unsubscribe")
SUPPRESSION_REASONS = {"hard": "hard-bounce", "complaint": "complaint",
                       "unsubscribe": "unsubscribe"}
MAX_SEEN = 20


@dataclass
class Outcome:
    """One recipient's result or feedback.

    final: a delivery attempt's final result (counts as sent); false for what arrives
    later (an asynchronous bounce of mail already counted as delivered, a complaint).
    message_id: the message the feedback proved it is about: it counts once per
    message, recipient and kind.
    """

    kind: str
    account: str
    campaign: str
    recipient: str = ""
    final: bool = True
    detail: str = ""
    message_id: str = ""


@dataclass
class Submission:
    account: str
    campaign: str
    count: int
    month: str
    shared: bool = False  # already counted in the cluster's totals by a reservation


@dataclass
class Batch:
    submissions: list[Submission] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.submissions or self.outcomes)

    def extend(self, other: Batch) -> None:
        self.submissions.extend(other.submissions)
        self.outcomes.extend(other.outcomes)

    def submitted_by(self, account: str, month: str | None = None) -> int:
        return sum(s.count for s in self.submissions
                   if s.account == account and (month is None or s.month == month))


@dataclass
class Pause:
    account: str
    campaign: str
    breach: Breach
    notice_id: str = ""


@dataclass
class Applied:
    pauses: list[Pause] = field(default_factory=list)
    counted: int = 0  # outcomes counted (duplicates of feedback are not)
    unattributed: int = 0
    deltas: dict[bytes, Counters] = field(default_factory=dict)  # what was added, by key
    touched: list[tuple[str, str]] = field(default_factory=list)  # campaigns with outcomes
    events: list[dict[str, Any]] = field(default_factory=list)  # built in the transaction
    # (mta.policy.counting: pauses, unsubscribes), emitted as they are after the commit

    def merge(self, other: Applied) -> None:
        self.pauses += other.pauses
        self.events += other.events
        self.counted += other.counted
        self.unattributed += other.unattributed
        for key, delta in other.deltas.items():
            self.deltas.setdefault(key, Counters()).add(delta)
        self.touched = sorted(set(self.touched) | set(other.touched))


# (account, campaign, the breach, the replies most often behind it) -> the notice
NoticeMaker = Callable[[str, str, Breach, list[ReplyCount]], NewMessage | None]


def outcome_delta(kind: str, final: bool) -> Counters:
    delta = Counters()
    if kind == "delivered":
        delta.sent = delta.delivered = 1
    elif kind in ("hard", "soft"):
        setattr(delta, kind, 1)
        delta.sent = int(final)
    elif kind == "complaint":
        delta.complaints = 1
    elif kind == "unsubscribe":
        delta.unsubscribes = 1
    return delta


class Ledger:
    def __init__(self, store: PolicyStore, thresholds: Thresholds,
                 make_notice: NoticeMaker | None = None) -> None:
        self.store = store
        self.thresholds = thresholds
        self.make_notice = make_notice
        self.judge = True  # False: campaigns are judged on cluster totals (mta.cluster.policy)

    def apply(self, txn: Any, batch: Batch, now: float) -> Applied:
        deltas: dict[bytes, Counters] = {}
        touched: set[tuple[str, str]] = set()
        result = Applied()
        owners: dict[str, str] = {}

        def add(key: bytes, delta: Counters) -> None:
            deltas.setdefault(key, Counters()).add(delta)

        for s in batch.submissions:
            delta = Counters(submitted=s.count)
            add(account_key(s.account), delta)
            add(month_key(s.account, s.month), delta)
            if s.campaign:
                add(campaign_key(s.account, s.campaign), delta)
        for o in batch.outcomes:
            account = o.account or self._owner(txn, o.campaign, owners)
            if not account:
                result.unattributed += 1
                continue
            if not self._first(txn, o, now) or not self._record_suppression(txn, account, o, now):
                continue  # feedback already counted
            delta = outcome_delta(o.kind, o.final)
            add(account_key(account), delta)
            if o.campaign:
                add(campaign_key(account, o.campaign), delta)
                touched.add((account, o.campaign))
            result.counted += 1
        for key, delta in deltas.items():
            counters = self.store.get_counters(txn, key)
            counters.add(delta)
            self.store.put_counters(txn, key, counters)
        result.deltas, result.touched = deltas, sorted(touched)
        for account, campaign in result.touched if self.judge else ():
            pause = self.judge_with(txn, account, campaign, now)
            if pause is not None:
                result.pauses.append(pause)
        return result

    def _first(self, txn: Any, o: Outcome, now: float) -> bool:
        """False for feedback about a message and recipient already counted."""
        if o.final or not o.message_id:
            return True
        return self.store.first_feedback(txn, o.message_id, o.recipient, o.kind, now)

    def _record_suppression(self, txn: Any, account: str, o: Outcome, now: float) -> bool:
        """Suppress the address where the outcome calls for it; False: a repeat, not counted."""
        reason = SUPPRESSION_REASONS.get(o.kind)
        if reason is None or not o.recipient:
            return True
        entry = self.store.get_suppression(txn, account, o.recipient.lower())
        seen_key = f"{o.kind}:{o.campaign}"
        if entry is None:
            entry = Suppression(o.recipient.lower(), reason, o.campaign, o.detail[:300], now)
        elif o.kind != "hard" and seen_key in entry.seen:
            return False
        if o.kind != "hard":
            entry.seen = (entry.seen + [seen_key])[-MAX_SEEN:]
        self.store.put_suppression(txn, account, entry)
        return True

    def _owner(self, txn: Any, campaign: str, cache: dict[str, str]) -> str:
        """The account of a campaign named without one, when exactly one account has it."""
        if not campaign:
            return ""
        if campaign not in cache:
            owners = {a for a, c, _ in self.store.campaigns(txn) if c == campaign}
            cache[campaign] = owners.pop() if len(owners) == 1 else ""
        return cache[campaign]

    def judge_with(self, txn: Any, account: str, campaign: str, now: float,
                   counters: Counters | None = None, notify: bool = True) -> Pause | None:
        """Pause the campaign if `counters` (by default its own) cross a threshold;
        `notify` false: another node sends the account's notice."""
        state = self.store.get_campaign(txn, account, campaign)
        if state.status != ACTIVE or not state.guarded:
            return None
        if counters is None:
            counters = self.store.get_counters(txn, campaign_key(account, campaign))
        breach = find_breach(counters.minus(Counters.from_dict(state.baseline)), self.thresholds)
        if breach is None:
            return None
        self.store.put_campaign(txn, account, campaign, CampaignState(
            status=PAUSED, rule=breach.rule, reason=breach.describe(),
            rate=round(breach.rate, 4), threshold=breach.threshold, by="policy", at=now,
            baseline=state.baseline))
        pause = Pause(account, campaign, breach)
        notice = self._notice(txn, account, campaign, breach) if notify else None
        if notice is not None:
            self.store.spool.put_message(txn, notice)
            pause.notice_id = notice.id
        return pause

    def _notice(self, txn: Any, account: str, campaign: str, breach: Breach
                ) -> NewMessage | None:
        """The account's notice; one that cannot be made is logged and skipped: the pause
        and every other count of the batch stand."""
        if self.make_notice is None:
            return None
        try:
            replies = frequent_replies(self.store.suppressions(txn, account), campaign,
                                       breach.rule)
            return self.make_notice(account, campaign, breach, replies)
        except Exception as exc:
            log.error("no pause notice for campaign %s of account %s: %s",
                      shown(campaign, 200), shown(account, 200), shown(str(exc), 200))
            return None
