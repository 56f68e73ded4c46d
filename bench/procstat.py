"""CPU time and memory of processes and their descendants, read from /proc."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3, the state, is item 0); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """User + system CPU seconds of a process (0.0 if gone); with `reaped_children`, plus
    those of its children that have exited and been waited for."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0
    last = 15 if reaped_children else 13  # utime, stime[, cutime, cstime]
    return sum(int(x) for x in fields[11:last]) / CLK_TCK


def pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages split among the processes that map
    them, so the sum over many processes (Postfix's) is not inflated by shared libraries."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def children(pid: int) -> list[int]:
    """The direct children of a process, of all its threads."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(x) for x in task.read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        kids = children(stack.pop())
        found += kids
        stack += kids
    return found


class ProcessTree:
    """CPU time and memory (PSS) of some root processes and all their descendants.

    CPU counts each process's own time and its reaped children's (cutime, cstime), so
    short-lived workers (Postfix's smtpd, smtp) count once they exit too.
    Memory is read every `MEMORY_EVERY` samples: smaps_rollup walks the process's page
    tables, 6-7 ms of the kernel's time per read of a busy engine worker (its spool's
    map), and holds the worker's mmap lock meanwhile.
    """

    MEMORY_EVERY = 10  # with samples every 0.1 s (bench.monitor): memory once a second

    def __init__(self, roots: Callable[[], list[int]]) -> None:
        self.roots = roots
        self.cpu = 0.0
        self.memory = 0
        self.peak_memory = 0
        self._samples = 0

    def sample(self) -> tuple[float, int]:
        """(CPU seconds so far, memory bytes lately); remembers the peak memory."""
        with_memory = self._samples % self.MEMORY_EVERY == 0
        self._samples += 1
        cpu, memory = 0.0, 0
        for root in self.roots():
            for pid in [root, *descendants(root)]:
                cpu += cpu_seconds(pid, reaped_children=True)
                memory += pss(pid) if with_memory else 0
        self.cpu = max(self.cpu, cpu)
        if with_memory:
            self.memory = memory
            self.peak_memory = max(self.peak_memory, memory)
        return self.cpu, self.memory
