"""What every part of a worker process shares: its config, spool, committer and events.

Built once per worker by mta/engine.py and handed to the parts that need it; the parts
never reach into the worker for anything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mta.config import Config
from mta.events import EventLog
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool

Closer = Callable[[], Awaitable[None]]
EventListener = Callable[[dict[str, Any]], None]


class Role(Enum):
    """What a worker process does: by default each does both; with `[engine]
    delivery_workers` some only accept and the others only deliver."""

    ACCEPT_AND_DELIVER = "accepts and delivers"
    ACCEPT = "accepts"
    DELIVER = "delivers"


@dataclass(frozen=True)
class Seat:
    """Where one worker process sits among the engine's workers."""

    index: int  # 0 .. workers - 1, unique: names its keys, files and log lines
    workers: int  # all the engine's worker processes
    role: Role = Role.ACCEPT_AND_DELIVER
    share: int = 0  # among the workers that deliver: whose destinations are its own
    sharers: int = 1  # how many workers deliver (destinations and budgets are split)

    @property
    def accepts(self) -> bool:
        return self.role is not Role.DELIVER

    @property
    def delivers(self) -> bool:
        return self.role is not Role.ACCEPT

    @property
    def leader(self) -> bool:
        """Worker 0 (it always accepts) does the engine-wide duties: the HTTP listener,
        the outbox's dispatch, the guard's daily purge, the cluster's policy sync."""
        return self.index == 0

    @property
    def delivery_leader(self) -> bool:
        """The first delivering worker does delivery's engine-wide duties (lifting
        expired rules, sending TLS reports)."""
        return self.delivers and self.share == 0


def seats(workers: int, delivery_workers: int) -> list[Seat]:
    """The engine's workers: `workers` doing both, or (`delivery_workers` > 0) `workers`
    that only accept followed by `delivery_workers` that only deliver."""
    if delivery_workers <= 0:
        return [Seat(i, workers, Role.ACCEPT_AND_DELIVER, i, workers) for i in range(workers)]
    total = workers + delivery_workers
    return ([Seat(i, total, Role.ACCEPT, 0, delivery_workers) for i in range(workers)]
            + [Seat(workers + j, total, Role.DELIVER, j, delivery_workers)
               for j in range(delivery_workers)])


@dataclass
class WorkerContext:
    cfg: Config
    seat: Seat
    spool: Spool
    committer: GroupCommitter
    events: EventLog
    closers: list[Closer] = field(default_factory=list)  # run in reverse order at stop
    outbox: Any = None  # mta.outbox.wiring.OutboxRecorder when a sink is configured

    @property
    def index(self) -> int:
        return self.seat.index

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("worker", self.index)
        self.events.emit(event)

    def listen(self, listener: EventListener) -> None:
        """Every event this worker emits is also handed to `listener`."""
        self.events.listeners.append(listener)

    def on_close(self, closer: Closer) -> None:
        self.closers.append(closer)
