"""The policy guard wired into a worker: one `async wire_policy(worker)` extension.

Register it with the engine (``mta.engine.worker_extensions.append(wire_policy)`` and
``startup_checks.append(check_policy)``); it runs after intake and delivery are built.
It does nothing when the worker already has a guard (`worker.policy`) or when
`[policy] enabled` is false.

Delivery: due items pass through `guarded_dispatch`, which hands an item of a paused
campaign or a suspended account to `hold_item` instead of delivering it (the job moves
from `due` to `held`; the scheduler forgets the item once that is committed). The
deliverer asks again just before sending, since an item may wait at a destination's
pace while its campaign is paused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mta.policy.guard import PolicyGuard
from mta.policy.port import GuardAdmin


def holder(guard: PolicyGuard, scheduler: Any) -> Callable[[Any], bool]:
    """`take(item)`: True when the guard holds the item (a paused campaign, a suspended
    account); the hold is committed in the background and the scheduler forgets the item."""
    tasks: set[asyncio.Task[None]] = set()

    async def hold(item: Any, reason: str) -> None:
        try:
            await guard.hold_item(item, reason)
        finally:
            scheduler.in_flight.discard(item.job_id)

    def take(item: Any) -> bool:
        reason = guard.hold_reason(item)
        if reason is None:
            return False
        task = asyncio.get_running_loop().create_task(hold(item, reason))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return True

    return take


def guarded_dispatch(take: Callable[[Any], bool],
                     dispatch: Callable[[Any], None]) -> Callable[[Any], None]:
    def run(item: Any) -> None:
        if not take(item):
            dispatch(item)

    return run


async def wire_policy(worker: Any) -> PolicyGuard | None:
    if getattr(worker, "policy", None) is not None or not worker.cfg.policy.enabled:
        return None
    guard = PolicyGuard(worker.cfg, worker.spool, worker.committer, emit=worker.emit)
    await guard.start(daily_purge=worker.index == 0)
    worker.policy = guard
    worker.policy_admin = GuardAdmin(guard)
    worker.intake.policy = guard
    worker.events.listeners.append(guard.on_event)
    deliverer = getattr(worker, "deliverer", None)
    scheduler = getattr(worker, "scheduler", None)
    if deliverer is not None:
        deliverer.transforms.insert(0, guard.transform)  # before DKIM signing
    if scheduler is not None:
        take = holder(guard, scheduler)
        scheduler.dispatch = guarded_dispatch(take, scheduler.dispatch)
        if deliverer is not None:
            deliverer.hold = take  # again just before sending: a pause while it waited
    inbound = getattr(worker, "inbound", None)
    if inbound is not None and hasattr(inbound, "mailboxes"):
        inbound.mailboxes[worker.cfg.policy.unsubscribe_mailbox.lower()] = guard.unsubscribe_mailbox
    worker.closers.append(guard.close)
    if getattr(worker, "cluster", None) is not None:  # several nodes: share through Redis
        from mta.cluster.policy import share_policy

        await share_policy(worker, guard)
    return guard
