"""AIMD adaptation of one limit (a message rate or a connection count), without I/O.

A `Dial` holds the current value of a limit between a floor and the configured ceiling.
A "slow down" reply cuts it multiplicatively (at most once per holdoff, so the replies to
what was already in flight count as one event) and remembers the value it was cut from.
After a run of successes it rises again additively: halfway back to the remembered value
per step (fast recovery of what was lost), then, above it, by a small share of the value
that doubles with each step (probing for more, so a receiver that allows more is found
within a few steps). This is TCP's congestion avoidance shape (BIC-like), applied per
destination, as Postfix's queue manager does with its concurrency feedback.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from mta.throttle.shaping import AdaptSettings


@dataclass
class Dial:
    ceiling: float | None  # configured limit; None: unlimited
    floor: float
    integer: bool = False  # connection counts are whole numbers
    value: float | None = None  # current limit; None: unlimited
    peak: float | None = None  # the value of the last cut (what was too much)
    probes: int = 0  # raises in a row above the peak
    successes: int = 0  # since the last change
    last_change: float = -math.inf
    last_cut: float = -math.inf

    def __post_init__(self) -> None:
        if self.ceiling is not None:
            self.floor = min(self.floor, self.ceiling)
        self.value = self.ceiling

    @property
    def adapted(self) -> bool:
        return self.value != self.ceiling

    def cut(self, now: float, settings: AdaptSettings, measured: float | None = None) -> bool:
        """A "slow down": value *= decrease (not below the floor). True if it changed.

        `measured` is the rate actually achieved, used when the value is unlimited or
        when it is lower than the value (the receiver objected to what it really got)."""
        if now - self.last_cut < settings.holdoff:
            return False
        base = self.value
        if measured is not None and (base is None or measured < base):
            base = measured
        if base is None:
            return False
        new = self._round(max(self.floor, base * settings.decrease))
        self.peak = base
        self.probes = 0
        self.last_cut = now
        return self._set(new, now)

    def success(self, now: float, settings: AdaptSettings) -> bool:
        """One success; after a run of them, one additive raise. True if it changed."""
        self.successes += 1
        if self.value is None or self.successes < self._run_length(settings):
            return False
        if now - self.last_change < settings.increase_interval:
            return False
        if self.ceiling is None and now - self.last_cut >= settings.restore_after:
            return self._set(None, now)
        if self.ceiling is not None and self.value >= self.ceiling:
            return False
        new = self.value + self._step(settings)
        if self.ceiling is not None:
            new = min(self.ceiling, new)
        return self._set(self._round(new), now)

    def _run_length(self, settings: AdaptSettings) -> int:
        """Successes that make a run: increase_after, fewer for a slow destination (as
        many as one increase_interval carries, at least 3), so it recovers as fast."""
        per_interval = (self.value or 0.0) * settings.increase_interval
        return max(3, min(settings.increase_after, math.ceil(per_interval)))

    def _step(self, settings: AdaptSettings) -> float:
        value = self.value or 0.0
        minimum = 1.0 if self.integer else 0.0
        if self.peak is not None and value < self.peak * (1 - settings.probe_step):
            return max(minimum, (self.peak - value) / 2)
        share = min(settings.max_probe_step, settings.probe_step * 2**self.probes)
        self.probes += 1
        return max(minimum, value * share)

    def _round(self, value: float) -> float:
        return float(max(1, math.floor(value))) if self.integer else value

    def _set(self, value: float | None, now: float) -> bool:
        self.successes = 0
        self.last_change = now
        if value == self.value:
            return False
        self.value = value
        return True


class Meter:
    """The rate of recent events: over the last `horizon` seconds, or over the last
    `size` events when those span longer (so it works at 1000/s and at 1/min alike).
    Measuring up to `now` makes the rate fall when events stop coming."""

    def __init__(self, horizon: float = 2.0, size: int = 16, minimum: int = 6,
                 cap: int = 4096) -> None:
        self.times: deque[float] = deque(maxlen=cap)
        self.horizon = horizon
        self.size = size
        self.minimum = minimum

    def add(self, now: float) -> None:
        self.times.append(now)

    def rate(self, now: float) -> float | None:
        """Events per second; None with fewer than `minimum` events seen."""
        times = self.times
        while len(times) > self.size and times[0] < now - self.horizon:
            times.popleft()
        if len(times) < self.minimum:
            return None
        span = max(now - times[0], self.horizon if len(times) > self.size else 0.0)
        return len(times) / span if span > 0 else None
