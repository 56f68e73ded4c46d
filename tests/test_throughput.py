"""The throughput history the dashboard draws: per-worker rings in files, added up."""

from __future__ import annotations

import time
from pathlib import Path

from mta.throughput import Ring, history, remove_rings

T0 = 1_800_000_000.0  # a whole minute


def test_rings_of_several_workers_add_up_per_second_and_per_minute(tmp_path: Path) -> None:
    first, second = Ring(tmp_path / "throughput-1.ring"), Ring(tmp_path / "throughput-2.ring")
    for n in range(5):
        first.add(0, T0 + n)
    second.add(1, T0 + 4, count=3)
    second.add(2, T0 + 61)
    now = T0 + 125.5
    h = history(str(tmp_path), None, now)
    sec = h["seconds"]
    assert sec["step"] == 1 and len(sec["received"]) == 3600
    assert sec["start"] + 3599 == int(now) - 1  # the last complete second
    at = int(T0 - sec["start"])
    assert sec["received"][at:at + 5] == [1] * 5 and sum(sec["received"]) == 5
    assert sec["delivered"][at + 4] == 3 and sum(sec["deferred"]) == 1
    minutes = h["minutes"]
    assert minutes["step"] == 60 and len(minutes["received"]) == 1440
    assert minutes["received"][-2:] == [5, 0] and minutes["deferred"][-1] == 1
    assert minutes["delivered"][-2] == 3
    assert h["current"] == {"received": 0.0, "delivered": 0.0, "deferred": 0.0}
    first.close()
    second.close()
    remove_rings(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_slot_an_hour_old_counts_no_more_and_events_count_by_kind() -> None:
    ring = Ring()
    ring.add(0, T0, count=7)
    ring.add(0, T0 + 3600)  # the same slot, an hour later: starts again
    h = history(None, ring, T0 + 3601)
    assert sum(h["seconds"]["received"]) == 1 and h["seconds"]["received"][-1] == 1
    assert h["current"]["received"] == 0.1  # one in the last ten seconds
    for kind in ("Reception", "Delivery", "Delivery", "TransientFailure", "Bounce"):
        ring.on_event({"type": kind})
    h = history(None, ring, time.time() + 1)
    assert [sum(h["seconds"][k]) for k in ("received", "delivered", "deferred")] == [1, 2, 1]
