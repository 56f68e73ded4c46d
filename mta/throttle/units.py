"""Parsing of the shaping file's units: rates ("100/s", "3000/h") and durations ("30m")."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SECONDS = {
    "ms": 0.001,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """`count` events per `period` seconds."""

    count: float
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def scaled(self, factor: float) -> Rate:
        return Rate(self.count * factor, self.period)

    def __str__(self) -> str:
        return format_rate(self.per_second)


def parse_duration(value: str | int | float) -> float:
    """'30m' -> 1800.0; '500ms' -> 0.5; a bare number is seconds. ValueError if not."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration like '30s', '5m' or '2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(value.lower())
        if match is None or match.group(2) not in _SECONDS | {"": 1.0}:
            raise ValueError(f"{value!r} is not a duration like '30s', '5m' or '2h'")
        seconds = float(match.group(1)) * _SECONDS.get(match.group(2), 1.0)
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def parse_rate(value: str) -> Rate:
    """'100/s' -> Rate(100, 1); '3000/h' -> Rate(3000, 3600); '5/10m' -> Rate(5, 600)."""
    match = _RATE.match(value.lower()) if isinstance(value, str) else None
    if match is None or match.group(3) not in _SECONDS:
        raise ValueError(f"{value!r} is not a rate like '100/s', '50/m' or '3000/h'")
    count = float(match.group(1))
    period = float(match.group(2) or 1) * _SECONDS[match.group(3)]
    if count <= 0 or period <= 0:
        raise ValueError(f"{value!r} must be a positive rate")
    return Rate(count, period)


def format_rate(per_second: float | None) -> str:
    """A rate for people: '12.5/s', '40/m', '90/h'; None is 'unlimited'."""
    if per_second is None:
        return "unlimited"
    if per_second >= 1:
        return f"{per_second:.4g}/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:.3g}/m"
    return f"{per_second * 3600:.3g}/h"


def format_duration(seconds: float) -> str:
    """90 -> '1m30s'; 7200 -> '2h'; at most two units, so 7199.4 (a countdown read a moment
    late) is '2h', not '1h59m59s'."""
    seconds = max(0, round(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    top = next(i for i, (_, size) in enumerate(units) if seconds >= size or size == 1)
    grain = units[min(top + 1, len(units) - 1)][1]
    seconds = round(seconds / grain) * grain
    parts = []
    for unit, size in units:
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"
