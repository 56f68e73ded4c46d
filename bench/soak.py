"""`python -m bench soak`: a long run at a steady offered rate, watched window by window.

    python -m bench soak [--scenario steady] [--duration 600] [--rate 300] [--window 60]
                         [--target engine|postfix|HOST:PORT] [--dkim]

The same rig as `python -m bench run`, with the load given by time instead of count.
Afterwards, one row per window (rates, queue depth, memory, accept-to-delivered
latency) and a verdict on what a soak is for: does memory keep growing, does latency
drift, does the queue keep up. The last line has the format of `bench run`'s.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path

from bench.engine_proc import PROJECT_ROOT
from bench.interrupts import stop_on_signals
from bench.orchestrator import Options, run_once
from bench.report import RunResult, Sample, last_line, percentiles, save_outputs
from bench.scenarios import load_scenario
from bench.targets import check_target


@dataclass
class Window:
    start: float
    end: float
    accepted_rate: float
    delivered_rate: float
    queue: int | None  # at the end of the window
    memory_mib: float | None  # the most seen in the window
    p50_ms: float
    p99_ms: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", default="steady")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=300.0, help="offered msg/s (0: flat out)")
    parser.add_argument("--sessions", type=int)
    parser.add_argument("--window", type=float, default=60.0, help="seconds per report row")
    parser.add_argument("--target", default="engine")
    parser.add_argument("--dkim", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "out"))
    parser.add_argument("--quiet", action="store_true")


def windows(result: RunResult, width: float) -> list[Window]:
    """The run cut into windows of `width` seconds (the last one may be shorter)."""
    end = max((s.t for s in result.samples), default=0.0)
    edges = [k * width for k in range(int(end // width) + 1)] + [end]
    if len(edges) > 2 and edges[-1] - edges[-2] < width / 2:
        del edges[-2]  # a short tail joins the window before it
    spans = [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]
    return [window(result, a, b, closed=(b == end)) for a, b in spans]


def window(result: RunResult, start: float, end: float, closed: bool = False) -> Window:
    """One window [start, end), or [start, end] when `closed` (the run's last)."""
    inside = [s for s in result.samples if start <= s.t <= end]
    first, last = (inside[0], inside[-1]) if inside else (None, None)
    span = (last.t - first.t) if first and last and last.t > first.t else 0.0
    latencies = [lat for lat, at in zip(result.e2e_latencies, result.delivered_times,
                                        strict=True) if start <= at < end or (closed and at == end)]
    p = percentiles(latencies)
    memory = [s.memory for s in inside if s.memory]
    return Window(
        start, end,
        _rate(first, last, "accepted", span), _rate(first, last, "delivered", span),
        last.queue if last else None,
        round(max(memory) / 2**20, 1) if memory else None, p["p50"], p["p99"],
    )


def _rate(first: Sample | None, last: Sample | None, attr: str, span: float) -> float:
    if first is None or last is None or not span:
        return 0.0
    return round((getattr(last, attr) - getattr(first, attr)) / span, 1)


def format_windows(rows: list[Window]) -> str:
    lines = ["   from     to  accepted/s  delivered/s   queue  memory MiB  p50 ms  p99 ms"]
    for w in rows:
        queue = "n/a" if w.queue is None else str(w.queue)
        memory = "n/a" if w.memory_mib is None else f"{w.memory_mib:.1f}"
        lines.append(f"{w.start:7.0f} {w.end:6.0f} {w.accepted_rate:11.1f} {w.delivered_rate:12.1f}"
                     f" {queue:>7} {memory:>11} {w.p50_ms:7.1f} {w.p99_ms:7.1f}")
    return "\n".join(lines)


def verdict(rows: list[Window]) -> list[str]:
    """Memory growth, latency drift and the queue at the end, first window against last."""
    if len(rows) < 2:
        return ["too short for a verdict: run for at least two windows"]
    first, last = rows[0], rows[-1]
    lines = []
    if first.memory_mib is not None and last.memory_mib is not None:
        growth = last.memory_mib - first.memory_mib
        lines.append(f"memory: {first.memory_mib} -> {last.memory_mib} MiB "
                     f"({growth:+.1f} MiB in {last.end - first.end:.0f} s)")
    lines.append(f"accept-to-delivered p99: {first.p99_ms} -> {last.p99_ms} ms")
    if last.queue is not None:
        lines.append(f"queue at the end of the last window: {last.queue}")
    return lines


def main(args: argparse.Namespace) -> int:
    stop_on_signals()
    scenario = load_scenario(args.scenario)
    load = replace(scenario.load, count=0, duration=args.duration, rate=args.rate)
    scenario.load = replace(load, sessions=args.sessions) if args.sessions else load
    check_target(args.target)
    opts = Options(scenario, args.workers, args.dkim, progress=not args.quiet)
    try:
        result = run_once(args.target, opts)
    except KeyboardInterrupt:
        print("\ninterrupted: everything started has been stopped")
        return 130
    rows = windows(result, args.window)
    print(format_windows(rows))
    for line in verdict(rows):
        print(line)
    print(save_outputs([result], Path(args.out)))
    print(last_line(result), flush=True)
    return 0
