"""Human or machine: who opened or clicked, decided by plain rules (no I/O).

The rules, in order, and the name each gives as the reason:

- ``head-request``: a HEAD request (link checkers and scanners; browsers GET);
- ``hidden-link``: a click on the invisible link only a bot follows;
- ``no-user-agent``: a request without a User-Agent;
- ``agent:<pattern>``: a user agent of a mail-privacy proxy or a scanner (Apple's and
  Google's image proxies, security gateways, HTTP libraries), `[tracking] machine_agents`;
- ``every-link-after-delivery``: clicks on every link of a message within
  `[tracking] scanner_window` seconds of its delivery (a security scanner). Clicks that
  come that early wait in `Bursts` until either every link was clicked (all machine) or
  the window closes (the ones that came are then human);
- ``browser``: anything else, a person.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mta.tracking.tokens import CLICK, HIDDEN, TrackTarget

HUMAN, MACHINE = "human", "machine"


@dataclass
class Hit:
    target: TrackTarget
    method: str
    agent: str
    client: str
    at: float
    verdict: str = ""
    rule: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def decided(self, verdict: str, rule: str) -> Hit:
        self.verdict, self.rule = verdict, rule
        return self


def by_request(hit: Hit, agents: list[str]) -> tuple[str, str] | None:
    """The verdict the request alone gives, if it gives one."""
    if hit.method == "HEAD":
        return MACHINE, "head-request"
    if hit.target.kind == CLICK and hit.target.index == HIDDEN:
        return MACHINE, "hidden-link"
    agent = hit.agent.lower()
    if not agent.strip():
        return MACHINE, "no-user-agent"
    for pattern in agents:
        if pattern and pattern.lower() in agent:
            return MACHINE, f"agent:{pattern}"
    return None


class Bursts:
    """Early clicks per (message, recipient), until every link or the window decides."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.pending: dict[tuple[str, str], list[Hit]] = {}
        self.scanned: dict[tuple[str, str], float] = {}  # key -> end of its window

    def early(self, hit: Hit) -> bool:
        return self.window > 0 and hit.at - hit.target.sent_at <= self.window

    def add(self, hit: Hit) -> list[Hit]:
        """The hits decided by this one (possibly none yet: it waits)."""
        t = hit.target
        key = (t.message, t.recipient)
        if key in self.scanned:
            return [hit.decided(MACHINE, "every-link-after-delivery")]
        waiting = self.pending.setdefault(key, [])
        waiting.append(hit)
        if len({h.target.index for h in waiting}) < max(t.links, 1):
            return []
        del self.pending[key]
        self.scanned[key] = t.sent_at + self.window
        return [h.decided(MACHINE, "every-link-after-delivery") for h in waiting]

    def due(self, now: float, everything: bool = False) -> list[Hit]:
        """Hits whose window has closed without every link clicked: a person's."""
        done = []
        for key, waiting in list(self.pending.items()):
            if everything or now > waiting[0].target.sent_at + self.window:
                del self.pending[key]
                done.extend(h.decided(HUMAN, "browser") for h in waiting)
        for key, end in list(self.scanned.items()):
            if now > end:
                del self.scanned[key]
        return done


def classify(hit: Hit, agents: list[str], bursts: Bursts) -> list[Hit]:
    """The hits decided now: this one, or those a burst decides, or none (it waits)."""
    verdict = by_request(hit, agents)
    if verdict is not None:
        return [hit.decided(*verdict)]
    if hit.target.kind == CLICK and bursts.early(hit):
        return bursts.add(hit)
    return [hit.decided(HUMAN, "browser")]
