"""The worker process's own settings (the engine runs in subprocesses elsewhere)."""

from __future__ import annotations

import subprocess
import sys

from mta.engine import GC_THRESHOLDS


def test_worker_freezes_what_start_made_and_collects_young_objects_less_often() -> None:
    # In a process of its own: the collector's settings are the interpreter's.
    probe = ("import gc\nfrom mta.engine import settle_garbage_collector\n"
             "settle_garbage_collector()\n"
             "print(*gc.get_threshold(), gc.get_freeze_count(), len(gc.get_objects()))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.split()
    threshold, frozen, tracked = tuple(map(int, out[:3])), int(out[3]), int(out[4])
    assert threshold == GC_THRESHOLDS and threshold[0] > 700  # the default is (700, 10, 10)
    assert frozen > tracked  # start's objects moved to the permanent generation
