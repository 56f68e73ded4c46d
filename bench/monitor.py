"""Watching a run: a sample every half second (accepted, delivered, queue depth, CPU,
memory) and the live progress line on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

from bench.accepts import AcceptLog
from bench.arrivals import ArrivalTracker
from bench.report import Sample
from bench.rig.assembly import Rig
from bench.targets import Target

SAMPLE_INTERVAL = 0.5


class Progress:
    """The live line on stderr: rewritten in place on a terminal, every 5 s otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def show(self, label: str, sample: Sample, rates: tuple[float, float]) -> None:
        if not self.enabled:
            return
        queue = "n/a" if sample.queue is None else str(sample.queue)
        line = (f"[{label}] {sample.t:6.1f}s accepted {sample.accepted} ({rates[0]:.0f}/s)"
                f" delivered {sample.delivered} ({rates[1]:.0f}/s) queue {queue}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
        elif sample.t - self.last_print >= 5.0:
            sys.stderr.write(line + "\n")
            self.last_print = sample.t
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class Monitor:
    """Samples the run every half second: counters, queue depth, CPU and memory."""

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

    def recent_rates(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return 0.0, 0.0
        a, b = self.samples[max(0, len(self.samples) - 3)], self.samples[-1]
        dt = (b.t - a.t) or 1.0
        return (b.accepted - a.accepted) / dt, (b.delivered - a.delivered) / dt

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.progress.show(self.target.label, self.sample(), self.recent_rates())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)
        self.progress.show(self.target.label, self.sample(), self.recent_rates())
        self.progress.done()
