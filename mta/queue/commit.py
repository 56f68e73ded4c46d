"""Group commit: many spool writes from concurrent sessions share one transaction.

Callers await `submit(op)`; a single writer thread runs every operation queued
since the last commit in one LMDB write transaction (one fsync), then wakes
each caller with its own result. While one commit is on disk the next batch
gathers, so a burst of N messages costs a handful of fsyncs, not N.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mta.queue.spool import Spool


class GroupCommitter:
    def __init__(self, spool: Spool, max_batch: int = 512) -> None:
        self.spool = spool
        self.max_batch = max_batch
        self._pending: list[tuple[Callable[[Any], Any], asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-writer")
        self._task: asyncio.Task[None] | None = None
        self.commits = 0
        self.operations = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, op: Callable[[Any], Any]) -> Any:
        """Run op(txn) in the next group transaction; raise what it raised."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wakeup.set()
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                ops = [op for op, _ in batch]
                try:
                    results = await loop.run_in_executor(self._executor, self.spool.apply, ops)
                except Exception as exc:  # the environment itself failed
                    results = [exc] * len(batch)
                self.commits += 1
                self.operations += len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        while self._pending:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)
