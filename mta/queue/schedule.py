"""Scheduled sending: when a message may first be tried, and delivery windows.

Plain functions and small records, no I/O:

- `parse_send_at(text)`: the time an `X-Send-At` field (or the injection API's
  `send_at`) names, as Unix seconds: an RFC 3339 date-time with its offset
  (``2026-12-06T09:00:00+01:00``, ``...Z``) or Unix seconds (``1765000000``,
  ``1765000000.5``). None for anything else.
- `Window`: the days of the week and the hours (in a time zone, via zoneinfo) during
  which a campaign's mail may be attempted; `Window.next_open(t)` is the start of the
  next window after `t`, or None when `t` is inside one.
- `Windows`: the windows of each campaign (optionally of one account); the scheduler
  asks it, for each due job, whether to push the job to the next window start.

A message with a send time is stored at once; its jobs are first due at that time (the
spool's `due` index is the only clock) and keep it as their `not_before`, so that a
job held (a paused campaign) and released early still waits for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from mta.config import Config

_UNIX = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS = re.compile(r"([0-9]{1,2}):([0-9]{2})-([0-9]{1,2}):([0-9]{2})")


def parse_send_at(text: str) -> float | None:
    """Unix seconds of an RFC 3339 date-time (with its offset) or of Unix seconds;
    None when `text` is neither."""
    text = text.strip()
    if _UNIX.fullmatch(text):
        return float(text)
    if not _RFC3339.fullmatch(text):
        return None
    text = text.replace("z", "Z").replace("t", "T")
    if text[10] == " ":
        text = text[:10] + "T" + text[11:]
    head, dot, rest = text.partition(".")
    if dot:  # fromisoformat takes 3 or 6 fraction digits on 3.11: make them 6
        digits = re.match(r"[0-9]+", rest).group(0)  # type: ignore[union-attr]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    text = text.replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def parse_days(days: list[str]) -> frozenset[int]:
    """Weekday numbers (Monday 0) of names like "mon" or ranges like "mon-fri"."""
    found: set[int] = set()
    for item in days:
        first, _, last = item.strip().lower().partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"{item!r} is not a day (mon..sun) or a range (mon-fri)")
        a = DAYS.index(first)
        b = DAYS.index(last) if last else a
        n = a
        while True:
            found.add(n)
            if n == b:
                break
            n = (n + 1) % 7
    return frozenset(found)


def parse_hours(hours: str) -> tuple[int, int]:
    """(start, end) minutes of the day of "HH:MM-HH:MM"; end may be 24:00, and an end
    before the start runs past midnight."""
    match = _HOURS.fullmatch(hours.strip())
    if not match:
        raise ValueError(f"{hours!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = map(int, match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or end > 24 * 60 or start == end:
        raise ValueError(f"{hours!r} is not a window of the day (00:00-24:00)")
    return start, end


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a time zone (like Europe/Paris or UTC)") from None


@dataclass(frozen=True)
class Window:
    """Days (0 Monday) and minutes of the day [start, end) in a time zone. A window
    whose end is before its start runs past midnight into the next day."""

    days: frozenset[int]
    start: int
    end: int
    tz: ZoneInfo

    @classmethod
    def of(cls, days: list[str], hours: str, timezone: str) -> Window:
        start, end = parse_hours(hours)
        return cls(parse_days(days or list(DAYS)), start, end, zone(timezone))

    def _open_at(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return local.weekday() in self.days and self.start <= minute < self.end
        # past midnight: the evening part on a listed day, the morning part after it
        return ((local.weekday() in self.days and minute >= self.start)
                or ((local.weekday() - 1) % 7 in self.days and minute < self.end))

    def next_open(self, when: float) -> float | None:
        """None when `when` (Unix seconds) is inside the window; else the start of the
        next one (Unix seconds)."""
        local = datetime.fromtimestamp(when, self.tz)
        if self._open_at(local):
            return None
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        for n in range(8):
            date = (day + timedelta(days=n)).date()
            if date.weekday() not in self.days:
                continue
            start = datetime(date.year, date.month, date.day, self.start // 60,
                             self.start % 60, tzinfo=self.tz)
            if start.timestamp() > when:
                return start.timestamp()
        return None  # no day listed: never reached (parse_days gives at least one)


class Windows:
    """The delivery windows of campaigns: (account or '' for any, campaign) -> windows
    (mail may go during any of them)."""

    def __init__(self, rules: list[tuple[str, str, Window]]) -> None:
        self._by: dict[tuple[str, str], list[Window]] = {}
        for account, campaign, window in rules:
            self._by.setdefault((account, campaign), []).append(window)

    def __bool__(self) -> bool:
        return bool(self._by)

    def next_open(self, account: str, campaign: str, when: float) -> float | None:
        """None when mail of this campaign may be attempted at `when`; else the earliest
        start of one of its windows."""
        if not campaign:
            return None
        windows = self._by.get((account, campaign)) or self._by.get(("", campaign))
        if not windows:
            return None
        starts = []
        for window in windows:
            start = window.next_open(when)
            if start is None:
                return None
            starts.append(start)
        return min(starts)


def windows_of(cfg: Config) -> Windows:
    """The `[[windows]]` of the config as `Windows`."""
    rules = []
    for window in cfg.windows:
        rules.append((window.account, window.campaign,
                      Window.of(window.days, window.hours, window.timezone)))
    return Windows(rules)
