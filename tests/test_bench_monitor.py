"""The bench reads like an instrument: samples every 0.1 s, rate axes from zero, progress
lines when the output is piped."""

from __future__ import annotations

import asyncio
import io
import statistics
from types import SimpleNamespace

import pytest

from bench.monitor import PIPED_EVERY, Monitor, Progress
from bench.report import RunResult, Sample


def test_piped_progress_prints_a_line_every_few_seconds_and_the_last_one() -> None:
    out = io.StringIO()  # not a terminal
    progress = Progress(True, out)
    for tenth in range(0, 51):
        progress.show("engine", Sample(tenth / 10, tenth, tenth, 0, None, None), (10.0, 9.0),
                      final=tenth == 50)
    progress.done()
    lines = out.getvalue().splitlines()
    times = [float(line.split()[1].rstrip("s")) for line in lines]
    assert times == [0.0, PIPED_EVERY, 2 * PIPED_EVERY, 5.0]
    assert "\r" not in out.getvalue() and lines[-1].startswith("[engine]    5.0s accepted 50")


@pytest.mark.asyncio
async def test_the_monitor_samples_at_least_every_tenth_of_a_second() -> None:
    target = SimpleNamespace(processes=None, label="engine", queue_depth=lambda: 0)
    monitor = Monitor(target, SimpleNamespace(accepted_at=[]), SimpleNamespace(delivered=0),
                      SimpleNamespace(throttle_accepted=lambda: 0), Progress(False))
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    while len(monitor.samples) < 12:
        await asyncio.sleep(0.02)
    stop.set()
    await task
    gaps = [b.t - a.t for a, b in zip(monitor.samples, monitor.samples[1:11], strict=False)]
    assert statistics.median(gaps) <= 0.15  # 0.1 s, with room for a loaded machine


def test_the_plot_s_axes_start_at_zero() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bench.report import figure

    samples = [Sample(t / 10, 1000 + 50 * t, 900 + 50 * t, 500 + t, None, None)
               for t in range(40)]
    fig = figure([RunResult("engine", "steady", samples=samples)])
    try:
        top, bottom = fig.axes
        assert top.get_ylim()[0] == 0 and bottom.get_ylim()[0] == 0
        assert len(top.lines[0].get_xdata()) >= 30  # a short run still draws a curve
    finally:
        plt.close(fig)
