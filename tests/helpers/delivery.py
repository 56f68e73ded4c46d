"""A stand-in for the scheduler, for tests that drive mta.delivery.deliverer directly."""

from __future__ import annotations

from typing import Any


class RecordingScheduler:
    """What the deliverer asks of the scheduler, recorded (no spool: the outcomes only)."""

    def __init__(self) -> None:
        self.results: dict[str, list[Any]] = {}
        self.postponed: list[Any] = []

    def take_held(self, item: Any) -> bool:
        return False

    def take_bounced(self, item: Any) -> bool:
        return False

    async def complete(self, item: Any, results: list[Any], retry_after: Any = None) -> None:
        self.results[item.job_id.decode()] = results

    async def postpone(self, item: Any, seconds: float) -> None:
        self.postponed.append(item)
