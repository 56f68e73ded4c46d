"""The event log: one JSON object per line, appended by every worker process.

Operators tail it; the policy guard and metrics read the same records. Lines
are buffered for a moment and appended with one write() on an O_APPEND file,
so lines from several processes never interleave.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, path: str | os.PathLike[str], flush_interval: float = 0.05) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._lines: list[str] = []
        self._interval = flush_interval
        self._task: asyncio.Task[None] | None = None
        self.listeners: list[Any] = []

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("time", round(time.time(), 3))
        self._lines.append(json.dumps(event, separators=(",", ":"), default=str))
        for listener in self.listeners:
            listener(event)
        if self._task is None:
            self.flush()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.flush()

    def flush(self) -> None:
        if self._lines:
            data = ("\n".join(self._lines) + "\n").encode()
            self._lines.clear()
            os.write(self._fd, data)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.flush()
        os.close(self._fd)
