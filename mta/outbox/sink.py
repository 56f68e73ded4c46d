"""What the outbox dispatcher needs from a place events go to (webhook, AMQP exchange).

The dispatcher (mta/outbox/dispatch.py) drives every sink the same way: it reads the
outbox in order, keeps one cursor per sink, hands a sink batches of at most its
batch_size events it `wants`, and retries a batch whose `deliver` raised SinkFailed with
exponential backoff and jitter. A sink therefore only knows how to filter and how to hand
one batch over; it keeps no queue of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol


class SinkFailed(Exception):
    """The receiver did not take the batch (connection error, timeout, non-2xx, no confirm)."""


class EventSink(Protocol):
    """`name` and `batch_size` are required. Optional attributes the dispatcher reads
    with defaults when a sink has them: `batch_wait` (seconds to wait for a batch to
    fill, default 1.0) and `max_age` (seconds after which an event that still could not
    be delivered goes to the sink's dead-letter list, default 86400)."""

    name: str
    batch_size: int

    def wants(self, event: dict[str, Any]) -> bool:
        """Type and account filters."""
        ...

    async def deliver(self, events: list[dict[str, Any]]) -> None:
        """Return only once the receiver has taken every event of the batch (HTTP 2xx,
        broker publisher-confirm); raise SinkFailed otherwise."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class EventFilter:
    """A sink's `events` and `accounts` settings: empty means all."""

    types: frozenset[str]
    accounts: frozenset[str]

    @classmethod
    def of(cls, types: Iterable[str], accounts: Iterable[str]) -> EventFilter:
        return cls(frozenset(types), frozenset(accounts))

    def wants(self, event: dict[str, Any]) -> bool:
        return ((not self.types or event.get("type") in self.types)
                and (not self.accounts or event.get("account") in self.accounts))

    def describe(self) -> dict[str, list[str]]:
        return {"events": sorted(self.types), "accounts": sorted(self.accounts)}
