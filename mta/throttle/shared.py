"""The port through which budgets are held across nodes: leases and paces per scope.

The throttle (`mta.throttle.throttle`) holds the limits of this worker. When several
nodes share destinations, the same limits must hold across all of them; delivery asks
a `SharedBudget` after the throttle, before each connection and each message. On one
node `LocalBudget` answers "go" at once; `mta.cluster.throttle.ClusterThrottle`
implements it over Redis and is plugged in by the engine's wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mta.throttle.throttle import Destination


class SharedBudget(Protocol):
    def subscribe(self, on_excess: Callable[[], None]) -> None:
        """Call `on_excess` when this node holds more than its fair share somewhere
        (idle connections should look again whether to close)."""

    async def connect(self, dest: Destination) -> float:
        """0: a new connection to `dest` may open (a lease is held); else seconds to wait."""

    async def release(self, dest: Destination) -> None:
        """Give back the lease of a connection closed (or never opened)."""

    async def send(self, dest: Destination) -> float:
        """0: one message to `dest` may go now; else seconds to wait for its turn."""

    def shed(self, dest: Destination) -> bool:
        """True: an idle connection to `dest` should close (other nodes are waiting)."""

    async def pace(self, scope: str, rate: float, burst: int) -> float | None:
        """A turn taken (reserved) at the pace `scope` shares across nodes (an account's
        rate): the seconds until it (0.0: now); None: no shared pace, pace locally."""


class LocalBudget:
    """One node: the throttle's own limits are the whole budget."""

    def subscribe(self, on_excess: Callable[[], None]) -> None:
        return None

    async def connect(self, dest: Destination) -> float:
        return 0.0

    async def release(self, dest: Destination) -> None:
        return None

    async def send(self, dest: Destination) -> float:
        return 0.0

    def shed(self, dest: Destination) -> bool:
        return False

    async def pace(self, scope: str, rate: float, burst: int) -> float | None:
        return None
