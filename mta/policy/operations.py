"""What operators do to campaigns, accounts, held mail and suppression lists.

Transaction-level functions shared by the `mta campaign|account|hold|suppression`
commands (which write to the spool directly, in their own process) and by the admin
API adapter (`mta.http.guard_operations`, through the worker's group committer).
Running workers pick every change up within `[policy] cache_ttl`. Results are plain
dicts. Job states change only through mta.queue.jobs.
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from mta.policy.model import (
    ACTIVE,
    DELETED,
    DROPPED,
    PAUSED,
    REVIEW,
    SUSPENDED,
    AccountState,
    CampaignState,
    Counters,
    Suppression,
    account_hold,
    campaign_hold,
    month_of,
    normalize_address,
)
from mta.policy.rates import Thresholds, campaign_rates
from mta.policy.store import PolicyStore, account_key, campaign_key, month_key
from mta.queue import jobs
from mta.queue.jobs import Job, RemovedJob
from mta.tracking.stats import account_engagement, engagement


class PolicyError(ValueError):
    """An operator request that cannot be done; str() says why in one line."""


class NotFoundError(PolicyError, LookupError):
    """No such campaign, account, message or entry."""


def now_ms(now: float) -> int:
    return int(now * 1000)


# --- campaigns ----------------------------------------------------------------

def resolve_campaign(store: PolicyStore, txn: Any, campaign: str,
                     account: str | None = None) -> tuple[str, str]:
    """(account, campaign) for an id given with or without its account."""
    if account:
        return account, campaign
    owners = {a for a, c, _ in store.campaigns(txn) if c == campaign}
    owners |= {split[0] for split in _state_campaigns(store, txn) if split[1] == campaign}
    if not owners:  # mail in the queue but nothing counted yet
        owners = jobs.campaign_owners(store.spool, txn, campaign)
    if not owners:
        raise NotFoundError(f"no campaign {campaign!r} (give --account to name a new one)")
    if len(owners) > 1:
        raise PolicyError(f"campaign {campaign!r} exists for accounts "
                          f"{', '.join(sorted(owners))}: give --account")
    return owners.pop(), campaign


def _state_campaigns(store: PolicyStore, txn: Any) -> Iterator[tuple[str, str]]:
    for key, _ in store.states(txn):
        if key.startswith(b"C"):
            account, _, campaign = key[1:].partition(b"\0")
            yield account.decode(), campaign.decode()


def job_counts(store: PolicyStore, txn: Any) -> dict[tuple[str, str], Counter[str]]:
    """Queued / deferred / held jobs per (account, campaign): one pass over the jobs."""
    counts: dict[tuple[str, str], Counter[str]] = {}
    for job in store.spool.jobs(txn):
        counts.setdefault((job.account, job.campaign), Counter())[str(job.state())] += 1
    return counts


def campaign_row(account: str, campaign: str, counters: Counters, state: CampaignState,
                 thresholds: Thresholds, jobs_seen: Counter[str] | None = None
                 ) -> dict[str, Any]:
    """A campaign as the CLI and the admin API show it (rates as fractions)."""
    seen = jobs_seen or Counter()
    return {
        "account": account, "campaign": campaign, "status": state.status,
        "paused": state.status == PAUSED, "reason": state.reason, "rule": state.rule,
        "by": state.by, "since": state.at or None,
        "guard": state.guarded, "no_guard": state.no_guard,
        **counter_fields(counters, state, thresholds),
        "queued": seen["queued"], "deferred": seen["deferred"], "held": seen["held"],
    }


def counter_fields(counters: Counters, state: CampaignState, thresholds: Thresholds
                   ) -> dict[str, Any]:
    """A campaign row's counts, and its rates in the window the guard judges (since the
    state's baseline: the last resume); `judged` false below the minimum volume."""
    window = counters.minus(Counters.from_dict(state.baseline))
    rates = campaign_rates(window)
    return {
        "submitted": counters.submitted, "sent": counters.sent,
        "delivered": counters.delivered, "hard_bounces": counters.hard,
        "soft_bounces": counters.soft, "complaints": counters.complaints,
        "unsubscribes": counters.unsubscribes,
        "rates": {k: round(v / 100, 6) for k, v in rates.items()},
        "window_sent": window.sent, "judged_after": thresholds.min_volume,
        "judged": window.sent >= thresholds.min_volume,
    }


def list_campaigns(store: PolicyStore, txn: Any, thresholds: Thresholds,
                   account: str | None = None, with_jobs: bool = True) -> list[dict[str, Any]]:
    names = {(a, c) for a, c, _ in store.campaigns(txn)} | set(_state_campaigns(store, txn))
    counts = job_counts(store, txn) if with_jobs else {}
    names |= {k for k in counts if k[1]}
    return [show_campaign(store, txn, a, c, thresholds, counts.get((a, c), Counter()))
            for a, c in sorted(names) if account in (None, a)]


def show_campaign(store: PolicyStore, txn: Any, account: str, campaign: str,
                  thresholds: Thresholds, seen: Counter[str] | None = None) -> dict[str, Any]:
    if seen is None:
        seen = Counter(str(job.state()) for job in jobs.find_jobs(store.spool, txn, account,
                                                                  campaign))
    row = campaign_row(account, campaign,
                       store.get_counters(txn, campaign_key(account, campaign)),
                       store.get_campaign(txn, account, campaign), thresholds, seen)
    row["engagement"] = engagement(store.spool, txn, account, campaign, row["delivered"])
    return row


def pause_campaign(store: PolicyStore, txn: Any, account: str, campaign: str, by: str,
                   reason: str, now: float) -> dict[str, Any]:
    state = store.get_campaign(txn, account, campaign)
    state.status, state.rule, state.by, state.at = PAUSED, "operator", by, now
    state.reason = reason or f"paused by an operator ({by})"
    store.put_campaign(txn, account, campaign, state)
    found = jobs.find_jobs(store.spool, txn, account, campaign)
    held = jobs.hold(store.spool, txn, found, campaign_hold(account, campaign), now_ms(now))
    return {"account": account, "campaign": campaign, "held": held}


def resume_campaign(store: PolicyStore, txn: Any, account: str, campaign: str, by: str,
                    now: float, no_guard: str = "", totals: Counters | None = None
                    ) -> dict[str, Any]:
    """Back to delivery: held jobs are due now.

    The guard keeps judging the campaign on a fresh window: the mail sent from now on
    (counted from `totals`, the counters it is judged on: by default this node's), after
    the same minimum volume. `no_guard` (the operator's reason) turns automatic pausing
    off for this campaign instead, visibly.
    """
    state = store.get_campaign(txn, account, campaign)
    if totals is None:
        totals = store.get_counters(txn, campaign_key(account, campaign))
    store.put_campaign(txn, account, campaign, CampaignState(
        status=ACTIVE, no_guard=no_guard.strip(), by=by, at=now, baseline=totals.as_dict()))
    released = jobs.release_reason(store.spool, txn, campaign_hold(account, campaign),
                                   now_ms(now))
    return {"account": account, "campaign": campaign, "released": released,
            "was": state.status, "guard": not no_guard.strip()}


def drop_campaign(store: PolicyStore, txn: Any, account: str, campaign: str, by: str,
                  now: float) -> list[RemovedJob]:
    """Remove its queued and held mail; the campaign stays refused until resumed."""
    state = store.get_campaign(txn, account, campaign)
    state.status, state.rule, state.by, state.at = DROPPED, "operator", by, now
    state.reason = f"dropped by an operator ({by})"
    store.put_campaign(txn, account, campaign, state)
    return jobs.remove(store.spool, txn, jobs.find_jobs(store.spool, txn, account, campaign))


def removed_events(removed: Iterable[RemovedJob], kind: str, reply: str
                   ) -> list[dict[str, Any]]:
    """Bounce-like events, one per recipient, for mail removed by an operator."""
    return [{"type": kind, "id": job.message_id, "account": job.account,
             "campaign": job.campaign, "recipient": rcpt, "domain": job.domain,
             "code": 550, "status": "5.7.1", "reply": reply}
            for job in removed for rcpt in job.recipients]


# --- accounts -------------------------------------------------------------------

def account_row(store: PolicyStore, txn: Any, name: str, account_cfg: Any,
                monthly_cap: int | None, now: float) -> dict[str, Any]:
    state = store.get_account(txn, name)
    month = month_of(now)
    totals = store.get_counters(txn, account_key(name))
    return {
        "name": name, "configured": account_cfg is not None,
        "email": getattr(account_cfg, "email", ""), "plan": getattr(account_cfg, "plan", ""),
        "subscriber_level": getattr(account_cfg, "subscriber_level", 0),
        "sender_domains": list(getattr(account_cfg, "sender_domains", [])),
        "status": state.status, "suspended": state.status != ACTIVE,
        "reason": state.reason, "since": state.at or None,
        "purge_after": state.purge_after or None,
        "month": month, "month_sent": store.get_counters(txn, month_key(name, month)).submitted,
        "monthly_cap": monthly_cap, "totals": totals.as_dict(),
        "engagement": account_engagement(store.spool, txn, name, totals.delivered),
    }


def configured_accounts(cfg: Any) -> set[str]:
    """The accounts the config names: [[accounts]] and the trusted clients' account."""
    return {a.name for a in cfg.accounts} | {cfg.smtp.trusted_account}


def account_known(store: PolicyStore, txn: Any, name: str, configured: Iterable[str]) -> bool:
    """An account is one the config names, or one the policy store has seen (a standing,
    counted mail, a suppression list)."""
    return (name in set(configured) or store.get_state(txn, account_key(name)) is not None
            or bool(store.get_counters(txn, account_key(name)))
            or next(iter(store.suppressions(txn, name)), None) is not None)


def require_account(store: PolicyStore, txn: Any, name: str, configured: Iterable[str]
                    ) -> None:
    """NotFoundError for a name that is no account: the same error everywhere."""
    if not account_known(store, txn, name, configured):
        raise NotFoundError(f"no account {name!r}")


def known_accounts(store: PolicyStore, txn: Any, configured: Iterable[str]) -> list[str]:
    names = set(configured)
    names |= {key[1:].decode() for key, _ in store.states(txn) if key.startswith(b"A")}
    for account, _, _ in store.campaigns(txn):
        names.add(account)
    return sorted(names)


def suspend_account(store: PolicyStore, txn: Any, account: str, by: str, reason: str,
                    now: float) -> dict[str, Any]:
    state = store.get_account(txn, account)
    if state.status == DELETED:
        raise PolicyError(f"account {account!r} is deleted")
    store.put_account(txn, account, AccountState(
        SUSPENDED, reason or f"suspended by an operator ({by})", by, now))
    return {"account": account, "held": _hold_account(store, txn, account, now)}


def _hold_account(store: PolicyStore, txn: Any, account: str, now: float) -> int:
    found = jobs.find_jobs(store.spool, txn, account)
    return jobs.hold(store.spool, txn, found, account_hold(account), now_ms(now))


def resume_account(store: PolicyStore, txn: Any, account: str, by: str,
                   now: float) -> dict[str, Any]:
    """Lift a suspension (or cancel a deletion not purged yet); held jobs are due now."""
    state = store.get_account(txn, account)
    store.put_account(txn, account, AccountState(ACTIVE, "", by, now))
    released = jobs.release_reason(store.spool, txn, account_hold(account), now_ms(now))
    return {"account": account, "released": released, "was": state.status}


def delete_account(store: PolicyStore, txn: Any, account: str, by: str, now: float,
                   retention_days: float) -> dict[str, Any]:
    """Refuse its mail from now on, hold what is queued, purge it all after the retention."""
    state = store.get_account(txn, account)
    if state.status == DELETED:
        return {"account": account, "purge_after": state.purge_after, "held": 0}
    purge_after = now + retention_days * 86400
    store.put_account(txn, account, AccountState(
        DELETED, f"deleted by an operator ({by})", by, now, purge_after))
    return {"account": account, "purge_after": purge_after,
            "held": _hold_account(store, txn, account, now)}


# --- held mail ---------------------------------------------------------------------

def list_held(store: PolicyStore, txn: Any, reason: str | None = REVIEW,
              account: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Held messages (by default those waiting for review), one row per message."""
    rows: dict[str, dict[str, Any]] = {}
    spool = store.spool
    for job_id, why in jobs.held_jobs(spool, txn):
        if reason is not None and why != reason:
            continue
        job = spool.get_job(txn, job_id)
        if job is None or account not in (None, job.account):
            continue
        row = rows.get(job.msg)
        if row is None:
            if len(rows) >= limit:
                break
            message = spool.get_message(txn, job.msg) or {}
            row = rows[job.msg] = {
                "id": job.msg, "account": job.account,
                "campaign": job.campaign, "from": message.get("from", ""),
                "received": message.get("received"), "size": message.get("size"),
                "reason": why, "jobs": [], "recipients": []}
        row["jobs"].append(job_id.decode())
        row["recipients"] += job.waiting()
    return list(rows.values())


def _held_of(store: PolicyStore, txn: Any, ref: str) -> list[Job]:
    """Held jobs of a message id, or the one held job named by a job id."""
    if "." in ref:
        found = jobs.jobs_by_ids(store.spool, txn, [ref.encode()])
    else:
        found = jobs.message_jobs(store.spool, txn, ref)
    return [job for job in found if job.held]


def _held_for(store: PolicyStore, txn: Any, ref: str, reason: str | None) -> list[Job]:
    held = [job for job in _held_of(store, txn, ref) if reason in (None, job.held)]
    if not held:
        raise NotFoundError(f"no mail held for review with id {ref!r}")
    return held


def release_held(store: PolicyStore, txn: Any, ref: str, now: float,
                 reason: str | None = REVIEW) -> int:
    """Release a held message (or job) into delivery; jobs held for another reason stay."""
    held = _held_for(store, txn, ref, reason)
    return jobs.release(store.spool, txn, held, now_ms(now), reason)


def reject_held(store: PolicyStore, txn: Any, ref: str,
                reason: str | None = REVIEW) -> list[RemovedJob]:
    return jobs.remove(store.spool, txn, _held_for(store, txn, ref, reason))


# --- suppression lists ---------------------------------------------------------------

CSV_FIELDS = ("address", "reason", "campaign", "created", "detail")


def add_suppression(store: PolicyStore, txn: Any, account: str, address: str, reason: str,
                    now: float, campaign: str = "", detail: str = "") -> bool:
    """Suppress an address; False if it already was (the first reason is kept)."""
    address = normalize_address(address)
    if "@" not in address or any(c in address for c in "\r\n\0 ,;<>"):
        raise PolicyError(f"{address!r} is not an e-mail address")
    if store.get_suppression(txn, account, address) is not None:
        return False
    store.put_suppression(txn, account, Suppression(address, reason, campaign, detail, now))
    return True


def remove_suppression(store: PolicyStore, txn: Any, account: str, address: str) -> bool:
    return store.delete_suppression(txn, account, normalize_address(address))


def suppression_rows(store: PolicyStore, txn: Any, account: str,
                     limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for entry in store.suppressions(txn, account):
        rows.append({"address": entry.address, "reason": entry.reason,
                     "campaign": entry.campaign, "created": iso_time(entry.at),
                     "detail": entry.detail})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def iso_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def export_csv(rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def parse_csv(text: str) -> list[tuple[str, str, str, str]]:
    """(address, reason, campaign, detail) rows from a CSV: a header row is optional;
    without one the columns are address[,reason[,campaign]]; blank lines are skipped."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    if "address" in header or "email" in header:
        col = {name: i for i, name in enumerate(header)}
        at = col.get("address", col.get("email"))
        rows = rows[1:]
    else:
        col, at = {"reason": 1, "campaign": 2}, 0

    def cell(row: list[str], name: str) -> str:
        i = col.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    assert at is not None
    return [(row[at].strip(), cell(row, "reason") or "import", cell(row, "campaign"),
             cell(row, "detail")) for row in rows if at < len(row) and row[at].strip()]


def import_suppressions(store: PolicyStore, txn: Any, account: str,
                        rows: list[tuple[str, str, str, str]], now: float) -> dict[str, Any]:
    added = existing = 0
    bad: list[str] = []
    for address, reason, campaign, detail in rows:
        try:
            if add_suppression(store, txn, account, address, reason, now, campaign, detail):
                added += 1
            else:
                existing += 1
        except PolicyError:
            bad.append(address)
    return {"account": account, "added": added, "existing": existing, "invalid": bad}
