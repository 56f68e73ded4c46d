"""Per-account and per-campaign sending rates: `[[accounts]] max_rate = "500/m"` and a
campaign's rate set through the admin API (`mta.queue.rules` keeps it), GCRA paces.

Mail over an account's pace is accepted and paced out, never refused: the scheduler
asks `AccountPaces.reserve(account)` for each due message of a paced account and gets
the seconds until that message's turn (0: now); a message whose turn is later is put
back, due at its turn, without counting an attempt. Turns are reservations, so each
message waits once, and the waiting messages go out at the pace, oldest first.

Across the workers of one node, each worker paces its share (the rate / workers: the
workers deliver different destinations, so an account's mail is spread over them).
Across nodes, the `SharedBudget` port (`mta.throttle.shared`) holds one pace per account
for the whole cluster (Redis, `mta.cluster.throttle`); while it cannot answer, the local
share applies.

The wait is visible: `queue_wait()` (per account, the seconds until its last turn handed
out), sampled into the gauge ``mta_account_queue_wait_seconds`` and every turn's wait into
the histogram ``mta_account_pace_wait_seconds`` (mta.metrics), shown by the admin API's
account rows (``queue_wait``), `mta account show` and the dashboard; and an
``AccountPaced`` event at most every REPORT_SECONDS per account.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from mta.throttle.gcra import Gcra
from mta.throttle.shared import SharedBudget

_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|sec|m|min|h|hour|d|day)\s*", re.I)
REPORT_SECONDS = 1.0
MAX_OBSERVED = 10_000  # waits kept between two metrics samples (the rest are not observed)
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400,
         "day": 86400}


def parse_rate(text: str) -> float:
    """Messages per second of "500/m", "10/s", "2000/h", "50000/d"; ValueError else."""
    match = _RATE.fullmatch(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a rate like 500/m (per s, m, h or d)")
    return float(match.group(1)) / _UNIT[match.group(2).lower()]


class AccountPaces:
    def __init__(self, rates: dict[str, float], budget: SharedBudget | None = None,
                 workers: int = 1, clock: Callable[[], float] = time.monotonic,
                 on_wait: Callable[[str, float], None] | None = None,
                 campaign_rates: Callable[[], dict[tuple[str, str], float]] | None = None
                 ) -> None:
        self.rates = rates  # account -> messages per second, for the whole engine
        self.campaign_rates = campaign_rates or dict  # (account, campaign) -> per second
        self.budget = budget
        self.workers = max(1, workers)
        self.clock = clock
        self._local: dict[str, Gcra] = {}
        self.waiting: dict[str, float] = {}  # account -> the last turn handed out (clock)
        self.on_wait = on_wait  # told (at most every REPORT_SECONDS) an account's queue wait
        self._reported: dict[str, float] = {}
        self._observed: list[tuple[str, float]] = []  # waits handed out, for the metrics

    def __bool__(self) -> bool:
        return True  # campaign rates may be set at any time

    def paced(self, account: str, campaign: str = "") -> bool:
        return account in self.rates or (
            bool(campaign) and (account, campaign) in self.campaign_rates())

    async def reserve(self, account: str, campaign: str = "") -> float:
        """Seconds until one more message of `account` (and `campaign`) may go (0.0: now);
        the turn is taken (reserved) at each pace that applies."""
        scopes = []
        if account in self.rates:
            scopes.append((f"account:{account}", self.rates[account]))
        rate = self.campaign_rates().get((account, campaign)) if campaign else None
        if rate:
            scopes.append((f"campaign:{account}/{campaign}", rate))
        if not scopes:
            return 0.0
        wait = 0.0
        for scope, per_second in scopes:
            wait = max(wait, await self._reserve(scope, per_second))
        now = self.clock()
        self.waiting[account] = now + wait
        if len(self._observed) < MAX_OBSERVED:
            self._observed.append((account, wait))
        if wait and self.on_wait is not None and (
                now - self._reported.get(account, -REPORT_SECONDS) >= REPORT_SECONDS):
            self._reported[account] = now
            self.on_wait(account, round(wait, 3))
        return wait

    async def _reserve(self, scope: str, rate: float) -> float:
        wait = None
        if self.budget is not None:
            wait = await self.budget.pace(scope, rate, 1)
        if wait is None:
            gcra = self._local.get(scope)
            if gcra is None:
                gcra = self._local[scope] = Gcra(rate / self.workers, 1)
            elif gcra.interval != self.workers / rate:
                gcra.set_rate(rate / self.workers, 1)
            wait = gcra.reserve(self.clock())
        return wait

    def take_observed(self) -> list[tuple[str, float]]:
        """The (account, wait) of each turn handed out since the last call."""
        observed, self._observed = self._observed, []
        return observed

    def queue_wait(self) -> dict[str, float]:
        """Per paced account: seconds until the last turn handed out (its queue's wait)."""
        now = self.clock()
        return {account: round(max(0.0, until - now), 3)
                for account, until in self.waiting.items()}
