"""Throughput history: messages received, delivered and deferred per second over the last
hour and per minute over the last day, kept by the engine so that the dashboard draws it
at once, after a reload too.

Each worker counts its own events into a small ring (`Ring.on_event` listens to its event
log). In the engine the ring is a memory-mapped file in the metrics directory
(`throughput-<pid>.ring`, beside prometheus-client's files, made fresh by each `mta
serve`); worker 0's HTTP listener adds up every worker's file (`history`), as the metrics
are merged, and a dead worker's file keeps counting in the history.

A ring holds two tables of slots, one slot a second (an hour of them) and one a minute (a
day of them). A slot is four unsigned 32-bit integers: the second (or minute) since the
epoch it counts, then the three counts. A slot stamped with another time is stale and
read as zero, so nothing ever has to be cleared.
"""

from __future__ import annotations

import contextlib
import glob
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("received", "delivered", "deferred")
EVENT_KINDS = {"Reception": 0, "Delivery": 1, "TransientFailure": 2}
FILE_GLOB = "throughput-*.ring"
FIELDS = 1 + len(KINDS)  # the slot's time, then one count per kind
CURRENT_SECONDS = 10  # "now" is the average of the last complete seconds


@dataclass(frozen=True)
class Table:
    name: str
    step: int  # seconds per slot
    slots: int

    @property
    def size(self) -> int:  # in 32-bit integers
        return self.slots * FIELDS


TABLES = (Table("seconds", 1, 3600), Table("minutes", 60, 1440))
SIZE = sum(t.size for t in TABLES)  # integers in a ring
OFFSETS = {t.name: sum(u.size for u in TABLES[:i]) for i, t in enumerate(TABLES)}


class Ring:
    """One worker's counts, in memory or in a memory-mapped file (`path`)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        if path is None:
            buffer: Any = bytearray(SIZE * 4)
        else:
            buffer = self._map = map_file(path)
        self.view = memoryview(buffer).cast("I")

    def on_event(self, event: dict[str, Any]) -> None:
        """An event log listener: Reception, Delivery and TransientFailure count."""
        kind = EVENT_KINDS.get(str(event.get("type")))
        if kind is not None:
            self.add(kind, time.time())

    def add(self, kind: int, now: float, count: int = 1) -> None:
        for table in TABLES:
            stamp = int(now // table.step)
            at = OFFSETS[table.name] + (stamp % table.slots) * FIELDS
            if self.view[at] != stamp:
                self.view[at:at + FIELDS] = memoryview(bytes(FIELDS * 4)).cast("I")
                self.view[at] = stamp
            self.view[at + 1 + kind] += count

    def close(self) -> None:
        self.view.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a reader's view still open: unmapped at exit
                self._map.close()


def map_file(path: Path) -> mmap.mmap:
    """The ring file at `path` mapped (made, or kept if a worker of that pid had it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != SIZE * 4:
            os.ftruncate(fd, SIZE * 4)
        return mmap.mmap(fd, SIZE * 4)
    finally:
        os.close(fd)


def ring_for_process(directory: str | None) -> Ring:
    """This process's ring: a file in `directory` (the metrics directory), else memory."""
    if not directory:
        return Ring()
    return Ring(Path(directory) / f"throughput-{os.getpid()}.ring")


def remove_rings(directory: str) -> None:
    """A fresh metrics directory: the rings of an earlier engine go."""
    for stale in glob.glob(os.path.join(directory, FILE_GLOB)):
        os.unlink(stale)


def ring_views(directory: str | None, local: Ring | None) -> list[memoryview]:
    """Every worker's counts: the files in `directory`, else this process's ring."""
    if not directory:
        return [local.view] if local is not None else []
    views = []
    for name in sorted(glob.glob(os.path.join(directory, FILE_GLOB))):
        with open(name, "rb") as f:
            data = f.read(SIZE * 4)
        if len(data) == SIZE * 4:
            views.append(memoryview(data).cast("I"))
    return views


def series(views: list[memoryview], table: Table, end: int) -> dict[str, list[int]]:
    """The summed counts of the table's slots from `end - slots + 1` to `end` (slot times)."""
    start = end - table.slots + 1
    out = {kind: [0] * table.slots for kind in KINDS}
    base = OFFSETS[table.name]
    for view in views:
        part = view[base:base + table.size].tolist()
        for at in range(0, table.size, FIELDS):
            stamp = part[at]
            if start <= stamp <= end:
                for k, kind in enumerate(KINDS):
                    out[kind][stamp - start] += part[at + 1 + k]
    return out


def history(directory: str | None, local: Ring | None, now: float) -> dict[str, Any]:
    """The dashboard's throughput: per complete second over the last hour, per complete
    minute over the last day (each with the time of its first slot and its step), and
    the current rates (per second, over the last CURRENT_SECONDS seconds)."""
    views = ring_views(directory, local)
    out: dict[str, Any] = {}
    for table in TABLES:
        end = int(now // table.step) - 1  # the slot under way is not complete yet
        out[table.name] = {"start": (end - table.slots + 1) * table.step, "step": table.step,
                           **series(views, table, end)}
    seconds = out["seconds"]
    out["current"] = {kind: sum(seconds[kind][-CURRENT_SECONDS:]) / CURRENT_SECONDS
                      for kind in KINDS}
    return out
