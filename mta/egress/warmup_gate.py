"""The warm-up gate: the `SourceGate` (mta.egress.gate) of sources marked warming.

`admit(source, provider)` is asked for each message a warming source would carry: the
ramp of (source, provider) is rolled over to today if it is older (`mta.egress.warmup.roll`,
one worker wins the compare-and-set and emits the transition), then the message is
counted against the day's cap in the store (LMDB for one node, Redis for several:
`mta.egress.warmup_store`), atomically. Once a cap is spent the gate remembers it until
the day ends, so the other messages of the day cost no store call.

`on_event` (registered with ctx.listen) counts the health signals of each warming source
at each provider (mta.egress.health); they are added to the store about once a second.
`status()` is the last overview read from the store plus the last transitions, for
`mta egress status`, /api/v1/egress and the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from mta.config import Config, EgressWarmupConfig
from mta.context import WorkerContext
from mta.egress.gate import OpenGate, SourceGate
from mta.egress.health import SignalReader
from mta.egress.warmup import (
    EVENT_TYPES,
    HealthLimits,
    Ramp,
    Signals,
    Transition,
    cap_at,
    day_of,
    day_start,
    next_day_start,
    roll,
    start,
)
from mta.egress.warmup_store import LmdbRampStore, Pair, RampStore, Take

log = logging.getLogger("mta.egress")

FLUSH_INTERVAL = 1.0  # seconds between writes of the counted signals
REFRESH_EVERY = 5  # flushes between two reads of the overview the status shows
ROLL_TRIES = 4  # compare-and-set rounds before a message is refused (another worker rolls)
RECENT = 50  # transitions kept for the status

EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class WarmingSource:
    name: str
    start: str  # ISO date of its first day
    schedule: list[int]  # messages per day per provider; 0: unlimited


def limits_of(cfg: EgressWarmupConfig) -> HealthLimits:
    return HealthLimits(cfg.max_hard_bounce_rate, cfg.max_complaint_rate,
                        cfg.max_deferral_rate, cfg.min_sample,
                        step_back=cfg.on_bad_health == "step_back")


def warming_sources(cfg: Config) -> dict[str, WarmingSource]:
    default = cfg.egress.warmup.schedule
    return {s.name: WarmingSource(s.name, s.warmup_start, list(s.warmup_schedule or default))
            for s in cfg.egress.sources if s.warmup_start}


class WarmupGate:
    def __init__(self, warming: dict[str, WarmingSource], store: RampStore,
                 limits: HealthLimits, tz: ZoneInfo, emit: EventSink,
                 clock: Callable[[], float] = time.time) -> None:
        self.warming = warming
        self.store = store
        self.limits = limits
        self.tz = tz
        self.emit = emit
        self.clock = clock
        self.reader = SignalReader(frozenset(warming))
        self.pending: dict[tuple[str, str, str], dict[str, int]] = {}
        self.spent: dict[Pair, str] = {}  # pair -> the day its cap was found spent
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.overview: list[tuple[Pair, Ramp, int, Signals]] = []
        self._task: asyncio.Task[None] | None = None

    # --- the SourceGate ------------------------------------------------------------

    def established(self, source: str) -> bool:
        return source not in self.warming

    async def admit(self, source: str, provider: str) -> bool:
        warming = self.warming.get(source)
        if warming is None:
            return True
        today = day_of(self.clock(), self.tz)
        pair = (source, provider)
        if today < warming.start or self.spent.get(pair) == today:
            return False
        if pair in self.spent:  # a cap spent on another day: forget the old days
            self.spent = {p: d for p, d in self.spent.items() if d == today}
        for _ in range(ROLL_TRIES):
            ramp = await self.store.ramp(pair)
            if ramp is None or ramp.day < today:
                await self._roll(pair, ramp, today, warming)
                continue
            if ramp.day > today:  # another node's clock is already in the next day
                return False
            taken = await self.store.take(pair, ramp, cap_at(warming.schedule, ramp.step))
            if taken is Take.OK:
                return True
            if taken is Take.FULL:
                self.spent[pair] = today
                return False
            if taken is Take.UNAVAILABLE:
                return False
        return False

    def retry_at(self, source: str, provider: str) -> float | None:
        """After a refusal: the start day, or the next day when the cap is spent; None
        when the state could not be read (Redis down: the caller looks again soon)."""
        warming = self.warming.get(source)
        if warming is None:
            return None
        now = self.clock()
        today = day_of(now, self.tz)
        if today < warming.start:
            return day_start(warming.start, self.tz)
        if self.spent.get((source, provider)) == today:
            return next_day_start(now, self.tz)
        return None

    def status(self) -> dict[str, Any]:
        today = day_of(self.clock(), self.tz)
        sources: dict[str, Any] = {
            name: {"warming": True, "start": w.start, "schedule": w.schedule,
                   "started": today >= w.start, "providers": {}}
            for name, w in self.warming.items()}
        for (source, provider), ramp, taken, signals in self.overview:
            if source not in sources:
                continue
            schedule = self.warming[source].schedule
            current = ramp.day == today
            sources[source]["providers"][provider] = {
                "step": ramp.step, "steps": len(schedule),
                "cap": cap_at(schedule, ramp.step), "day": ramp.day,
                "sent_today": taken if current else 0,
                "verdict": ramp.verdict.value, "reason": ramp.reason,
                "signals_today": signals.as_dict()}
        return {"timezone": str(self.tz), "day": today, "sources": sources,
                "transitions": list(self.recent)}

    # --- health signals ----------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        signal = self.reader.read(event)
        if signal is None:
            return
        key = (signal.source, signal.provider, day_of(self.clock(), self.tz))
        counts = self.pending.setdefault(key, {})
        counts[signal.name] = counts.get(signal.name, 0) + 1

    async def flush(self) -> None:
        """Add the signals counted since the last flush to the store."""
        batch, self.pending = self.pending, {}
        await self.store.add_signals(batch)  # also what a store kept back (Redis down)

    async def refresh(self) -> None:
        """Read the overview the status shows."""
        self.overview = await self.store.overview(day_of(self.clock(), self.tz))

    # --- rollover ------------------------------------------------------------------------

    async def _roll(self, pair: Pair, ramp: Ramp | None, today: str,
                    warming: WarmingSource) -> None:
        if ramp is None:
            new, transition = start(today), None
        else:
            signals = await self.store.signals(pair, ramp.day)
            new, transition = roll(ramp, today, warming.schedule, self.limits, signals)
        if await self.store.replace(pair, ramp, new) and transition is not None:
            self._tell(pair, transition)

    def _tell(self, pair: Pair, transition: Transition) -> None:
        source, provider = pair
        event = {"type": EVENT_TYPES[transition.verdict], "source": source,
                 "provider": provider, "step": transition.step,
                 "step_from": transition.step_from, "cap": transition.cap,
                 "reason": transition.reason, "judged_day": transition.judged_day,
                 "signals": transition.signals.as_dict()}
        log.info("warm-up %s at %s: %s, step %d -> %d (cap %s): %s", source, provider,
                 transition.verdict.value, transition.step_from, transition.step,
                 transition.cap if transition.cap is not None else "unlimited",
                 transition.reason)
        self.recent.append({**event, "time": round(self.clock(), 3)})
        self.emit(event)

    # --- running -----------------------------------------------------------------------

    def start(self, interval: float = FLUSH_INTERVAL) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(interval))

    async def _run(self, interval: float) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
                if rounds % REFRESH_EVERY == 0:
                    await self.refresh()
                rounds += 1
            except Exception:
                log.exception("warm-up: could not save the signals or read the state")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()


def make_source_gate(ctx: WorkerContext, shared: RampStore | None = None) -> SourceGate:
    """The gate of the engine: `OpenGate` when no source is warming, else a `WarmupGate`
    over the spool (one node) or `shared` (several nodes: Redis), listening to the events."""
    cfg = ctx.cfg
    warming = warming_sources(cfg)
    if not warming:
        return OpenGate()
    store: RampStore = shared or LmdbRampStore(ctx.spool, ctx.committer.submit)
    gate = WarmupGate(warming, store, limits_of(cfg.egress.warmup),
                      ZoneInfo(cfg.egress.warmup.timezone), ctx.emit)
    ctx.listen(gate.on_event)
    gate.start()
    ctx.on_close(gate.close)
    return gate
