"""The policy guard: the service contract enforced on every campaign and account.

Rates and pauses (`rates`, `ledger`), suppression lists, trial and monthly limits,
List-Unsubscribe with signed one-click tokens (`headers`, `tokens`), the footer
(`footer`), operator actions (`operations`, used by the CLI and, through
`mta.http.guard_operations`, the admin API) and data retention (`retention`). State
lives in the spool's LMDB environment (`store`); `guard.PolicyGuard` is the per-worker
runtime, with its parts: `holds`, `transform`, `snapshot` (the cached pauses).

The engine (mta/engine.py) wires a `PolicyGuard` into each worker: its intake checks
into intake, its `holds` into the scheduler, its `transform` before DKIM signing, its
`on_event` into the event log, its unsubscribe mailbox into the inbound handler. On
several nodes (`[cluster] redis`) the wiring plugs `mta.cluster.policy.PolicySync` into
the guard's `SharedPolicy` port (`PolicyGuard.share`); without Redis nothing of it runs.
"""

from mta.policy.guard import (
    InvalidUnsubscribe,
    PolicyGuard,
    UnsubscribeResult,
    check_policy,
)

__all__ = ["InvalidUnsubscribe", "PolicyGuard", "UnsubscribeResult", "check_policy"]
