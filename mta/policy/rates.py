"""A campaign's rates against the contract's thresholds: plain functions, no I/O.

- hard bounce rate: hard bounces over the campaign's sent mail (mail that reached a
  final outcome: delivered or bounced), paused at or above the threshold (8-15 %);
- complaint rate: complaints over its delivered mail, paused above 0.5 %;
- unsubscribe rate: unsubscribes over its delivered mail, paused above 1 %;

all judged only once `min_volume` mail has been sent, so a small start does not trip them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mta.policy.model import Counters

RULES = ("hard_bounce", "complaint", "unsubscribe")
RULE_NAMES = {"hard_bounce": "hard bounce rate", "complaint": "complaint rate",
              "unsubscribe": "unsubscribe rate"}


@dataclass(frozen=True)
class Thresholds:
    hard_bounce_rate: float = 8.0  # percent
    complaint_rate: float = 0.5
    unsubscribe_rate: float = 1.0
    min_volume: int = 200

    @classmethod
    def from_config(cls, cfg: Any) -> Thresholds:
        return cls(cfg.hard_bounce_rate, cfg.complaint_rate, cfg.unsubscribe_rate,
                   cfg.min_volume)


@dataclass(frozen=True)
class Breach:
    """A threshold a campaign crossed."""

    rule: str
    count: int
    base: int
    rate: float  # percent
    threshold: float  # percent

    def describe(self) -> str:
        """'hard bounce rate 10.5% (21 of 200 sent) reached the threshold of 8%'."""
        base_name = "sent" if self.rule == "hard_bounce" else "delivered"
        crossed = "reached" if self.rule == "hard_bounce" else "exceeded"
        return (f"{RULE_NAMES[self.rule]} {fmt_percent(self.rate)} ({self.count} of "
                f"{self.base} {base_name}) {crossed} the threshold of "
                f"{fmt_percent(self.threshold)}")


def fmt_percent(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") + "%"


def percent(count: int, base: int) -> float:
    return 100.0 * count / base if base > 0 else 0.0


def campaign_rates(c: Counters) -> dict[str, float]:
    """The three rates in percent (0 when nothing was sent or delivered yet)."""
    return {
        "hard_bounce": percent(c.hard, c.sent),
        "complaint": percent(c.complaints, c.delivered),
        "unsubscribe": percent(c.unsubscribes, c.delivered),
    }


def find_breach(c: Counters, t: Thresholds) -> Breach | None:
    """The first threshold `c` crosses, or None (also None below the minimum volume)."""
    if c.sent < t.min_volume:
        return None
    hard = percent(c.hard, c.sent)
    if hard >= t.hard_bounce_rate:
        return Breach("hard_bounce", c.hard, c.sent, hard, t.hard_bounce_rate)
    complaints = percent(c.complaints, c.delivered)
    if c.complaints and complaints > t.complaint_rate:
        return Breach("complaint", c.complaints, c.delivered, complaints, t.complaint_rate)
    unsubscribes = percent(c.unsubscribes, c.delivered)
    if c.unsubscribes and unsubscribes > t.unsubscribe_rate:
        return Breach("unsubscribe", c.unsubscribes, c.delivered, unsubscribes,
                      t.unsubscribe_rate)
    return None


def monthly_cap(subscriber_level: int, factor: int) -> int | None:
    """The most e-mails an account may send in a calendar month; None: no cap.

    A subscriber level of 0 (or below) means "not set": no cap. Set the level for every
    account the contract applies to.
    """
    return factor * subscriber_level if subscriber_level > 0 and factor > 0 else None
