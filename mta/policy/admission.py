"""What the contract lets in at intake: account and campaign states, suppressions, limits.

`Admission` answers intake's questions (a refusal reply, or None): MAIL FROM of an
account (suspended? over its limits?), RCPT TO (suppressed for that account?), the
message (campaign paused? trial or monthly limit passed?). A trial account's mail is
held for review. A message of a limited account reserves its recipients until it is
stored (then it is counted) or its commit fails (the reservation expires), so that
concurrent sessions cannot all pass a cap.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mta.config import AccountConfig, Config
from mta.policy.model import (
    DROPPED,
    PAUSED,
    REVIEW,
    AccountState,
    CampaignState,
    month_of,
    normalize_address,
)
from mta.policy.rates import monthly_cap
from mta.policy.shared import LocalPolicy, SharedPolicy
from mta.policy.snapshot import SnapshotCache
from mta.policy.store import PolicyStore, account_key, month_key
from mta.queue.spool import NewMessage
from mta.text import shown

SUPPRESSION_WORDS = {"hard-bounce": "hard bounce", "complaint": "complaint",
                     "unsubscribe": "unsubscribed", "manual": "added by an operator",
                     "import": "imported"}
RESERVATION_GRACE = 5.0


def printable(text: str) -> str:
    """Text from outside as an SMTP reply may carry it."""
    return shown(text, 200, ascii_only=True)


def account_refusal(name: str, state: AccountState) -> str:
    if state.status in ("suspended",):
        return f"550 5.7.1 Account {name} is suspended: {printable(state.reason)}"
    return f"550 5.7.1 Account {name} is closed and may not send mail"


def campaign_refusal(account: str, campaign: str, state: CampaignState) -> str:
    name = printable(campaign)
    if state.status == DROPPED:
        return f"550 5.7.1 Campaign {name} of account {account} was dropped by an operator"
    return f"550 5.7.1 Campaign {name} of account {account} is paused: {printable(state.reason)}"


@dataclass
class Reservation:
    account: str
    count: int
    expires: float  # monotonic; not stored by then: its commit failed
    month: str


class Reservations:
    """Recipients of messages admitted but not stored (and so not counted) yet."""

    def __init__(self, hold_for: float) -> None:
        self.hold_for = hold_for
        self._by_message: dict[str, Reservation] = {}

    def add(self, message_id: str, account: str, count: int, month: str) -> None:
        self._by_message[message_id] = Reservation(
            account, count, time.monotonic() + self.hold_for, month)

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._by_message

    def drop(self, message_id: str) -> None:
        """The message was stored (it is counted now), or refused after all."""
        self._by_message.pop(message_id, None)

    def of(self, account: str, month: str) -> tuple[int, int]:
        """(all, this month's) recipients reserved by `account`."""
        now = time.monotonic()
        for mid in [m for m, r in self._by_message.items() if r.expires < now]:
            del self._by_message[mid]  # its commit failed: intake answered 4xx
        mine = [r for r in self._by_message.values() if r.account == account]
        return sum(r.count for r in mine), sum(r.count for r in mine if r.month == month)


UnwrittenCount = Callable[[str, str | None], int]


class Admission:
    def __init__(self, cfg: Config, store: PolicyStore, cache: SnapshotCache,
                 reservations: Reservations, counts: Counter[str], unwritten: UnwrittenCount,
                 clock: Callable[[], float]) -> None:
        self.pc = cfg.policy
        self.store = store
        self.cache = cache
        self.counts = counts
        self.unwritten = unwritten  # submissions counted in memory, not written yet
        self.clock = clock
        self.accounts: dict[str, AccountConfig] = {a.name: a for a in cfg.accounts}
        self.reservations = reservations
        self.shared: SharedPolicy = LocalPolicy()  # PolicyGuard.share may plug in another

    def check_mail(self, account: str, sender: Any) -> str | None:
        state = self.cache.get().accounts.get(account)
        if state is not None:
            return self._refuse("account", account_refusal(account, state))
        return self._cap_refusal(account, 1)

    def check_rcpt(self, account: str, rcpt: str) -> str | None:
        address = normalize_address(rcpt)
        with self.store.read() as txn:
            entry = self.store.get_suppression(txn, account, address)
        if entry is None:
            return None
        why = SUPPRESSION_WORDS.get(entry.reason, entry.reason)
        return self._refuse("suppressed", f"550 5.7.1 <{address}> is on the suppression list "
                                          f"of account {account} ({why}); not sent")

    def check_message(self, message: NewMessage) -> str | None:
        if not message.account:
            return None
        account, campaign = message.account, message.campaign
        snap = self.cache.get()
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
            self.reservations.add(message.id, account, len(message.recipients),
                                  month_of(self.clock()))
        return None

    async def admit(self, message: NewMessage) -> str | None:
        """`check_message`, then the limits shared with other nodes."""
        refusal = self.check_message(message)
        if refusal or message.id not in self.reservations:
            return refusal
        refusal = await self.shared.reserve(message.id, message.account,
                                            len(message.recipients))
        if refusal:
            self.reservations.drop(message.id)
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
        if not self._limited(account):
            return None
        month = month_of(self.clock())
        total, monthly = self.shared.known_usage(account, month, *self.usage(account, month))
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
        reserved, reserved_month = self.reservations.of(account, month)
        return (total + self.unwritten(account, None) + reserved,
                monthly + self.unwritten(account, month) + reserved_month)
