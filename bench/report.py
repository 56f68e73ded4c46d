"""What a bench run measured, and how it is shown: a text report, a PNG plot, the last line.

The last line of `python -m bench run` is machine-readable (see `last_line`):

    accepted_rate=<msg/s> e2e_rate=<msg/s> p50_ms=<accept-to-delivered> p99_ms=<...>
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Sample:
    """The rig's state at one moment of a run (t in seconds since the load started)."""

    t: float
    accepted: int
    delivered: int
    queue: int | None
    memory: int | None  # bytes (PSS), the target's processes together
    cpu: float | None  # CPU seconds of the target's processes since the load started


@dataclass
class RunResult:
    target: str  # "engine", "postfix", or the HOST:PORT aimed at
    scenario: str
    dkim: bool = False
    accepted: int = 0
    refused: int = 0
    errors: int = 0
    replies: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0  # first submission to the last reply
    e2e_seconds: float = 0.0  # first submission to the last complete delivery at the sinks
    expected: int = 0  # accepted messages the sinks should receive
    delivered: int = 0  # ... and did receive, every recipient
    other_arrivals: dict[str, int] = field(default_factory=dict)  # not the load's, by Subject
    accept_latencies: list[float] = field(default_factory=list)  # s, MAIL to 250 after DATA
    e2e_latencies: list[float] = field(default_factory=list)  # s, 250 to arrival at the sink
    delivered_times: list[float] = field(default_factory=list)  # s since the start, same order
    cpu_seconds: float | None = None
    peak_memory: int | None = None  # bytes (PSS)
    peak_queue: int | None = None
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def accepted_rate(self) -> float:
        return self.accepted / self.load_seconds if self.load_seconds else 0.0

    @property
    def e2e_rate(self) -> float:
        return self.delivered / self.e2e_seconds if self.e2e_seconds else 0.0

    @property
    def drained(self) -> bool:
        return self.delivered >= self.expected

    def summary(self) -> dict[str, Any]:
        """The figures as one flat dict (for JSON and for the comparison)."""
        accept, e2e = percentiles(self.accept_latencies), percentiles(self.e2e_latencies)
        return {
            "target": self.target, "scenario": self.scenario, "dkim": self.dkim,
            "accepted": self.accepted, "refused": self.refused, "errors": self.errors,
            "delivered": self.delivered, "expected": self.expected,
            "accepted_rate": round(self.accepted_rate, 1), "e2e_rate": round(self.e2e_rate, 1),
            "load_seconds": round(self.load_seconds, 2), "e2e_seconds": round(self.e2e_seconds, 2),
            **{f"accept_{k}_ms": v for k, v in accept.items()},
            **{f"e2e_{k}_ms": v for k, v in e2e.items()},
            "cpu_seconds": _round(self.cpu_seconds, 2),
            "cpu_ms_per_msg": _round(self.cpu_per_message_ms(), 3),
            "peak_memory_mib": _round(self.peak_memory / 2**20 if self.peak_memory else None, 1),
            "peak_queue": self.peak_queue,
        }

    def cpu_per_message_ms(self) -> float | None:
        if self.cpu_seconds is None or not self.accepted:
            return None
        return 1000 * self.cpu_seconds / self.accepted


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values) - 1e-9)))
    return sorted_values[rank - 1]


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and max in milliseconds."""
    ordered = sorted(values)
    points = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    return {name: round(1000 * percentile(ordered, q), 1) for name, q in points.items()}


# --- text -------------------------------------------------------------------------------


def last_line(result: RunResult) -> str:
    e2e = percentiles(result.e2e_latencies)
    return (f"accepted_rate={result.accepted_rate:.1f} e2e_rate={result.e2e_rate:.1f} "
            f"p50_ms={e2e['p50']:.1f} p99_ms={e2e['p99']:.1f}")


def format_report(result: RunResult) -> str:
    s = result.summary()
    title = f"{result.target} / scenario {result.scenario}" + (" / DKIM RSA-2048" if result.dkim else "")
    lines = [
        f"== {title}",
        f"accepted    {s['accepted']} in {s['load_seconds']} s = {s['accepted_rate']} msg/s"
        f"  (refused {s['refused']}, errors {s['errors']}, replies {result.replies})",
        f"delivered   {s['delivered']} of {s['expected']} in {s['e2e_seconds']} s"
        f" = {s['e2e_rate']} msg/s end to end" + ("" if result.drained else "  (NOT DRAINED)"),
        "latency ms  " + _latency_row("accept", result.accept_latencies),
        "            " + _latency_row("accept-to-delivered (at the sink)", result.e2e_latencies),
        f"processes   CPU {_show(s['cpu_seconds'], 's')} ({_show(s['cpu_ms_per_msg'], 'ms/msg')}),"
        f" peak memory {_show(s['peak_memory_mib'], 'MiB')} (PSS),"
        f" peak queue {_show(s['peak_queue'], '')}",
    ]
    if result.other_arrivals:
        top = sorted(result.other_arrivals.items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"other mail at the sinks (DSNs, notices): "
                     f"{sum(result.other_arrivals.values())}, e.g. {dict(top)}")
    lines += [f"note        {note}" for note in result.notes]
    return "\n".join(lines)


def _latency_row(label: str, values: Sequence[float]) -> str:
    p = percentiles(values)
    return f"{label}: p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}"


def _show(value: Any, unit: str) -> str:
    return "n/a" if value is None else f"{value} {unit}".rstrip()


def format_comparison(ours: RunResult, theirs: RunResult) -> str:
    """Ratios ours / theirs for the accepted and end-to-end rates."""
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "n/a"

    return "\n".join([
        f"== {ours.target} vs {theirs.target} (scenario {ours.scenario}"
        + (", DKIM" if ours.dkim else "") + ")",
        f"accepted rate  {ours.accepted_rate:.1f} vs {theirs.accepted_rate:.1f} msg/s:"
        f" ratio {ratio(ours.accepted_rate, theirs.accepted_rate)}",
        f"e2e rate       {ours.e2e_rate:.1f} vs {theirs.e2e_rate:.1f} msg/s:"
        f" ratio {ratio(ours.e2e_rate, theirs.e2e_rate)}",
    ])


def write_json(results: Sequence[RunResult], path: Path) -> None:
    data = [{**r.summary(), "notes": r.notes, "replies": r.replies,
             "samples": [asdict(x) for x in r.samples]} for r in results]
    path.write_text(json.dumps(data, indent=1))


# --- the plot -------------------------------------------------------------------------------


def rates(samples: Sequence[Sample], attr: str, window: float = 1.0) -> tuple[list[float],
                                                                               list[float]]:
    """(times, messages/s) of a counter over sliding windows of about `window` seconds."""
    times, values = [], []
    start = 0
    for end in range(1, len(samples)):
        while samples[end].t - samples[start].t > window and start < end - 1:
            start += 1
        dt = samples[end].t - samples[start].t
        if dt > 0:
            times.append(samples[end].t)
            values.append((getattr(samples[end], attr) - getattr(samples[start], attr)) / dt)
    return times, values


def plot(results: Sequence[RunResult], path: Path) -> Path | None:
    """A PNG: accepted and delivered msg/s (top) and queue depth (bottom) over time.
    None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(results)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figure(results: Sequence[RunResult]) -> Any:
    """The plot's matplotlib figure; both axes start at zero (a rate, a depth)."""
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for result, color in zip(results, ("tab:blue", "tab:orange", "tab:green", "tab:red"),
                             strict=False):
        label = result.target + (" +DKIM" if result.dkim else "")
        top.plot(*rates(result.samples, "accepted"), color=color, label=f"{label} accepted")
        top.plot(*rates(result.samples, "delivered"), color=color, linestyle="--",
                 label=f"{label} delivered")
        queued = [(s.t, s.queue) for s in result.samples if s.queue is not None]
        if queued:
            bottom.plot([t for t, _ in queued], [q for _, q in queued], color=color, label=label)
    top.set_ylabel("messages / s")
    top.set_title(f"bench scenario {results[0].scenario}" if results else "bench")
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    bottom.set_ylabel("queue depth (messages)")
    bottom.set_xlabel("seconds since the load started")
    bottom.grid(alpha=0.3)
    if bottom.lines:
        bottom.legend(loc="best", fontsize="small")
    for axis in (top, bottom):
        axis.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


def save_outputs(results: Sequence[RunResult], out: Path) -> str:
    """The JSON figures and the PNG plot in `out`, named after the scenario and the time;
    returns the line that says where the plot is."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{results[0].scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    write_json(results, out / f"{stem}.json")
    png = plot(results, out / f"{stem}.png")
    return f"plot: {png}" if png else "plot: skipped (pip install matplotlib)"
