"""Which due jobs the contract keeps out of delivery: the scheduler's hold check.

A job of a paused or dropped campaign, or of a suspended or closed account, is held
(not lost, not bounced) until an operator releases it. The scheduler asks
`hold_reason` before an item is sent and again just before sending; the hold itself
is made by the queue (mta.queue), which asks `still_holds` inside its transaction,
since a pause may have been lifted since this worker last looked. Pausing a campaign
holds its jobs that are not due yet (`hold_campaign_op`); due ones are held by the
scheduler when it picks them up, never behind its back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from mta.policy.model import (
    ACTIVE,
    DROPPED,
    PAUSED,
    account_hold,
    campaign_hold,
)
from mta.policy.snapshot import SnapshotCache
from mta.policy.store import PolicyStore
from mta.queue import jobs
from mta.queue.jobs import HoldResult, Job
from mta.queue.scheduler import Item


class PolicyHolds:
    def __init__(self, store: PolicyStore, cache: SnapshotCache, local_domains: set[str],
                 counts: Counter[str]) -> None:
        self.store = store
        self.cache = cache
        self.local_domains = local_domains  # the engine's own mail is never held
        self.counts = counts

    def hold_reason(self, item: Item) -> str | None:
        message = item.message
        account = message.get("account", "")
        if (not account or message.get("notice") or message.get("dsn_for")
                or item.domain in self.local_domains):
            return None
        snap = self.cache.get()
        if account in snap.accounts:
            return account_hold(account)
        campaign = message.get("campaign", "")
        state = snap.campaigns.get((account, campaign)) if campaign else None
        if state is not None and state.status in (PAUSED, DROPPED):
            return campaign_hold(account, campaign)
        return None

    def still_holds(self, txn: Any, job: Job, reason: str) -> bool:
        if reason == account_hold(job.account):
            return self.store.get_account(txn, job.account).status != ACTIVE
        state = self.store.get_campaign(txn, job.account, job.campaign)
        return state.status in (PAUSED, DROPPED)

    def hold_done(self, result: HoldResult) -> None:
        if result == HoldResult.STALE:
            self.cache.refresh()  # the item stays due and goes out at the next scan
        elif result == HoldResult.HELD:
            self.counts["held_paused"] += 1


def hold_campaign_op(store: PolicyStore, account: str, campaign: str,
                     now_ms: int) -> Callable[[Any], int]:
    """An operation holding a paused campaign's jobs that are not due yet."""

    def hold(txn: Any) -> int:
        found = jobs.find_jobs(store.spool, txn, account, campaign)
        return jobs.hold(store.spool, txn, found, campaign_hold(account, campaign), now_ms)

    return hold
