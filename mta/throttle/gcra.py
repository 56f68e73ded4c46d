"""A GCRA rate limiter (generic cell rate algorithm), as in KumoMTA's crates/throttle.

All the state is one number, the theoretical arrival time (TAT) of the next event. An
event at `now` is allowed when it does not put the TAT more than `burst` intervals
ahead of now. Changing the rate keeps the TAT, so a slower rate takes effect at once.
"""

from __future__ import annotations


class Gcra:
    __slots__ = ("interval", "burst", "tat")

    def __init__(self, per_second: float, burst: int = 1) -> None:
        self.interval = 0.0
        self.burst = 1
        self.tat = float("-inf")
        self.set_rate(per_second, burst)

    def set_rate(self, per_second: float, burst: int = 1) -> None:
        if per_second <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / per_second
        self.burst = max(1, burst)

    def wait(self, now: float, quantity: int = 1) -> float:
        """Seconds until `quantity` events are allowed (0.0: now); changes nothing."""
        new_tat = max(self.tat, now) + self.interval * quantity
        delay = new_tat - self.interval * self.burst - now
        return delay if delay > 1e-9 else 0.0

    def take(self, now: float, quantity: int = 1) -> None:
        """Account for `quantity` events at `now` (call after wait() returned 0)."""
        self.tat = max(self.tat, now) + self.interval * quantity

    def acquire(self, now: float, quantity: int = 1) -> float:
        """wait(); and when it is 0, take(). Returns the wait."""
        delay = self.wait(now, quantity)
        if delay == 0.0:
            self.take(now, quantity)
        return delay

    def reserve(self, now: float, quantity: int = 1) -> float:
        """Take `quantity` events now whatever the wait, and return the wait: the seconds
        until the reserved turn (0.0: now). Callers served in turn, none refused."""
        delay = self.wait(now, quantity)
        self.take(now, quantity)
        return delay
