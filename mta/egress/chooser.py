"""The source of each message, chosen at dispatch (one per worker, used by the deliverer).

Within the message's pool (mta.egress.pools) the sources are taken by weight, skipping:

- a source that is down (its address failed to bind or connect at run time, for
  `[egress] down_interval` seconds; SourceDown / SourceUp events);
- a source an operator suspended (`mta queue suspend source NAME`, mta.queue.rules); when
  every source left is suspended the message is held (`Choice.held`) until the rule goes;
  a source with a bounce rule bounces the message (`Choice.bounced`);
- a source the gate (warm-up, mta.egress.gate) does not admit for the provider now.

When no source is left the message waits (`Choice.wait`, seconds): until the first
source is up again, or until the gate says (a warming source's cap is spent and the pool
has no established source), never bounced.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mta.egress.gate import OpenGate, SourceGate
from mta.egress.pools import Source, Sources

log = logging.getLogger("mta.egress")

GATE_WAIT = 60.0  # a refusal without a time from the gate: look again after this


class SourceRules(Protocol):
    """An operator's rules on sources (mta.queue.rules.RuleCheck)."""

    def source_rules(self) -> dict[str, Any]:
        """The active rule (its `action`: "bounce" or "suspend") of each source that has
        one, by lower-case source name."""


class Verdict(enum.Enum):
    CHOSEN = "chosen"
    HELD = "held"  # every usable source is suspended: hold it (Scheduler.take_held)
    BOUNCED = "bounced"  # the chosen source has a bounce rule (Scheduler.take_bounced)
    WAIT = "wait"  # no source may carry it now: postpone it by `wait` seconds


@dataclass(frozen=True)
class Choice:
    verdict: Verdict
    source: Source | None = None
    wait: float = 0.0
    reason: str = ""


EventSink = Callable[[dict[str, Any]], None]


class Egress:
    def __init__(self, sources: Sources, gate: SourceGate | None = None,
                 down_interval: float = 60.0, on_event: EventSink | None = None,
                 rules: SourceRules | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.sources = sources
        self.gate: SourceGate = gate or OpenGate()
        self.down_interval = down_interval
        self.on_event = on_event
        self.rules = rules
        self.clock = clock
        self.down_until: dict[str, float] = {}  # source -> until when it is not used
        self.down_reason: dict[str, str] = {}  # kept until it connects again (SourceUp)
        self.listeners: list[Callable[[str, bool], None]] = []  # (source, up) on changes

    def __bool__(self) -> bool:
        return bool(self.sources)

    # --- the choice ----------------------------------------------------------------

    def pool_of(self, message: dict[str, Any]) -> str:
        return self.sources.pool_of(message.get("account", ""), message.get("pool", ""))

    async def choose(self, pool: str, provider: str) -> Choice:
        """The source of one message of `pool` to `provider` (see the module's doc)."""
        members = self.sources.sources_of(pool)
        if not members:
            return Choice(Verdict.WAIT, wait=GATE_WAIT, reason=f"pool {pool!r} has no source")
        now = self.clock()
        up = [name for name in members if self.is_up(name, now)]
        if not up:
            wait = min(self.down_until[name] for name in members) - now
            return Choice(Verdict.WAIT, wait=max(1.0, wait),
                          reason=f"every source of pool {pool} is down")
        rules = self.rules.source_rules() if self.rules is not None else {}
        usable = {name for name in up if _action(rules.get(name.lower())) != "suspend"}
        if not usable:
            return Choice(Verdict.HELD, self.sources.by_name[up[0]])
        refused: list[str] = []
        while (name := self.sources.pick(pool, usable.__contains__, provider)) is not None:
            if _action(rules.get(name.lower())) == "bounce":
                return Choice(Verdict.BOUNCED, self.sources.by_name[name])
            if await self.gate.admit(name, provider):
                return Choice(Verdict.CHOSEN, self.sources.by_name[name])
            usable.discard(name)
            refused.append(name)
        return Choice(Verdict.WAIT, wait=self._gate_wait(refused, provider, now),
                      reason=f"every source of pool {pool} is at its warm-up cap at {provider}")

    def _gate_wait(self, refused: list[str], provider: str, now: float) -> float:
        times = [t for t in (self.gate.retry_at(name, provider) for name in refused)
                 if t is not None]
        return max(1.0, min(times) - now) if times else GATE_WAIT

    # --- up and down -----------------------------------------------------------------

    def is_up(self, name: str, now: float | None = None) -> bool:
        until = self.down_until.get(name)
        return until is None or (self.clock() if now is None else now) >= until

    def failed(self, name: str, reason: str) -> None:
        """Its address could not be bound (or used) at run time: down for a while."""
        now = self.clock()
        was_up = self.is_up(name, now) and name not in self.down_reason
        self.down_until[name] = now + self.down_interval
        self.down_reason[name] = reason
        source = self.sources.by_name.get(name)
        log.warning("egress source %s (%s) is down for %.0f s: %s", name,
                    source.address if source else "?", self.down_interval, reason)
        if was_up:
            self._changed(name, False, reason, until=now + self.down_interval)

    def connected(self, name: str) -> None:
        """A connection from it was made: up again if it was down."""
        if name in self.down_reason:
            self.down_until.pop(name, None)
            self.down_reason.pop(name, None)
            self._changed(name, True, "connected again")

    def _changed(self, name: str, up: bool, reason: str, **fields: Any) -> None:
        source = self.sources.by_name.get(name)
        if self.on_event is not None:
            self.on_event({"type": "SourceUp" if up else "SourceDown", "source": name,
                           "address": source.address if source else "",
                           "reason": reason, **fields})
        for listener in self.listeners:
            listener(name, up)

    def state(self) -> dict[str, dict[str, Any]]:
        """Per source: up or down (with until when and why), for the status."""
        now = self.clock()
        return {name: {"up": self.is_up(name, now) and name not in self.down_reason,
                       "down_until": self.down_until.get(name) if name in self.down_reason
                       else None, "reason": self.down_reason.get(name, "")}
                for name in self.sources.by_name}


def _action(rule: Any | None) -> str:
    return "" if rule is None else str(getattr(rule, "action", ""))
