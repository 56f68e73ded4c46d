"""Priority lanes: `transactional` mail goes ahead of `bulk` without starving it.

A message's lane is chosen at intake (`[smtp] lane_header`, honoured only for the
lanes its account may use: `[[accounts]] lanes`; else the account's `lane`). A job of
the transactional lane is indexed in its own due index (`due_t`, mta.queue.spool), which
the scheduler reads first, with `[delivery] transactional_slots` of its deliveries in
flight kept free of bulk; at each destination, `LaneQueue` hands out transactional
items first while bulk keeps `[delivery] bulk_min_share` of the sends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

TRANSACTIONAL = "transactional"
BULK = "bulk"
LANES = (TRANSACTIONAL, BULK)


def lane_of(message: dict[str, Any]) -> str:
    return message.get("lane") or BULK


def choose_lane(asked: str, default: str, allowed: list[str]) -> str | None:
    """The lane of a message whose lane field says `asked` ('' for none): the asked
    lane when the account may use it, else the account's `default`; None when `asked`
    names no lane."""
    if not asked:
        return default
    lane = asked.strip().lower()
    if lane not in LANES:
        return None
    return lane if lane == default or lane in allowed else default


class LaneQueue:
    """A destination's waiting items, as a deque (append, appendleft, popleft, clear,
    iteration, len) that pops transactional items first while bulk gets at least
    `bulk_share` of the pops whenever both wait."""

    def __init__(self, bulk_share: float = 0.2) -> None:
        self.bulk_share = bulk_share
        self._lanes: dict[str, deque[Any]] = {TRANSACTIONAL: deque(), BULK: deque()}
        self._credit = self._start  # bulk's pops owed

    @property
    def _start(self) -> float:
        """The credit when both lanes start to wait: bulk's first pop is due at once, so
        that over any stretch of pops while both wait bulk has at least its share."""
        return 1.0 - self.bulk_share if self.bulk_share > 0 else 0.0

    @staticmethod
    def _lane(item: Any) -> str:
        return TRANSACTIONAL if lane_of(item.message) == TRANSACTIONAL else BULK

    def append(self, item: Any) -> None:
        self._lanes[self._lane(item)].append(item)

    def appendleft(self, item: Any) -> None:
        self._lanes[self._lane(item)].appendleft(item)

    def popleft(self) -> Any:
        fast, bulk = self._lanes[TRANSACTIONAL], self._lanes[BULK]
        if not fast or not bulk:
            self._credit = self._start
            return (fast or bulk).popleft()  # IndexError when both are empty, as a deque
        self._credit += self.bulk_share
        if self._credit >= 1.0:
            self._credit -= 1.0
            return bulk.popleft()
        return fast.popleft()

    def clear(self) -> None:
        for lane in self._lanes.values():
            lane.clear()

    def __iter__(self) -> Iterator[Any]:
        yield from self._lanes[TRANSACTIONAL]
        yield from self._lanes[BULK]

    def __len__(self) -> int:
        return sum(map(len, self._lanes.values()))

    def __bool__(self) -> bool:
        return any(self._lanes.values())
