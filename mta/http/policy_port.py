"""What the admin API needs from the policy guard, and a spool-only stand-in.

The policy guard (mta/policy) owns campaigns' counters and pauses, suppression
lists, held mail and accounts. The admin API talks to it only through
`PolicyAdmin`: whoever wires the guard into a worker sets
``worker.policy_admin`` to an object with these methods (the guard itself or a
thin adapter over its functions). Without one, `SpoolPolicy` serves what the
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

from mta.queue.spool import QUEUED, Spool, job_state

# The contract's figures (DESIGN.md), when the config has no [policy] section.
DEFAULT_THRESHOLDS = {"hard_bounce": 0.08, "complaint": 0.005, "unsubscribe": 0.01,
                      "min_volume": 200}


def campaign_hold(account: str, campaign: str) -> str:
    """The `held` reason of a paused campaign's jobs (the same as the policy guard's)."""
    return f"campaign:{account}/{campaign}"


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
class PolicyAdmin(Protocol):
    """Campaign rows are dicts: account, campaign, paused (bool), reason, sent, delivered,
    hard_bounces, complaints, unsubscribes, rates {hard_bounce, complaint, unsubscribe}
    (fractions or None), queued, held. Async methods return the changed object's row."""

    def thresholds(self) -> dict[str, float]: ...
    async def campaigns(self) -> list[dict[str, Any]]: ...
    async def campaign(self, account: str, campaign: str) -> dict[str, Any]: ...
    async def pause_campaign(self, account: str, campaign: str, reason: str
                             ) -> dict[str, Any]: ...
    async def resume_campaign(self, account: str, campaign: str) -> dict[str, Any]: ...
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
        for _, job in spool.jobs(txn):
            if not job.get("campaign"):
                continue
            key = (job.get("account", ""), job["campaign"])
            row = rows.setdefault(key, blank_campaign(*key))
            row[job_state(job)] += 1
            if job.get("held") == campaign_hold(*key):
                row["paused"], row["reason"] = True, "paused by an operator"
    return sorted(rows.values(), key=lambda r: (r["account"], r["campaign"]))


def blank_campaign(account: str, campaign: str) -> dict[str, Any]:
    return {"account": account, "campaign": campaign, "paused": False, "reason": "",
            "sent": None, "delivered": None, "hard_bounces": None, "complaints": None,
            "unsubscribes": None,
            "rates": {"hard_bounce": None, "complaint": None, "unsubscribe": None},
            "queued": 0, "deferred": 0, "held": 0}


def campaign_job_ids(spool: Spool, account: str, campaign: str) -> list[bytes]:
    with spool.read() as txn:
        return [key for key, job in spool.jobs(txn)
                if job.get("campaign") == campaign and job.get("account", "") == account]


def hold_op(spool: Spool, job_ids: list[bytes], reason: str) -> Callable[[Any], int]:
    """Hold every job that is still waiting for delivery; returns how many."""

    def hold(txn: Any) -> int:
        count = 0
        for job_id in job_ids:
            job = spool.get_job(txn, job_id)
            if job is not None and not job.get("held"):
                spool.hold_job(txn, job_id, job, reason)
                count += 1
        return count

    return hold


def release_op(spool: Spool, job_ids: list[bytes], reason: str | None
               ) -> Callable[[Any], int]:
    """Release held jobs (only those held for `reason`, unless None); returns how many."""

    def release(txn: Any) -> int:
        now_ms = int(time.time() * 1000)
        count = 0
        for job_id in job_ids:
            job = spool.get_job(txn, job_id)
            if job is not None and job.get("held") and reason in (None, job["held"]):
                spool.release_job(txn, job_id, job, now_ms)
                count += 1
        return count

    return release


def remove_op(spool: Spool, job_ids: list[bytes], only_held: bool = False
              ) -> Callable[[Any], list[dict[str, Any]]]:
    """Remove jobs (and messages left with none); returns the removed jobs."""

    def remove(txn: Any) -> list[dict[str, Any]]:
        removed = []
        for job_id in job_ids:
            job = spool.get_job(txn, job_id)
            if job is not None and (job.get("held") or not only_held):
                spool.remove_job(txn, job_id, job)
                removed.append(job)
        return removed

    return remove


def held_rows(spool: Spool, limit: int) -> list[dict[str, Any]]:
    db = spool.dbs.get("held")
    rows: list[dict[str, Any]] = []
    if db is None:
        return rows
    with spool.read() as txn:
        for job_id, reason in txn.cursor(db=db):
            job = spool.get_job(txn, job_id) or {}
            rows.append({
                "job": job_id.decode(), "reason": reason.decode("utf-8", "replace"),
                "message": job.get("msg"), "account": job.get("account", ""),
                "campaign": job.get("campaign", ""), "domain": job.get("domain"),
                "recipients": [r[0] for r in job.get("rcpts", []) if r[1] == QUEUED]})
            if len(rows) >= limit:
                break
    return rows


def account_row(account: Any) -> dict[str, Any]:
    return {"name": account.name, "email": account.email, "plan": account.plan,
            "subscriber_level": account.subscriber_level,
            "sender_domains": list(account.sender_domains), "suspended": None}


class SpoolPolicy:
    """`PolicyAdmin` from the spool and the config alone (no policy guard running)."""

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

    async def _jobs(self, account: str, campaign: str) -> list[bytes]:
        ids = await asyncio.to_thread(campaign_job_ids, self.spool, account, campaign)
        if not ids:
            raise NotFound(f"no campaign {campaign!r} of account {account!r} in the queue")
        return ids

    async def pause_campaign(self, account: str, campaign: str, reason: str) -> dict[str, Any]:
        ids = await self._jobs(account, campaign)
        held = await self.submit(hold_op(self.spool, ids, campaign_hold(account, campaign)))
        self.emit({"type": "CampaignPaused", "account": account, "campaign": campaign,
                   "reason": reason or "paused by an operator", "held": held, "by": "operator"})
        return await self.campaign(account, campaign)

    async def resume_campaign(self, account: str, campaign: str) -> dict[str, Any]:
        ids = await self._jobs(account, campaign)
        released = await self.submit(
            release_op(self.spool, ids, campaign_hold(account, campaign)))
        self.emit({"type": "CampaignResumed", "account": account, "campaign": campaign,
                   "released": released})
        return await self.campaign(account, campaign)

    async def drop_campaign(self, account: str, campaign: str) -> dict[str, Any]:
        ids = await self._jobs(account, campaign)
        removed = await self.submit(remove_op(self.spool, ids))
        self.emit({"type": "CampaignDropped", "account": account, "campaign": campaign,
                   "jobs": len(removed),
                   "recipients": sum(len(j["rcpts"]) for j in removed)})
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
        if not await self.submit(release_op(self.spool, [job_id.encode()], None)):
            raise NotFound(f"no held job {job_id!r}")
        self.emit({"type": "HeldReleased", "job": job_id})
        return {"job": job_id, "released": True}

    async def reject_held(self, job_id: str) -> dict[str, Any]:
        removed = await self.submit(remove_op(self.spool, [job_id.encode()], only_held=True))
        if not removed:
            raise NotFound(f"no held job {job_id!r}")
        job = removed[0]
        self.emit({"type": "HeldRejected", "job": job_id, "id": job["msg"],
                   "account": job.get("account", ""), "campaign": job.get("campaign", ""),
                   "recipients": len(job["rcpts"])})
        return {"job": job_id, "rejected": True}

    async def unsubscribe(self, token: str) -> dict[str, Any]:
        raise PolicyUnavailable("one-click unsubscribe is served by the policy guard")
