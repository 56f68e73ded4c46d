"""The rig yields the CPU to the MTA under test.

The load generator and the sinks stand for upstream apps and remote MX servers, which
in production run on other machines. Here they share the CPUs with the MTA under test,
and under the normal policy every write of the MTA to a sink (and every reply to the
load generator) wakes a rig process that preempts the writer there and then: thousands
of preemptions a second, more the faster the MTA goes, on the MTA's clock. As
SCHED_BATCH processes (sched(7): a woken batch task does not preempt, it waits for the
running one to sleep or use up its slice) the rig does the same work a little later.
The MTA under test, whichever it is, is started back at the normal policy (`as_target`).

It does not weigh the same on every MTA: a sink's reply now waits for the CPU's current
task, which costs an MTA that waits on each reply more. Measured (bench/RESULTS.md,
issue 21, eleventh session): the engine alone, rounds alternating, 10 % faster end to end;
`--compare postfix` back to back, the engine 4 % faster and tuned Postfix 5 % slower.
`--rig-sched normal` keeps the old way.
"""

from __future__ import annotations

import os
from collections.abc import Callable

POLICIES = {"batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER}


def rig_policy(name: str) -> None:
    """Set the calling thread's policy; call it in the bench's main thread before the rig
    starts: the threads and processes it starts (sinks, DNS, trackers) inherit it."""
    os.sched_setscheduler(0, POLICIES[name], os.sched_param(0))


def as_target(then: Callable[[], None] | None) -> Callable[[], None]:
    """A `preexec_fn` for the start process of an MTA under test: the normal policy (not
    the rig's), then `then` (joining its cgroup, say)."""

    def start() -> None:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        if then is not None:
            then()

    return start
