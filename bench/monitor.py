"""Watching a run: a sample every tenth of a second (accepted, delivered, queue depth,
CPU; memory every few samples) and the live progress line on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TextIO

from bench.accepts import AcceptLog
from bench.arrivals import ArrivalTracker
from bench.report import Sample
from bench.rig.assembly import Rig
from bench.targets import Target

SAMPLE_INTERVAL = 0.1  # seconds: a short run still draws a curve
PIPED_EVERY = 2.0  # seconds between progress lines when stderr is not a terminal
TTY_EVERY = 0.25  # ... and between rewrites of the line on a terminal


class Progress:
    """The live line on stderr: rewritten in place on a terminal; piped (a log file, CI),
    a line every PIPED_EVERY seconds, the first and the last sample included."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_print: float | None = None

    def show(self, label: str, sample: Sample, rates: tuple[float, float],
             final: bool = False) -> None:
        every = TTY_EVERY if self.tty else PIPED_EVERY
        due = self.last_print is None or sample.t - self.last_print >= every
        if not self.enabled or not (due or final):
            return
        queue = "n/a" if sample.queue is None else str(sample.queue)
        line = (f"[{label}] {sample.t:6.1f}s accepted {sample.accepted} ({rates[0]:.0f}/s)"
                f" delivered {sample.delivered} ({rates[1]:.0f}/s) queue {queue}")
        self.stream.write("\r" + line.ljust(100) if self.tty else line + "\n")
        self.stream.flush()
        self.last_print = sample.t

    def done(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Monitor:
    """Samples the run every SAMPLE_INTERVAL: counters, queue depth, CPU and memory."""

    def __init__(self, target: Target, accepts: AcceptLog, tracker: ArrivalTracker, rig: Rig,
                 progress: Progress) -> None:
        self.rig = rig
        self.target = target
        self.accepts = accepts
        self.tracker = tracker
        self.progress = progress
        self.samples: list[Sample] = []
        self.start = time.time()
        self.cpu0 = target.processes.sample()[0] if target.processes else 0.0

    def sample(self) -> Sample:
        cpu = memory = None
        if self.target.processes is not None:
            cpu_now, memory = self.target.processes.sample()
            cpu = cpu_now - self.cpu0
        sample = Sample(round(time.time() - self.start, 3), len(self.accepts.accepted_at),
                        self.tracker.delivered + self.rig.throttle_accepted(),
                        self.target.queue_depth(), memory, cpu)
        self.samples.append(sample)
        return sample

    def recent_rates(self, window: float = 1.0) -> tuple[float, float]:
        """Accepted and delivered per second over about the last `window` seconds."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        back = max(1, round(window / SAMPLE_INTERVAL))
        a, b = self.samples[max(0, len(self.samples) - 1 - back)], self.samples[-1]
        dt = (b.t - a.t) or 1.0
        return (b.accepted - a.accepted) / dt, (b.delivered - a.delivered) / dt

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.progress.show(self.target.label, self.sample(), self.recent_rates())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)
        self.progress.show(self.target.label, self.sample(), self.recent_rates(), final=True)
        self.progress.done()
