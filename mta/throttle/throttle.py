"""The per-worker throttle: limits per destination, adapted to what the receivers say.

A worker process makes one `Throttle` (mta.delivery.service.make_throttle), and its
deliverer (mta/delivery/deliverer.py) asks it, for each destination:

- ``dest = throttle.destination(domain, mx_hosts)`` which limits apply;
- ``throttle.max_connections(dest)`` how many connections the destination's pool may run;
- ``throttle.try_connect(dest, now)`` before opening a connection (0.0: go; after a
  refused connection it asks to wait retry_delay, doubling while refusals continue);
- ``throttle.try_send(dest, now, campaign, account)`` before each message (0.0: go);
- ``throttle.record(dest, code, enhanced, text, now, campaign, account)`` with every reply
  (and with ``code=CONNECTION_FAILED`` for refused/reset connections), which returns the
  `Decision` of what to do with the message;
- ``throttle.messages_per_connection(dest)`` and ``throttle.over_connection_limit(dest)``
  when to close a connection;
- ``throttle.connection_closed(dest)`` once for every connection that try_connect allowed.

About once a second the worker stores ``throttle.snapshot()`` in the spool
(mta.throttle.store; `mta throttle status` and the admin API read it); taking the
snapshot also lifts the suspensions and rule throttles whose time is up (each change an
event, a `ThrottleChange` in the event log) and forgets idle destinations.

Pass ``connecting=True`` to record() for replies to the greeting or EHLO: they are about
connections (cut the connection count only), not about the message rate.

Limits are kept per *scope*: a provider (all domains whose MX matches its suffixes) or a
domain. A destination served by a provider is limited by the provider's scope, plus its
own domain scope when the shaping file has an override for that domain. Adaptation and
rule actions act on the destination's first scope (its provider when it has one).

Across worker processes: each domain is delivered by exactly one worker, so a domain
scope's limits are that worker's. A provider spans workers, so each worker enforces its
share: the rate divided by the number of workers, the connections split as evenly as
whole numbers allow (at least 1 each). The sum never exceeds the engine-wide limit
(except that every worker keeps at least one connection); a worker that has little
traffic for a provider leaves part of the budget unused (see `worker_share`).

Across nodes ([cluster] redis): the Throttle is made with ``workers=1`` (every worker
keeps the whole budget, so one busy worker may use all of it) and
`mta.cluster.throttle.ClusterThrottle`, which the deliverer asks after the throttle,
holds the budget across all workers of all nodes in Redis; it reads the limits in force
from `Throttle.budgets`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mta.throttle.adapt import Dial, Meter
from mta.throttle.classify import CONNECTION_FAILED, Signal, classify
from mta.throttle.gcra import Gcra
from mta.throttle.shaping import Limits, Rule, Shaping

WAIT_FOR_CLOSE = math.inf  # try_connect: at the connection limit; try again after a close

# Decision actions.
OK = "ok"  # delivered: nothing to do
SLOW_DOWN = "slow_down"  # keep the message ready for this destination from retry_at on
DEFER = "defer"  # a deferral about this message: the usual retry schedule
FAIL = "fail"  # a permanent reply: the usual bounce handling
SUSPENDED = "suspended"  # the destination is suspended until `until`
CAMPAIGN_SUSPENDED = "campaign_suspended"  # this campaign, at this destination, until `until`
ACCOUNT_SUSPENDED = "account_suspended"  # this account, at this destination, until `until`

EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Decision:
    """What the scheduler does with the message after a reply.

    retry_at set: requeue the message as ready for this destination at that time, without
    counting the attempt against its retry schedule (a "slow down" or a suspension is
    about the sender's pace, not the message). retry_at None: the usual handling
    (delivered, retry schedule for a deferral, bounce for a permanent failure)."""

    action: str
    retry_at: float | None = None
    until: float | None = None  # end of a suspension
    reason: str = ""
    signal: Signal = Signal.NEUTRAL


@dataclass(frozen=True)
class ScopeSpec:
    kind: str  # "provider" or "domain"
    name: str
    limits: Limits  # engine-wide
    shared: bool  # divided among the workers
    source: str = ""  # the egress source (mta.egress): receivers limit per sending address

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}@{self.source}" if self.source else f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class Destination:
    """Which limits apply to one recipient domain; make it with `Throttle.destination`."""

    domain: str
    provider: str | None
    scopes: tuple[ScopeSpec, ...]  # the first one adapts and takes the rules' actions

    @property
    def name(self) -> str:
        return self.scopes[0].name

    @property
    def source(self) -> str:
        return self.scopes[0].source

    def from_source(self, source: str) -> Destination:
        """The same limits, kept apart for mail sent from egress source `source`."""
        return Destination(self.domain, self.provider, tuple(  # not replace(): per message
            ScopeSpec(s.kind, s.name, s.limits, s.shared, source) for s in self.scopes))


@dataclass
class Hold:
    until: float
    reason: str


@dataclass
class Scope:
    """The live state of one scope in this worker."""

    spec: ScopeSpec
    rate_ceiling: float | None  # this worker's share, messages per second
    conn_ceiling: int
    conn_rate: float | None
    rate: Dial
    conns: Dial
    msg_gcra: Gcra | None = None
    conn_gcra: Gcra | None = None
    connections: int = 0
    sent: int = 0
    deferred: int = 0
    connection_failures: int = 0  # in a row
    connect_after: float = 0.0  # no new connection before this (after a refused one)
    accepted: Meter = field(default_factory=Meter)
    suspended: Hold | None = None
    cap: Hold | None = None  # a throttle rule's lower limits, until
    cap_rate: float | None = None
    cap_conns: int | None = None
    campaigns: dict[str, Hold] = field(default_factory=dict)
    accounts: dict[str, Hold] = field(default_factory=dict)
    rule_hits: dict[tuple[str, str], deque[float]] = field(default_factory=dict)
    reason: str = ""
    changed: float | None = None
    last_used: float = 0.0

    def effective_rate(self) -> float | None:
        values = [v for v in (self.rate.value, self.cap_rate) if v is not None]
        return min(values) if values else None

    def max_connections(self) -> int:
        current = int(self.conns.value or self.conn_ceiling)
        return min(current, self.cap_conns) if self.cap_conns is not None else current

    def pristine(self) -> bool:
        return not (self.rate.adapted or self.conns.adapted or self.suspended or self.cap
                    or self.campaigns or self.accounts or self.connections)


@dataclass(frozen=True)
class Budget:
    """One scope's limits in force now, as `Throttle.budgets` reports them."""

    key: str  # the scope: "provider:NAME", "domain:NAME", "site:mx:..."
    max_connections: int
    message_rate: float | None  # messages per second; None: unlimited
    message_burst: int
    connection_rate: float | None  # new connections per second; None: unlimited


def _budget(sc: Scope) -> Budget:
    rate = sc.effective_rate()
    burst = _burst(sc.spec.limits.message_burst, rate) if rate is not None else 1
    return Budget(sc.spec.key, sc.max_connections(), rate, burst, sc.conn_rate)


def worker_share(total: int, worker: int, workers: int) -> int:
    """Worker `worker`'s whole-number share of `total`: as even as possible, at least 1."""
    base, extra = divmod(total, workers)
    return max(1, base + (1 if worker < extra else 0))


def _burst(configured: int, per_second: float) -> int:
    return configured if configured > 0 else 1 + int(per_second * 0.1)


def _excerpt(code: int, enhanced: str | None, text: str) -> str:
    flat = " ".join(text.split())
    head = "connection failed" if code == CONNECTION_FAILED else f"{code} {enhanced or ''}".strip()
    return f"{head} {flat}"[:160].strip()


class Throttle:
    def __init__(self, shaping: Shaping, worker: int = 0, workers: int = 1,
                 on_event: EventSink | None = None,
                 clock: Callable[[], float] = time.time, label: int | None = None) -> None:
        self.shaping = shaping
        self.worker = worker  # its number among the `workers` that share each budget
        self.workers = max(1, workers)
        self.label = worker if label is None else label  # the worker its rows and events name
        self.on_event = on_event
        self.clock = clock
        self.settings = shaping.adapt
        self._scopes: dict[str, Scope] = {}
        self._last_prune = -math.inf

    # --- which limits apply ---------------------------------------------------------

    def destination(self, domain: str, mx_hosts: list[str] | None = None) -> Destination:
        """The limits for recipient `domain` whose MX hosts are `mx_hosts` (in preference
        order; may be empty before the MX lookup, providers' `domains` still match)."""
        domain = domain.lower().rstrip(".")
        provider = self.shaping.provider(domain, mx_hosts or [])
        override = self.shaping.domains.get(domain)
        scopes: list[ScopeSpec] = []
        if provider is not None:
            scopes.append(ScopeSpec("provider", provider.name, provider.limits, shared=True))
        if override is not None or provider is None:
            scopes.append(ScopeSpec("domain", domain, override or self.shaping.default, False))
        return Destination(domain, provider.name if provider else None, tuple(scopes))

    def messages_per_connection(self, dest: Destination) -> int:
        return min(s.limits.max_messages_per_connection for s in dest.scopes)

    def max_connections(self, dest: Destination) -> int:
        """The current connection limit (adapted, capped by rules) for this worker."""
        return min(self._scope(s).max_connections() for s in dest.scopes)

    def budgets(self, dest: Destination) -> list[Budget]:
        """The limits in force now for each scope of `dest` (adapted, capped by rules), for
        a budget kept outside this worker (mta.cluster.throttle)."""
        return [_budget(self._scope(spec)) for spec in dest.scopes]

    def over_connection_limit(self, dest: Destination) -> bool:
        """True when more connections are open than the (lowered) limit: close idle ones."""
        return any(sc.connections > sc.max_connections() for sc in self._all(dest))

    # --- before a connection and before a message ---------------------------------------

    def try_connect(self, dest: Destination, now: float | None = None) -> float:
        """0.0: open the connection now (and call connection_closed later); else the seconds
        to wait, or WAIT_FOR_CLOSE (inf) when at the connection limit."""
        now = self._now(now)
        scopes = self._all(dest, now)
        held = self._held(scopes, now)
        if held:
            return held
        backoff = max(sc.connect_after for sc in scopes) - now
        if backoff > 0:
            return backoff
        if any(sc.connections >= sc.max_connections() for sc in scopes):
            return WAIT_FOR_CLOSE
        wait = max((sc.conn_gcra.wait(now) for sc in scopes if sc.conn_gcra), default=0.0)
        if wait:
            return wait
        for sc in scopes:
            if sc.conn_gcra:
                sc.conn_gcra.take(now)
            sc.connections += 1
            sc.last_used = now
        return 0.0

    def connection_closed(self, dest: Destination, now: float | None = None) -> None:
        now = self._now(now)
        for sc in self._all(dest):
            sc.connections = max(0, sc.connections - 1)
            sc.last_used = now

    def try_send(self, dest: Destination, now: float | None = None,
                 campaign: str = "", account: str = "") -> float:
        """0.0: send this message now; else the seconds to wait (pace or suspension)."""
        now = self._now(now)
        scopes = self._all(dest, now)
        held = self._held(scopes, now, campaign, account)
        if held:
            return held
        wait = max((sc.msg_gcra.wait(now) for sc in scopes if sc.msg_gcra), default=0.0)
        if wait:
            return wait
        for sc in scopes:
            if sc.msg_gcra:
                sc.msg_gcra.take(now)
            sc.sent += 1
            sc.last_used = now
        return 0.0

    def suspension(self, dest: Destination, now: float | None = None, campaign: str = "",
                   account: str = "") -> tuple[str, float] | None:
        """("destination" | "campaign" | "account", until) when held, else None. Lets the
        scheduler park a whole destination, or set aside one campaign's messages."""
        now = self._now(now)
        for sc in self._all(dest, now):
            for what, hold in self._holds(sc, campaign, account):
                if hold.until > now:
                    return what, hold.until
        return None

    # --- after a reply ------------------------------------------------------------------

    def record(self, dest: Destination, code: int, enhanced: str | None, text: str,
               now: float | None = None, campaign: str = "", account: str = "",
               connecting: bool = False) -> Decision:
        """Learn from one reply (code CONNECTION_FAILED: the connection failed; connecting:
        the reply came at the greeting or EHLO) and say what to do with the message."""
        now = self._now(now)
        scopes = self._all(dest, now)
        signal = classify(code, enhanced, text, connecting)
        reason = _excerpt(code, enhanced, text)
        primary = scopes[0]
        self._adapt(primary, signal, now, reason)
        for sc in scopes[1:]:
            if signal is Signal.OK:
                self._adapt(sc, signal, now, reason)
        self._apply_rules(dest, primary, code, enhanced, text, now, campaign, account)
        return self._decide(primary, signal, code, now, campaign, account, reason)

    def _adapt(self, sc: Scope, signal: Signal, now: float, reason: str) -> None:
        before = (sc.rate.value, sc.conns.value)
        if signal is Signal.OK:
            sc.accepted.add(now)
            sc.connection_failures = 0
            sc.rate.success(now, self.settings)
            sc.conns.success(now, self.settings)
            reason = "raised after a run of successes"
        elif signal is Signal.SLOW_DOWN:
            sc.deferred += 1
            sc.rate.cut(now, self.settings, sc.accepted.rate(now))
            sc.conns.cut(now, self.settings)
        elif signal is Signal.SLOW_CONNECTIONS:
            sc.deferred += 1
            sc.conns.cut(now, self.settings)
            self._back_off_connecting(sc, now)
        if sc.rate.value != before[0]:
            self._sync_rate(sc)
            self._change(sc, now, "rate", reason, old=before[0], new=sc.rate.value)
        if sc.conns.value != before[1]:
            self._change(sc, now, "connections", reason, old=before[1], new=sc.conns.value)

    def _back_off_connecting(self, sc: Scope, now: float) -> None:
        """No new connection for retry_delay, doubling with each refusal in a row;
        refusals of connections opened before the backoff started count as one."""
        if now < sc.connect_after:
            return
        sc.connection_failures += 1
        backoff = self.settings.retry_delay * 2 ** min(sc.connection_failures - 1, 6)
        sc.connect_after = now + backoff

    def _decide(self, sc: Scope, signal: Signal, code: int, now: float, campaign: str,
                account: str, reason: str) -> Decision:
        transient = signal is not Signal.PERMANENT and signal is not Signal.OK
        for what, hold in self._holds(sc, campaign, account):
            if hold.until > now:
                action = {"destination": SUSPENDED, "campaign": CAMPAIGN_SUSPENDED,
                          "account": ACCOUNT_SUSPENDED}[what]
                retry_at = hold.until if transient else None
                return Decision(action, retry_at, hold.until, hold.reason, signal)
        if signal is Signal.OK:
            return Decision(OK, signal=signal)
        if signal is Signal.PERMANENT:
            return Decision(FAIL, reason=reason, signal=signal)
        if signal is Signal.NEUTRAL:
            return Decision(DEFER, reason=reason, signal=signal)
        if (signal is Signal.SLOW_CONNECTIONS and sc.connection_failures >= 3
                and sc.conns.value == sc.conns.floor):
            # Refused (or answered 421 at the greeting) even at one connection, again
            # and again: the usual retry schedule, so the message can expire.
            return Decision(DEFER, reason=f"unreachable: {reason}", signal=signal)
        return Decision(SLOW_DOWN, now + self.settings.retry_delay, reason=reason, signal=signal)

    # --- automation rules ---------------------------------------------------------------

    def _apply_rules(self, dest: Destination, sc: Scope, code: int, enhanced: str | None,
                     text: str, now: float, campaign: str, account: str) -> None:
        if not self.shaping.rules or 200 <= code < 400:
            return
        subject = " ".join(f"{code} {enhanced or ''} {text}".split())
        for rule in self.shaping.rules:
            if rule.provider is not None and rule.provider != dest.provider:
                continue
            if not rule.pattern.search(subject):
                continue
            who = {"suspend_campaign": campaign, "suspend_account": account}.get(rule.action, "")
            if rule.action in ("suspend_campaign", "suspend_account") and not who:
                continue
            if self._triggered(sc, rule, who, now):
                self._act(sc, rule, who, now, _excerpt(code, enhanced, text))

    def _triggered(self, sc: Scope, rule: Rule, who: str, now: float) -> bool:
        if rule.trigger.count <= 1:
            return True
        hits = sc.rule_hits.setdefault((rule.name, who), deque(maxlen=rule.trigger.count))
        while hits and hits[0] <= now - rule.trigger.within:
            hits.popleft()
        hits.append(now)
        if len(hits) >= rule.trigger.count:
            hits.clear()
            return True
        return False

    def _act(self, sc: Scope, rule: Rule, who: str, now: float, excerpt: str) -> None:
        until = now + rule.duration
        reason = f"rule {rule.name}: {excerpt}"
        if rule.action == "suspend":
            sc.suspended = _extend(sc.suspended, until, reason)
            self._change(sc, now, "suspend", reason, until=sc.suspended.until)
        elif rule.action == "throttle":
            self._cap(sc, rule, until, reason, now)
        else:
            holds = sc.campaigns if rule.action == "suspend_campaign" else sc.accounts
            holds[who] = _extend(holds.get(who), until, reason)
            self._change(sc, now, rule.action, reason, until=holds[who].until, subject=who)

    def _cap(self, sc: Scope, rule: Rule, until: float, reason: str, now: float) -> None:
        share = self.workers if sc.spec.shared else 1
        if rule.rate is not None:
            cap = rule.rate.per_second / share
            sc.cap_rate = cap if sc.cap_rate is None else min(sc.cap_rate, cap)
        if rule.max_connections is not None:
            cap_conns = worker_share(rule.max_connections, self.worker, share)
            sc.cap_conns = cap_conns if sc.cap_conns is None else min(sc.cap_conns, cap_conns)
        sc.cap = _extend(sc.cap, until, reason)
        self._sync_rate(sc)
        self._change(sc, now, "throttle", reason, until=sc.cap.until,
                     new=sc.effective_rate(), connections=sc.max_connections())

    # --- expiry, visibility -------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        """One row per scope in use or not at its configured limits."""
        now = self._now(now)
        self.prune(now)
        rows = []
        for sc in self._scopes.values():
            self._expire(sc, now)
            if sc.pristine() and now - sc.last_used > 300:
                continue
            rows.append(self._row(sc, now))
        return sorted(rows, key=lambda r: (r["kind"], r["destination"]))

    def _row(self, sc: Scope, now: float) -> dict[str, Any]:
        holds = [h for h in (sc.suspended, sc.cap) if h]
        until = max((h.until for h in holds), default=None)
        return {
            "destination": sc.spec.name, "kind": sc.spec.kind, "worker": self.label,
            "source": sc.spec.source, "state": _state(sc),
            "rate": sc.effective_rate(), "rate_ceiling": sc.rate_ceiling,
            "connections": sc.connections, "max_connections": sc.max_connections(),
            "max_connections_ceiling": sc.conn_ceiling,
            "reason": sc.reason, "changed": sc.changed, "until": until,
            "campaigns_suspended": {k: h.until for k, h in sc.campaigns.items()},
            "accounts_suspended": {k: h.until for k, h in sc.accounts.items()},
            "sent": sc.sent, "deferred": sc.deferred,
        }

    def prune(self, now: float) -> None:
        """Forget idle scopes (bounded memory over many destinations); at most every 30 s."""
        if now - self._last_prune < 30:
            return
        self._last_prune = now
        for key, sc in list(self._scopes.items()):
            self._expire(sc, now)
            if self._forgettable(sc, now):
                del self._scopes[key]

    def _forgettable(self, sc: Scope, now: float) -> bool:
        if sc.connections or sc.suspended or sc.cap or sc.campaigns or sc.accounts:
            return False
        idle = now - sc.last_used
        return idle > self.settings.forget_after or (sc.pristine() and idle > 300)

    def _expire(self, sc: Scope, now: float) -> None:
        if sc.suspended and sc.suspended.until <= now:
            sc.suspended = None
            self._change(sc, now, "suspend_lifted", "suspension ended")
        if sc.cap and sc.cap.until <= now:
            sc.cap = sc.cap_rate = sc.cap_conns = None
            self._sync_rate(sc)
            self._change(sc, now, "throttle_lifted", "rule throttle ended",
                         new=sc.effective_rate(), connections=sc.max_connections())
        for what, holds in (("campaign", sc.campaigns), ("account", sc.accounts)):
            for who in [k for k, h in holds.items() if h.until <= now]:
                del holds[who]
                self._change(sc, now, f"suspend_{what}_lifted", "suspension ended", subject=who)

    def _change(self, sc: Scope, now: float, change: str, reason: str, **fields: Any) -> None:
        sc.reason = reason
        sc.changed = now
        if self.on_event is not None:
            self.on_event({
                "type": "ThrottleChange", "time": now, "worker": self.label,
                "destination": sc.spec.name, "kind": sc.spec.kind, "change": change,
                **({"source": sc.spec.source} if sc.spec.source else {}),
                "reason": reason, "rate": sc.effective_rate(), "rate_ceiling": sc.rate_ceiling,
                "max_connections": sc.max_connections(), **fields,
            })

    # --- helpers --------------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def _all(self, dest: Destination, now: float | None = None) -> list[Scope]:
        scopes = [self._scope(spec) for spec in dest.scopes]
        if now is not None:
            for sc in scopes:
                self._expire(sc, now)
        return scopes

    def _scope(self, spec: ScopeSpec) -> Scope:
        sc = self._scopes.get(spec.key)
        if sc is None:
            sc = self._scopes[spec.key] = self._new_scope(spec)
        return sc

    def _new_scope(self, spec: ScopeSpec) -> Scope:
        share = self.workers if spec.shared else 1
        limits = spec.limits
        rate = limits.message_rate.per_second / share if limits.message_rate else None
        conn_rate = limits.connection_rate.per_second / share if limits.connection_rate else None
        conns = worker_share(limits.max_connections, self.worker, share)
        floor_rate = self.settings.min_message_rate.per_second
        sc = Scope(spec, rate, conns, conn_rate,
                   rate=Dial(rate, floor_rate),
                   conns=Dial(float(conns), float(self.settings.min_connections), integer=True))
        if conn_rate is not None:
            sc.conn_gcra = Gcra(conn_rate, _burst(0, conn_rate))
        self._sync_rate(sc)
        return sc

    def _sync_rate(self, sc: Scope) -> None:
        rate = sc.effective_rate()
        if rate is None:
            sc.msg_gcra = None
            return
        burst = _burst(sc.spec.limits.message_burst, rate)
        if sc.msg_gcra is None:
            sc.msg_gcra = Gcra(rate, burst)
        else:
            sc.msg_gcra.set_rate(rate, burst)

    def _held(self, scopes: list[Scope], now: float, campaign: str = "",
              account: str = "") -> float:
        until = max((h.until for sc in scopes for _, h in self._holds(sc, campaign, account)),
                    default=0.0)
        return until - now if until > now else 0.0

    @staticmethod
    def _holds(sc: Scope, campaign: str, account: str) -> list[tuple[str, Hold]]:
        holds: list[tuple[str, Hold]] = []
        if sc.suspended:
            holds.append(("destination", sc.suspended))
        if campaign and campaign in sc.campaigns:
            holds.append(("campaign", sc.campaigns[campaign]))
        if account and account in sc.accounts:
            holds.append(("account", sc.accounts[account]))
        return holds


def _extend(hold: Hold | None, until: float, reason: str) -> Hold:
    if hold is not None and hold.until >= until:
        return hold
    return Hold(until, reason)


def _state(sc: Scope) -> str:
    if sc.suspended:
        return "suspended"
    if sc.cap:
        return "throttled"
    if sc.campaigns or sc.accounts:
        return "partly suspended"
    if sc.rate.adapted or sc.conns.adapted:
        return "adapted"
    return "normal"


__all__ = [
    "ACCOUNT_SUSPENDED", "CAMPAIGN_SUSPENDED", "CONNECTION_FAILED", "DEFER", "FAIL", "OK",
    "SLOW_DOWN", "SUSPENDED", "WAIT_FOR_CLOSE", "Budget", "Decision", "Destination", "Throttle",
    "worker_share",
]
