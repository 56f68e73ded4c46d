"""Operator actions by scope, with an expiry: suspend or bounce queued mail.

A rule is ``(action, scope, value)`` with an expiry, a reason and who made it, kept
in the spool's ``rules`` database (key ``action:scope:value``), so that every worker,
the admin API and the offline CLI see the same rules:

- ``suspend``: matching jobs are held with the reason ``suspend:<scope>:<value>`` (jobs
  not due yet at once; due ones by the scheduler when it picks them up, through
  `RuleCheck.hold_reason`), and mail arriving for the scope waits the same way: it is
  accepted, never refused. Lifting the rule (an operator's resume, or its expiry)
  releases the jobs held for it, due now (or at their send time).
- ``bounce``: matching jobs are made due now and the scheduler bounces each one it picks
  up (a DSN to the sender, `Bounce` events), as long as the rule is active: new mail of
  the scope too.

Scopes: ``domain`` (the destination domain), ``account``, ``campaign`` (``account/
campaign`` or a campaign name of any account), ``provider`` and ``source``. Every change
goes through the functions here, inside a write transaction (mta.queue owns job state).

``provider`` is the throttle's provider of the destination (`[provider.NAME]` of the
shaping file: by MX host suffix or listed domain), known only once the route (MX) is:
delivery asks the rules when it has routed an item (`Item.provider`, then
`Scheduler.take_held` / `take_bounced`), so queued mail of a provider is held or bounced
when it comes due, not when the rule is made. ``source`` is the egress source (sending
address) chosen per message at dispatch: the chooser asks `RuleCheck.source_rules()`,
skips a suspended source (the pool's other sources carry the mail; none left: the
message is held with the reason ``suspend:source:<name>`` until that rule goes) and
bounces the message when the chosen source has a bounce rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from mta.queue import jobs
from mta.queue.jobs import HoldResult, Job
from mta.queue.spool import Spool, pack, unpack

log = logging.getLogger("mta.queue.rules")

ACTIONS = ("suspend", "bounce")
SCOPES = ("domain", "account", "campaign", "provider", "source")
DISPATCH_SCOPES = ("provider", "source")  # known only at dispatch (route, egress)
REFRESH_SECONDS = 0.5  # how stale a worker's view of the rules may be


class RuleError(ValueError):
    """A rule that cannot be made or found; str() says why."""


@dataclass(frozen=True)
class Rule:
    action: str
    scope: str
    value: str
    expires: float  # Unix seconds
    reason: str = ""
    by: str = ""
    created: float = 0.0

    @property
    def key(self) -> str:
        return rule_key(self.action, self.scope, self.value)

    @property
    def hold_reason(self) -> str:
        """The reason a suspended job is held with."""
        return f"suspend:{self.scope}:{self.value}"

    def matches(self, domain: str, account: str, campaign: str, provider: str = "",
                source: str = "") -> bool:
        """Whether mail of these traits is in the rule's scope ('' provider or source:
        not known yet, so no provider or source rule matches)."""
        if self.scope == "domain":
            return domain == self.value
        if self.scope == "account":
            return account == self.value
        if self.scope == "provider":
            return bool(provider) and provider.lower() == self.value
        if self.scope == "source":
            return bool(source) and source.lower() == self.value
        owner, slash, name = self.value.rpartition("/")
        return bool(campaign) and campaign == name and (not slash or owner == account)

    def matches_job(self, job: Job) -> bool:
        return self.matches(job.domain, job.account, job.campaign)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rule_key(action: str, scope: str, value: str) -> str:
    return f"{action}:{scope}:{value}"


def check_rule(action: str, scope: str, value: str) -> str:
    """The value, normalized; RuleError when the action, scope or value is unfit."""
    if action not in ACTIONS:
        raise RuleError(f"action {action!r}: one of {', '.join(ACTIONS)}")
    if scope not in SCOPES:
        raise RuleError(f"scope {scope!r}: one of {', '.join(SCOPES)}")
    value = value.strip()
    if scope == "domain":
        value = value.lower().rstrip(".")
    elif scope in DISPATCH_SCOPES:
        value = value.lower()
    if not value or len(value) > 300 or any(c in value for c in "\r\n\0"):
        raise RuleError(f"{scope}: give a value (at most 300 characters, one line)")
    return value


def parse_duration(text: str) -> float:
    """Seconds of "90", "90s", "15m", "2h", "1d"; RuleError otherwise."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise RuleError(f"duration {text!r}: like 90, 90s, 15m, 2h or 1d") from None
    if not 0 < seconds <= 366 * 86400:
        raise RuleError(f"duration {text!r}: more than 0 and at most a year")
    return seconds


# --- reading -------------------------------------------------------------------------

def read_rules(spool: Spool, txn: Any) -> list[Rule]:
    """Every rule stored, expired or not."""
    db = spool.dbs.get("rules")
    if db is None:
        return []
    return [Rule(**unpack(raw)) for _, raw in txn.cursor(db=db)]


def active_rules(spool: Spool, txn: Any, now: float) -> list[Rule]:
    return [rule for rule in read_rules(spool, txn) if rule.expires > now]


def _get(spool: Spool, txn: Any, key: str) -> Rule | None:
    raw = txn.get(key.encode(), db=spool.dbs["rules"])
    return None if raw is None else Rule(**unpack(raw))


def rule_for_hold(spool: Spool, txn: Any, reason: str) -> Rule | None:
    """The active suspension a job held for `reason` waits for, or None."""
    if not reason.startswith("suspend:") or spool.dbs.get("rules") is None:
        return None
    _, scope, value = reason.split(":", 2)
    rule = _get(spool, txn, rule_key("suspend", scope, value))
    return rule if rule is not None and rule.expires > time.time() else None


# --- changing them (in a write transaction) ---------------------------------------------

def _matching(spool: Spool, txn: Any, rule: Rule) -> list[Job]:
    if rule.scope in DISPATCH_SCOPES:
        return []  # known at dispatch only: matched when each job comes due
    if rule.scope == "domain":
        prefix = rule.value.encode() + b"\0"
        cursor = txn.cursor(db=spool.dbs["dom"])
        ids = []
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                ids.append(bytes(key[len(prefix):]))
        return jobs.jobs_by_ids(spool, txn, ids)
    needle = rule.value.rpartition("/")[2] if rule.scope == "campaign" else rule.value
    return [job for job in spool.scan_jobs(txn, [needle]) if rule.matches_job(job)]


def add_rule(spool: Spool, txn: Any, rule: Rule, now: float) -> dict[str, Any]:
    """Store `rule` (replacing one of the same action and scope) and apply it to the
    queued mail it matches: how many jobs it held or made due."""
    txn.put(rule.key.encode(), pack(rule.as_dict()), db=spool.dbs["rules"])
    now_ms = int(now * 1000)
    found = _matching(spool, txn, rule)
    later = {"when_due": True} if rule.scope in DISPATCH_SCOPES else {}
    if rule.action == "suspend":
        return {"held": jobs.hold(spool, txn, found, rule.hold_reason, now_ms)} | later
    due = 0
    for job in found:  # bounced by the scheduler when it picks them up, send time or not
        job.not_before_ms = 0
        if job.held.startswith("suspend:"):
            spool.release_job(txn, job, now_ms)
            due += 1
        elif not job.held and job.next_ms > now_ms:
            old, job.next_ms = job.next_ms, now_ms
            spool.save_attempt(txn, job, old)
            due += 1
    return {"due": due} | later


def carry_rule(spool: Spool, txn: Any, reason: str, expires: float, node: str,
               now: float) -> Rule | None:
    """A suspension held mail came with from a drained node (`reason`
    ``suspend:<scope>:<value>``, until `expires`): stored here unless a rule of the same
    scope is here already, so that the mail stays held until it expires or an operator
    resumes it here. The rule stored, or None."""
    if not reason.startswith("suspend:") or expires <= now:
        return None
    _, scope, value = reason.split(":", 2)
    try:
        rule = new_rule("suspend", scope, value, expires=expires, now=now,
                        reason=f"carried by a drain from {node}", by=f"drain:{node}")
    except RuleError:
        return None
    if _get(spool, txn, rule.key) is not None:
        return None
    txn.put(rule.key.encode(), pack(rule.as_dict()), db=spool.dbs["rules"])
    return rule


def lift_rule(spool: Spool, txn: Any, action: str, scope: str, value: str, now: float
              ) -> dict[str, Any] | None:
    """Remove a rule; a suspension's held jobs go back to delivery. None: no such rule."""
    rule = _get(spool, txn, rule_key(action, scope, value))
    if rule is None:
        return None
    txn.delete(rule.key.encode(), db=spool.dbs["rules"])
    released = 0
    if rule.action == "suspend":  # one rule per (action, scope, value): its own reason
        released = jobs.release_reason(spool, txn, rule.hold_reason, int(now * 1000))
    return {"rule": rule.as_dict(), "released": released}


def expire_rules(spool: Spool, txn: Any, now: float) -> list[dict[str, Any]]:
    """Lift every rule whose expiry has passed; what each lift did."""
    return [lifted for rule in read_rules(spool, txn) if rule.expires <= now
            if (lifted := lift_rule(spool, txn, rule.action, rule.scope, rule.value, now))]


def new_rule(action: str, scope: str, value: str, *, duration: float | None = None,
             expires: float | None = None, reason: str = "", by: str = "",
             now: float | None = None) -> Rule:
    """A checked rule; exactly one of `duration` (seconds) and `expires` (Unix seconds)."""
    now = time.time() if now is None else now
    value = check_rule(action, scope, value)
    if (duration is None) == (expires is None):
        raise RuleError("give either a duration or an expiry")
    until = now + duration if duration is not None else float(expires or 0)
    if until <= now:
        raise RuleError("the expiry is in the past")
    return Rule(action, scope, value, until, reason[:200], by[:100], now)


# --- campaign rates (the pace itself: mta.throttle.account_pace) -------------------------

def set_campaign_rate(spool: Spool, txn: Any, account: str, campaign: str,
                      per_second: float | None) -> None:
    """Set (None: remove) the sending rate of `account`'s `campaign`."""
    key = f"{account}/{campaign}".encode()
    if per_second is None:
        txn.delete(key, db=spool.dbs["rates"])
    else:
        txn.put(key, pack(per_second), db=spool.dbs["rates"])


def campaign_rates(spool: Spool, txn: Any) -> dict[tuple[str, str], float]:
    db = spool.dbs.get("rates")
    if db is None:
        return {}
    found = {}
    for key, raw in txn.cursor(db=db):
        account, _, campaign = bytes(key).decode().partition("/")
        found[(account, campaign)] = float(unpack(raw))
    return found


class RateCache:
    """The campaign rates, re-read at most every REFRESH_SECONDS (for each worker)."""

    def __init__(self, spool: Spool, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.clock = clock
        self._rates: dict[tuple[str, str], float] = {}
        self._read_at = -float("inf")

    def get(self) -> dict[tuple[str, str], float]:
        now = self.clock()
        if now - self._read_at >= REFRESH_SECONDS:
            with self.spool.read() as txn:
                self._rates = campaign_rates(self.spool, txn)
            self._read_at = now
        return self._rates


# --- the scheduler's view ---------------------------------------------------------------

class HoldCheck(Protocol):
    def hold_reason(self, item: Any) -> str | None: ...

    def still_holds(self, txn: Any, job: Job, reason: str) -> bool: ...

    def hold_done(self, result: HoldResult) -> None: ...


class RuleCheck:
    """What the scheduler asks of the rules (a cached copy, re-read every
    REFRESH_SECONDS): whether a due job is suspended (held) or bounced, with the policy
    guard's check (`then`) after the rules'."""

    def __init__(self, spool: Spool, then: HoldCheck | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.then = then
        self.clock = clock
        self._rules: list[Rule] = []
        self._read_at = -float("inf")

    def rules(self) -> list[Rule]:
        now = self.clock()
        if now - self._read_at >= REFRESH_SECONDS:
            with self.spool.read() as txn:
                self._rules = active_rules(self.spool, txn, now)
            self._read_at = now
        return [rule for rule in self._rules if rule.expires > now]

    def refresh(self) -> None:
        self._read_at = -float("inf")

    def _first(self, action: str, item: Any) -> Rule | None:
        message = item.message
        if message.get("dsn_for") or message.get("notice"):
            return None  # the engine's own mail is never suspended or bounced
        return next((rule for rule in self.rules()
                     if rule.action == action and _matches_item(rule, item)), None)

    def source_rule(self, name: str) -> Rule | None:
        """The active rule of egress source `name`: its bounce rule, else its suspension,
        else None. For the source chooser (at dispatch): skip a suspended source; when
        every source of the pool is suspended, set `item.source` to one of them and let
        `Scheduler.take_held(item)` hold the message (it waits for that rule to go);
        with a bounce rule, set `item.source` and `Scheduler.take_bounced(item)`."""
        return self.source_rules().get(name.lower())

    def source_rules(self) -> dict[str, Rule]:
        """`source_rule` of every source that has one, by (lower-case) source name."""
        found: dict[str, Rule] = {}
        for rule in self.rules():
            if rule.scope == "source" and (rule.value not in found or rule.action == "bounce"):
                found[rule.value] = rule
        return found

    def bounce_reason(self, item: Any) -> str | None:
        rule = self._first("bounce", item)
        return None if rule is None else (
            f"bounced by an operator ({rule.scope} {rule.value})"
            + (f": {rule.reason}" if rule.reason else ""))

    def still_bounces(self, txn: Any, item: Any) -> bool:
        for rule in self.rules():
            if rule.action == "bounce" and _matches_item(rule, item):
                found = _get(self.spool, txn, rule.key)
                if found is not None and found.expires > self.clock():
                    return True
        self.refresh()
        return False

    def hold_reason(self, item: Any) -> str | None:
        rule = self._first("suspend", item)
        if rule is not None:
            return rule.hold_reason
        return None if self.then is None else self.then.hold_reason(item)

    def still_holds(self, txn: Any, job: Job, reason: str) -> bool:
        if reason.startswith("suspend:"):
            _, scope, value = reason.split(":", 2)
            rule = _get(self.spool, txn, rule_key("suspend", scope, value))
            return rule is not None and rule.expires > self.clock()
        return self.then is not None and self.then.still_holds(txn, job, reason)

    def hold_done(self, result: HoldResult) -> None:
        if result == HoldResult.STALE:
            self.refresh()
        if self.then is not None:
            self.then.hold_done(result)


def _matches_item(rule: Rule, item: Any) -> bool:
    """A scheduler's item (mta.queue.scheduler.Item) in the rule's scope; its provider and
    source are set by delivery once known."""
    message = item.message
    return rule.matches(item.domain, message.get("account", ""), message.get("campaign", ""),
                        getattr(item, "provider", ""), getattr(item, "source", ""))


def rules_listing(spool: Spool, now: float | None = None) -> list[dict[str, Any]]:
    """The active rules, soonest expiry first, with the seconds each has left."""
    now = time.time() if now is None else now
    with spool.read() as txn:
        found = active_rules(spool, txn, now)
    return [rule.as_dict() | {"left": round(rule.expires - now, 1)}
            for rule in sorted(found, key=lambda r: r.expires)]



class RuleExpiry:
    """Lifts rules at their expiry (one worker runs it): checks every `interval`
    seconds, and the lift is one group-committed transaction; each lift is an event."""

    def __init__(self, spool: Spool, submit: Callable[[Any], Any],
                 emit: Callable[[dict[str, Any]], None], interval: float = 1.0) -> None:
        self.spool = spool
        self.submit = submit
        self.emit = emit
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.lift_expired()
            except Exception:
                log.exception("could not lift expired queue rules")
            await asyncio.sleep(self.interval)

    async def lift_expired(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        with self.spool.read() as txn:
            if not any(rule.expires <= now for rule in read_rules(self.spool, txn)):
                return []  # no write transaction (no fsync) while nothing expires
        lifted: list[dict[str, Any]] = await self.submit(
            lambda txn: expire_rules(self.spool, txn, now))
        for item in lifted:
            rule = item["rule"]
            self.emit({"type": "QueueRuleLifted", "action": rule["action"],
                       "scope": rule["scope"], "value": rule["value"], "by": "expiry",
                       "released": item["released"]})
        return lifted
