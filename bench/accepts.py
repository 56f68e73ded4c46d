"""The load's side of the matching: which message index each 250 reply was for."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from bench.load import Submission


class AcceptLog:
    """Which message index each 250 was for: run_load calls `submissions(i)` and then
    `on_accept` from the same worker task, so the task tells them apart."""

    def __init__(self, submissions: Callable[[int], Submission]) -> None:
        self._submissions = submissions
        self._current: dict[asyncio.Task[Any] | None, int] = {}
        self.accepted_at: dict[int, float] = {}

    def submission(self, i: int) -> Submission:
        self._current[asyncio.current_task()] = i
        return self._submissions(i)

    def on_accept(self, queue_id: str, at: float) -> None:
        index = self._current.get(asyncio.current_task())
        if index is not None:
            self.accepted_at[index] = at
