"""The policy guard's records: counters, campaign and account states, suppression entries.

Plain dataclasses that go to and from msgpack-able dicts; no I/O here.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from mta.address import address_key

COUNTER_FIELDS = ("submitted", "sent", "delivered", "hard", "soft", "complaints", "unsubscribes")

# Campaign and account statuses.
ACTIVE, PAUSED, DROPPED = "active", "paused", "dropped"
SUSPENDED, DELETED = "suspended", "deleted"

# Why an older version's resume turned automatic pausing off (no reason was asked then).
LEGACY_NO_GUARD = "resumed by an operator before resumed campaigns were judged again"

# Reasons in the spool's `held` db that the policy guard sets.
REVIEW = "review"


def campaign_hold(account: str, campaign: str) -> str:
    return f"campaign:{account}/{campaign}"


def account_hold(account: str) -> str:
    return f"account:{account}"


@dataclass
class Counters:
    """What happened to an account's or a campaign's mail (recipient counts).

    submitted: accepted at intake; sent: reached a final outcome at the remote end
    (delivered, or bounced hard or soft); the rest count themselves. Asynchronous bounces
    and complaints arrive after a delivery, so they do not add to `sent` again.
    """

    submitted: int = 0
    sent: int = 0
    delivered: int = 0
    hard: int = 0
    soft: int = 0
    complaints: int = 0
    unsubscribes: int = 0

    def add(self, other: Counters) -> None:
        for name in COUNTER_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def minus(self, base: Counters) -> Counters:
        return Counters(**{n: max(0, getattr(self, n) - getattr(base, n)) for n in COUNTER_FIELDS})

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in COUNTER_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Counters:
        data = data or {}
        return cls(**{n: int(data.get(n, 0)) for n in COUNTER_FIELDS})

    def __bool__(self) -> bool:
        return any(getattr(self, n) for n in COUNTER_FIELDS)


@dataclass
class CampaignState:
    """A campaign's standing. The guard judges it on the counters since `baseline` (a
    resume starts a fresh window); `no_guard`, an operator's reason, turns that off."""

    status: str = ACTIVE
    no_guard: str = ""  # why automatic pausing is off for it; empty: the guard judges it
    rule: str = ""  # hard_bounce | complaint | unsubscribe | operator
    reason: str = ""  # one sentence, quoted in refusals and notices
    rate: float = 0.0
    threshold: float = 0.0
    by: str = ""  # "policy" or the operator's name
    at: float = 0.0
    baseline: dict[str, int] = field(default_factory=dict)  # counters when re-armed

    @property
    def paused(self) -> bool:
        return self.status == PAUSED

    @property
    def guarded(self) -> bool:
        return not self.no_guard

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CampaignState:
        data = data or {}
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if data.get("checks") is False and not state.no_guard:  # a record of an older version
            state.no_guard = LEGACY_NO_GUARD
        return state


@dataclass
class AccountState:
    status: str = ACTIVE
    reason: str = ""
    by: str = ""
    at: float = 0.0
    purge_after: float = 0.0  # deleted accounts: when their data goes

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AccountState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


@dataclass
class Suppression:
    """An address an account may not mail again, and why."""

    address: str
    reason: str  # hard-bounce | complaint | unsubscribe | manual | import
    campaign: str = ""
    detail: str = ""
    at: float = field(default_factory=time.time)
    seen: list[str] = field(default_factory=list)  # "kind:campaign" already counted

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Suppression:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def normalize_address(address: str) -> str:
    """Suppression keys: the whole address lower-cased, without angle brackets."""
    return address_key(address)


def month_of(ts: float) -> str:
    """The calendar month (UTC) a submission counts toward: '2024-05'."""
    return time.strftime("%Y-%m", time.gmtime(ts))
