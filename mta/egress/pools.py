"""Which pool a message uses and which source of the pool carries it: pure logic, no I/O.

- `pool_for`: the account's pool (`[[accounts]] pool`; trial accounts without one:
  `[egress] trial_pool`; else `[egress] default_pool`), or the pool the campaign asked for
  with `[egress] campaign_pool_header`, honoured only when the account may use it
  (`[[accounts]] pools`).
- `SmoothWeighted`: nginx's smooth weighted round robin over a pool's sources, skipping
  the sources the caller says are not eligible now (down, suspended, refused by the gate).
- `Sources`: the configured sources and pools, by name; empty when no source is
  configured (then every message leaves as before: [delivery] source_address, helo_name).
  It picks in runs: the source the rotation gives carries `[egress] run_length`
  messages in a row to one destination (one pool of connections kept busy, not the
  destination's mail trickled over every source); the weights hold over the runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container
from dataclasses import dataclass

from mta.config import AccountConfig, Config, EgressConfig

POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TRIAL_PLAN = "trial"  # [[accounts]] plan of trial accounts (mta.policy.admission)
MAX_RUNS = 100_000  # (pool, destination) runs remembered at most


@dataclass(frozen=True)
class Source:
    """A sending identity: the address bound and the EHLO name said, always together."""

    name: str
    address: str
    ehlo_name: str

    @property
    def family_v6(self) -> bool:
        return ":" in self.address


@dataclass
class Run:
    """The source carrying a destination's mail now, and how many more messages."""

    source: str
    left: int


class SmoothWeighted:
    """nginx's smooth weighted round robin: each pick adds every eligible member's weight
    to its current value, takes the member with the highest, and subtracts the total of
    the eligible weights from it. Weights 3:1 give a, a, b, a, a, a, b, a, ... (spread,
    not bunched); a member skipped for a while does not catch up with a burst."""

    def __init__(self, members: list[tuple[str, int]]) -> None:
        self.weights = dict(members)
        self.current = dict.fromkeys(self.weights, 0)

    def pick(self, eligible: Container[str] | None = None) -> str | None:
        """The next member among `eligible` (None: all); None when none is eligible."""
        best: str | None = None
        total = 0
        for name, weight in self.weights.items():
            if eligible is not None and name not in eligible:
                continue
            self.current[name] += weight
            total += weight
            if best is None or self.current[name] > self.current[best]:
                best = name
        if best is not None:
            self.current[best] -= total
        return best


def allowed_pools(account: AccountConfig | None) -> list[str]:
    return list(account.pools) if account is not None else []


def account_pool(egress: EgressConfig, account: AccountConfig | None) -> str:
    """The pool of an account's mail when its campaign asks for none."""
    if account is not None and account.pool:
        return account.pool
    if account is not None and account.plan == TRIAL_PLAN and egress.trial_pool:
        return egress.trial_pool
    return egress.default_pool


def pool_for(egress: EgressConfig, account: AccountConfig | None, asked: str = "") -> str:
    """The pool of a message: the one asked for (campaign header) when the account may use
    it, else the account's; "" when no pools are configured."""
    own = account_pool(egress, account)
    if asked and (asked == own or asked in allowed_pools(account)):
        return asked
    return own


def check_pool_field(values: list[str], header: str) -> tuple[str, str | None]:
    """The pool a message's header field names ("" for none), or the SMTP refusal of a
    malformed one. Whether the account may use it is decided by `pool_for`."""
    if not values:
        return "", None
    if len(values) > 1:
        return "", f"550 5.6.0 {header}: appears {len(values)} times; give one pool"
    name = values[0].strip()
    if not POOL_NAME.fullmatch(name):
        return "", f"550 5.6.0 {header}: not a pool name"
    return name, None


class Sources:
    """The configured sources and pools (one worker's copy, with the pools' SWRR state)."""

    def __init__(self, cfg: Config) -> None:
        self.egress = cfg.egress
        self.accounts = {a.name: a for a in cfg.accounts}
        self.by_name = {s.name: Source(s.name, s.address, s.ehlo_name)
                        for s in cfg.egress.sources}
        self.members = {p.name: [(m.source, m.weight) for m in p.sources]
                        for p in cfg.egress.pools}
        self.rotations = {name: SmoothWeighted(members)
                          for name, members in self.members.items()}
        self.run_length = cfg.egress.run_length
        self.runs: dict[tuple[str, str], Run] = {}  # (pool, destination) -> its run

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def pool_of(self, account: str, asked: str = "") -> str:
        return pool_for(self.egress, self.accounts.get(account), asked)

    def pools_of(self, source: str) -> list[str]:
        return [pool for pool, members in self.members.items()
                if any(name == source for name, _ in members)]

    def sources_of(self, pool: str) -> list[str]:
        return [name for name, _ in self.members.get(pool, [])]

    def pick(self, pool: str, eligible: Callable[[str], bool], destination: str = ""
             ) -> str | None:
        """The source of the next message of `pool` to `destination`, among those
        `eligible` says yes to: the source of the destination's run while it lasts and is
        eligible, else the next by weight (which starts a new run)."""
        rotation = self.rotations.get(pool)
        if rotation is None:
            return None
        run = self.runs.get((pool, destination))
        if run is not None and run.left > 0 and eligible(run.source):
            run.left -= 1
            return run.source
        name = rotation.pick({name for name in rotation.weights if eligible(name)})
        if name is not None:
            if len(self.runs) >= MAX_RUNS:  # destinations seen once long ago: start over
                self.runs.clear()
            self.runs[(pool, destination)] = Run(name, self.run_length - 1)
        return name
