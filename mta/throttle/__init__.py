"""Traffic shaping and adaptive throttling per destination and provider.

The scheduler's side of it is `Throttle` (see mta/throttle/throttle.py for how to call
it); the shaping file is loaded with `load_shaping`; snapshots for `mta throttle status`
go through `save_snapshot` / `load_snapshots`.
"""

from mta.throttle.classify import CONNECTION_FAILED, Signal, classify
from mta.throttle.gcra import Gcra
from mta.throttle.shaping import Limits, Provider, Rule, Shaping, load_shaping, parse_shaping
from mta.throttle.store import clear_snapshots, load_snapshots, save_snapshot, snapshot_op
from mta.throttle.throttle import (
    ACCOUNT_SUSPENDED,
    CAMPAIGN_SUSPENDED,
    DEFER,
    FAIL,
    OK,
    SLOW_DOWN,
    SUSPENDED,
    WAIT_FOR_CLOSE,
    Decision,
    Destination,
    Throttle,
    worker_share,
)
from mta.throttle.units import Rate, format_duration, format_rate, parse_duration, parse_rate

__all__ = [
    "ACCOUNT_SUSPENDED", "CAMPAIGN_SUSPENDED", "CONNECTION_FAILED", "DEFER", "FAIL", "OK",
    "SLOW_DOWN", "SUSPENDED", "WAIT_FOR_CLOSE", "Decision", "Destination", "Gcra", "Limits",
    "Provider", "Rate", "Rule", "Shaping", "Signal", "Throttle", "classify",
    "clear_snapshots", "format_duration", "format_rate", "load_shaping", "load_snapshots",
    "parse_duration", "parse_rate", "parse_shaping", "save_snapshot", "snapshot_op",
    "worker_share",
]
