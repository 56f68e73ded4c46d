"""Warm-up of a new source address, as pure logic: the ramp of one (source, provider).

A warming source may carry, per day and per destination provider, at most the cap of its
current *step* of the schedule (``[egress.warmup] schedule``: messages per day; 0 means
unlimited). Days are calendar days in the configured time zone.

At the first look on a new day (``roll``) the ramp judges the signals of the last day it
was used at that provider (`Signals`: deliveries, hard bounces, complaints and "slow down" /
reputation deferrals) against `HealthLimits`:

- healthy: the step advances (up to the last step);
- unhealthy: it holds, or steps back when ``step_back`` is set;
- too few messages to judge: it holds.

Each change is a `Transition`, with the reason as text, which the gate turns into an event
(WarmupAdvanced, WarmupHeld, WarmupSteppedBack). No I/O here: the clock is passed in.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field, replace
from zoneinfo import ZoneInfo


class Verdict(enum.Enum):
    STARTED = "started"
    ADVANCED = "advanced"
    HELD = "held"
    STEPPED_BACK = "stepped_back"


EVENT_TYPES = {
    Verdict.ADVANCED: "WarmupAdvanced",
    Verdict.HELD: "WarmupHeld",
    Verdict.STEPPED_BACK: "WarmupSteppedBack",
}


@dataclass(frozen=True)
class HealthLimits:
    """When a day's signals at one provider are good enough to go up one step."""

    max_hard_bounce_rate: float = 0.02  # hard bounces / attempts
    max_complaint_rate: float = 0.001  # complaints / deliveries
    max_deferral_rate: float = 0.05  # reputation or "slow down" deferrals / attempts
    min_sample: int = 50  # fewer attempts (and fewer than the day's cap): no judgement
    step_back: bool = False  # bad health: one step back instead of holding


@dataclass(frozen=True)
class Signals:
    """What one source saw at one provider during one day."""

    delivered: int = 0
    hard_bounces: int = 0
    complaints: int = 0
    deferrals: int = 0  # reputation or rate ("slow down") deferrals only

    @property
    def attempts(self) -> int:
        return self.delivered + self.hard_bounces + self.deferrals

    def as_dict(self) -> dict[str, int]:
        return {"delivered": self.delivered, "hard_bounces": self.hard_bounces,
                "complaints": self.complaints, "deferrals": self.deferrals}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> Signals:
        return cls(**{k: int(data.get(k, 0)) for k in SIGNAL_NAMES})


SIGNAL_NAMES = ("delivered", "hard_bounces", "complaints", "deferrals")


@dataclass(frozen=True)
class Ramp:
    """The state of one (source, provider): its step, since which day, and why."""

    step: int
    day: str  # ISO date (in the warm-up time zone) the step applies to
    verdict: Verdict = Verdict.STARTED
    reason: str = ""

    def as_dict(self) -> dict[str, str | int]:
        return {"step": self.step, "day": self.day, "verdict": self.verdict.value,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, str | int]) -> Ramp:
        return cls(int(data["step"]), str(data["day"]), Verdict(str(data["verdict"])),
                   str(data.get("reason", "")))


@dataclass(frozen=True)
class Transition:
    """One rollover worth telling: the step before, the step now, and why."""

    verdict: Verdict
    step_from: int
    step: int
    cap: int | None  # the cap of the new step; None: unlimited
    reason: str
    judged_day: str
    signals: Signals = field(default_factory=Signals)


def day_of(now: float, tz: ZoneInfo) -> str:
    """The ISO date at Unix time `now` in `tz`."""
    return dt.datetime.fromtimestamp(now, tz).date().isoformat()


def next_day_start(now: float, tz: ZoneInfo) -> float:
    """Unix time of the next midnight in `tz` (daylight saving time included)."""
    today = dt.datetime.fromtimestamp(now, tz).date()
    midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(0), tzinfo=tz)
    return midnight.timestamp()


def day_start(day: str, tz: ZoneInfo) -> float:
    """Unix time of the midnight that starts ISO date `day` in `tz`."""
    return dt.datetime.combine(dt.date.fromisoformat(day), dt.time(0), tzinfo=tz).timestamp()


def cap_at(schedule: list[int], step: int) -> int | None:
    """The day's cap at `step` (the last entry beyond the end); None: unlimited."""
    value = schedule[min(step, len(schedule) - 1)]
    return None if value == 0 else value


def judge(signals: Signals, limits: HealthLimits, cap: int | None) -> tuple[bool | None, str]:
    """(healthy, reason): True healthy, False unhealthy, None too few messages to judge."""
    needed = min(limits.min_sample, cap) if cap else limits.min_sample
    attempts = signals.attempts
    if attempts < max(needed, 1):
        return None, f"too few messages to judge ({attempts} of at least {needed})"
    rates = (
        ("hard-bounce rate", signals.hard_bounces / attempts, limits.max_hard_bounce_rate),
        ("complaint rate", signals.complaints / max(signals.delivered, 1),
         limits.max_complaint_rate),
        ("reputation/slow-down deferral rate", signals.deferrals / attempts,
         limits.max_deferral_rate),
    )
    over = [f"{name} {_pct(rate)} over the limit {_pct(limit)}"
            for name, rate, limit in rates if rate > limit]
    if over:
        return False, "; ".join(over) + f" ({attempts} messages)"
    shown = ", ".join(f"{name} {_pct(rate)}" for name, rate, _ in rates)
    return True, f"healthy: {shown} ({attempts} messages)"


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f} %"


def start(today: str) -> Ramp:
    return Ramp(0, today, Verdict.STARTED, "warm-up started at this provider")


def roll(ramp: Ramp, today: str, schedule: list[int], limits: HealthLimits,
         signals: Signals) -> tuple[Ramp, Transition | None]:
    """The ramp on `today`, given the `signals` of its last day (`ramp.day`).

    Returns the ramp unchanged when `today` is not after its day. A quiet day (nothing
    sent) holds the step without a transition to tell."""
    if today <= ramp.day:
        return ramp, None
    last = len(schedule) - 1
    cap = cap_at(schedule, ramp.step)
    healthy, reason = judge(signals, limits, cap)
    if healthy:
        step, verdict = min(ramp.step + 1, last), Verdict.ADVANCED
    elif healthy is False and limits.step_back and ramp.step > 0:
        step, verdict = max(ramp.step - 1, 0), Verdict.STEPPED_BACK
    else:
        step, verdict = ramp.step, Verdict.HELD
    new = replace(ramp, step=step, day=today, verdict=verdict, reason=reason)
    quiet = signals.attempts == 0 or (verdict is Verdict.ADVANCED and step == ramp.step)
    if quiet:
        return new, None
    return new, Transition(verdict, ramp.step, step, cap_at(schedule, step), reason,
                           ramp.day, signals)
