"""What the admin API needs from the policy guard, and a spool-only stand-in.

The policy guard (mta/policy) owns campaigns' counters and pauses, suppression
lists, held mail and accounts. The admin API talks to it only through
`PolicyOperations`: the engine hands the HTTP listener a `GuardOperations`
(mta.http.guard_operations) over the running guard. Without one, `SpoolOperations` serves what the
spool alone can answer: campaigns as seen in the queue (no rates), operator
pause/resume/drop of a campaign's queued mail, held mail release/reject, the
configured accounts. What needs the guard (rates, suppression lists, account
suspension, one-click unsubscribe) raises `PolicyUnavailable` (HTTP 501).

Campaigns are named by account and campaign id (the X-Campaign-ID header),
since two accounts may use the same campaign id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from mta.policy.model import campaign_hold
from mta.queue import jobs
from mta.queue.jobs import Job
from mta.queue.spool import Spool

# The contract's figures (DESIGN.md), when the config has no [policy] section.
DEFAULT_THRESHOLDS = {"hard_bounce": 0.08, "complaint": 0.005, "unsubscribe": 0.01,
                      "min_volume": 200}


def config_thresholds(cfg: Any) -> dict[str, float]:
    """Thresholds as fractions, from `[policy]` (percent) when the config has it."""
    policy = getattr(cfg, "policy", None)
    if policy is None:
        return dict(DEFAULT_THRESHOLDS)
    return {"hard_bounce": policy.hard_bounce_rate / 100, "complaint": policy.complaint_rate / 100,
            "unsubscribe": policy.unsubscribe_rate / 100, "min_volume": policy.min_volume}


class PolicyUnavailable(Exception):
    """The operation needs the policy guard, which is not running."""


class NotFound(Exception):
    """No such campaign, account, job or entry."""


class InvalidToken(Exception):
    """A forged, altered or expired unsubscribe token."""


@runtime_checkable
class PolicyOperations(Protocol):
    """Campaign rows are dicts: account, campaign, paused (bool), reason, sent, delivered,
    hard_bounces, complaints, unsubscribes, rates {hard_bounce, complaint, unsubscribe}
    (fractions or None, since the last resume), queued, held; with the guard also guard
    (False: an operator turned it off), no_guard (why), judged (False below the minimum
    volume), judged_after, window_sent. Async methods return the changed object's row."""

    def thresholds(self) -> dict[str, float]: ...
    async def campaigns(self) -> list[dict[str, Any]]: ...
    async def campaign(self, account: str, campaign: str) -> dict[str, Any]: ...
    async def pause_campaign(self, account: str, campaign: str, reason: str
                             ) -> dict[str, Any]: ...
    async def resume_campaign(self, account: str, campaign: str, no_guard: str = ""
                              ) -> dict[str, Any]: ...
    async def drop_campaign(self, account: str, campaign: str) -> dict[str, Any]: ...
    async def accounts(self) -> list[dict[str, Any]]: ...
    async def account(self, name: str) -> dict[str, Any]: ...
    async def suspend_account(self, name: str, reason: str) -> dict[str, Any]: ...
    async def resume_account(self, name: str) -> dict[str, Any]: ...
    async def suppressions(self, account: str, limit: int) -> list[dict[str, Any]]: ...
    async def suppress(self, account: str, address: str, reason: str) -> dict[str, Any]: ...
    async def unsuppress(self, account: str, address: str) -> dict[str, Any]: ...
    async def held(self, limit: int) -> list[dict[str, Any]]: ...
    async def release_held(self, job_id: str) -> dict[str, Any]: ...
    async def reject_held(self, job_id: str) -> dict[str, Any]: ...
    async def unsubscribe(self, token: str) -> dict[str, Any]: ...


# --- the spool-only stand-in ------------------------------------------------------------

def campaign_rows(spool: Spool) -> list[dict[str, Any]]:
    """Campaigns with mail in the spool: queued/deferred/held jobs and whether paused."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    with spool.read() as txn:
        for job in spool.jobs(txn):
            if not job.campaign:
                continue
            key = (job.account, job.campaign)
            row = rows.setdefault(key, blank_campaign(*key))
            row[str(job.state())] += 1
            if job.held == campaign_hold(*key):
                row["paused"], row["reason"] = True, "paused by an operator"
    return sorted(rows.values(), key=lambda r: (r["account"], r["campaign"]))


def blank_campaign(account: str, campaign: str) -> dict[str, Any]:
    return {"account": account, "campaign": campaign, "paused": False, "reason": "",
            "sent": None, "delivered": None, "hard_bounces": None, "complaints": None,
            "unsubscribes": None,
            "rates": {"hard_bounce": None, "complaint": None, "unsubscribe": None},
            "queued": 0, "deferred": 0, "held": 0}


JobChange = Callable[[Any, list[Job]], Any]


def campaign_op(spool: Spool, account: str, campaign: str,
                change: JobChange) -> Callable[[Any], Any]:
    """An operation applying `change(txn, jobs)` to a campaign's jobs; NotFound if none."""

    def run(txn: Any) -> Any:
        found = jobs.find_jobs(spool, txn, account, campaign)
        if not found:
            raise NotFound(f"no campaign {campaign!r} of account {account!r} in the queue")
        return change(txn, found)

    return run


def held_op(spool: Spool, job_id: str, change: JobChange) -> Callable[[Any], Any]:
    """An operation applying `change(txn, [job])` to one held job; NotFound if none."""

    def run(txn: Any) -> Any:
        found = [j for j in jobs.jobs_by_ids(spool, txn, [job_id.encode()]) if j.held]
        if not found:
            raise NotFound(f"no held job {job_id!r}")
        return change(txn, found)

    return run


def held_rows(spool: Spool, limit: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if spool.dbs.get("held") is None:
        return rows
    with spool.read() as txn:
        for job_id, reason in jobs.held_jobs(spool, txn):
            job = spool.get_job(txn, job_id)
            if job is None:
                continue
            rows.append({
                "job": job_id.decode(), "reason": reason, "message": job.msg,
                "account": job.account, "campaign": job.campaign, "domain": job.domain,
                "recipients": job.waiting()})
            if len(rows) >= limit:
                break
    return rows


def now_ms() -> int:
    return int(time.time() * 1000)


def account_row(account: Any) -> dict[str, Any]:
    return {"name": account.name, "email": account.email, "plan": account.plan,
            "subscriber_level": account.subscriber_level,
            "sender_domains": list(account.sender_domains), "suspended": None}


class SpoolOperations:
    """`PolicyOperations` from the spool and the config alone (no policy guard running)."""

    def __init__(self, cfg: Any, spool: Spool, submit: Callable[[Any], Any],
                 emit: Callable[[dict[str, Any]], None]) -> None:
        self.cfg = cfg
        self.spool = spool
        self.submit = submit  # the worker's group committer: await submit(op)
        self.emit = emit

    def thresholds(self) -> dict[str, float]:
        return config_thresholds(self.cfg)

    async def campaigns(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(campaign_rows, self.spool)

    async def campaign(self, account: str, campaign: str) -> dict[str, Any]:
        for row in await self.campaigns():
            if (row["account"], row["campaign"]) == (account, campaign):
                return row
        raise NotFound(f"no campaign {campaign!r} of account {account!r} in the queue")

    async def pause_campaign(self, account: str, campaign: str, reason: str) -> dict[str, Any]:
        hold_reason = campaign_hold(account, campaign)
        held = await self.submit(campaign_op(self.spool, account, campaign, lambda txn, found:
                                             jobs.hold(self.spool, txn, found, hold_reason)))
        self.emit({"type": "CampaignPaused", "account": account, "campaign": campaign,
                   "reason": reason or "paused by an operator", "held": held, "by": "operator"})
        return await self.campaign(account, campaign)

    async def resume_campaign(self, account: str, campaign: str, no_guard: str = ""
                              ) -> dict[str, Any]:
        """No guard runs here to judge the campaign: `no_guard` changes nothing."""
        hold_reason = campaign_hold(account, campaign)
        released = await self.submit(campaign_op(
            self.spool, account, campaign,
            lambda txn, found: jobs.release(self.spool, txn, found, now_ms(), hold_reason)))
        self.emit({"type": "CampaignResumed", "account": account, "campaign": campaign,
                   "released": released})
        return await self.campaign(account, campaign)

    async def drop_campaign(self, account: str, campaign: str) -> dict[str, Any]:
        removed = await self.submit(campaign_op(self.spool, account, campaign, lambda txn, found:
                                                jobs.remove(self.spool, txn, found)))
        self.emit({"type": "CampaignDropped", "account": account, "campaign": campaign,
                   "jobs": len(removed),
                   "recipients": sum(len(j.recipients) for j in removed)})
        return blank_campaign(account, campaign) | {"dropped": len(removed)}

    async def accounts(self) -> list[dict[str, Any]]:
        return [account_row(a) for a in self.cfg.accounts]

    async def account(self, name: str) -> dict[str, Any]:
        account = self.cfg.account(name)
        if account is None:
            raise NotFound(f"no account {name!r}")
        return account_row(account)

    async def suspend_account(self, name: str, reason: str) -> dict[str, Any]:
        raise PolicyUnavailable("suspending an account needs the policy guard")

    async def resume_account(self, name: str) -> dict[str, Any]:
        raise PolicyUnavailable("resuming an account needs the policy guard")

    async def suppressions(self, account: str, limit: int) -> list[dict[str, Any]]:
        raise PolicyUnavailable("suppression lists are kept by the policy guard")

    async def suppress(self, account: str, address: str, reason: str) -> dict[str, Any]:
        raise PolicyUnavailable("suppression lists are kept by the policy guard")

    async def unsuppress(self, account: str, address: str) -> dict[str, Any]:
        raise PolicyUnavailable("suppression lists are kept by the policy guard")

    async def held(self, limit: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(held_rows, self.spool, limit)

    async def release_held(self, job_id: str) -> dict[str, Any]:
        await self.submit(held_op(self.spool, job_id, lambda txn, found:
                                  jobs.release(self.spool, txn, found, now_ms())))
        self.emit({"type": "HeldReleased", "job": job_id})
        return {"job": job_id, "released": True}

    async def reject_held(self, job_id: str) -> dict[str, Any]:
        [job] = await self.submit(held_op(self.spool, job_id, lambda txn, found:
                                          jobs.remove(self.spool, txn, found)))
        self.emit({"type": "HeldRejected", "job": job_id, "id": job.message_id,
                   "account": job.account, "campaign": job.campaign,
                   "recipients": len(job.recipients)})
        return {"job": job_id, "rejected": True}

    async def unsubscribe(self, token: str) -> dict[str, Any]:
        raise PolicyUnavailable("one-click unsubscribe is served by the policy guard")
