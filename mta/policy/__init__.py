"""The policy guard: the service contract enforced on every campaign and account.

Rates and pauses (`rates`, `ledger`), suppression lists, trial and monthly limits,
List-Unsubscribe with signed one-click tokens (`headers`, `tokens`), the footer
(`footer`), operator actions (`admin`, used by the CLI and the admin API through
`port.GuardAdmin`) and data retention (`retention`). State lives in the spool's LMDB
environment (`store`); `guard.PolicyGuard` is the per-worker runtime.

Wiring in a worker (mta/engine.py and the delivery service)::

    guard = PolicyGuard(cfg, worker.spool, worker.committer, emit=worker.emit)
    await guard.start(daily_purge=worker.index == 0)
    worker.intake.policy = guard
    worker.events.listeners.append(guard.on_event)
    deliverer.transforms.insert(0, guard.transform)       # before DKIM signing
    # scheduler, before dispatching an item:
    #     reason = guard.hold_reason(item)
    #     if reason: await guard.hold_item(item, reason)  (and forget the item)
    worker.policy_admin = GuardAdmin(guard)               # mta.policy.port
    worker.closers.append(guard.close)

and `check_policy` among the engine's startup checks.

On several nodes (`[cluster] redis`), `wire_policy` also starts `mta.cluster.policy`:
LMDB stays each node's copy, changes are journaled (`policy.journal`) and shared through
Redis, campaigns are judged on the cluster's counts, and trial and monthly limits are
reserved there (`guard.admit`); without Redis nothing of this runs.
"""

from mta.policy.guard import (
    InvalidUnsubscribe,
    PolicyGuard,
    UnsubscribeResult,
    check_policy,
)

__all__ = ["InvalidUnsubscribe", "PolicyGuard", "UnsubscribeResult", "check_policy"]
