"""What a finished run delivered: the accepts, the arrivals and the samples made into a
RunResult (bench/report.py shows it), and what counts as everything having arrived."""

from __future__ import annotations

from dataclasses import dataclass

from bench.accepts import AcceptLog
from bench.arrivals import ArrivalTracker
from bench.load import LoadResult
from bench.monitor import Monitor
from bench.report import RunResult
from bench.rig.assembly import Rig
from bench.scenarios import Planned
from bench.targets import Target


@dataclass
class Drain:
    why: str = ""  # why the wait ended before everything arrived
    at: float = 0.0  # time.time() when the wait ended


def throttled_expected(accepts: AcceptLog, plan: dict[int, Planned]) -> int:
    return sum(plan[i].throttled for i in accepts.accepted_at)


def drained(accepts: AcceptLog, tracker: ArrivalTracker, rig: Rig) -> bool:
    plan = tracker.plan
    waiting = any(plan[i].recipients and i not in tracker.delivered_at
                  for i in accepts.accepted_at)
    return not waiting and rig.throttle_accepted() >= throttled_expected(accepts, plan)


def build_result(target: Target, scenario: str, dkim: bool, load: LoadResult,
                 accepts: AcceptLog, tracker: ArrivalTracker, monitor: Monitor,
                 started: float) -> RunResult:
    plan = tracker.plan
    expected = [i for i in accepts.accepted_at if plan[i].recipients]
    delivered = [i for i in expected if i in tracker.delivered_at]
    last = max((tracker.delivered_at[i] for i in delivered), default=started)
    queues = [s.queue for s in monitor.samples if s.queue is not None]
    result = RunResult(
        target=target.label, scenario=scenario, dkim=dkim,
        accepted=load.accepted, refused=load.refused, errors=load.errors,
        replies=dict(load.replies), load_seconds=load.elapsed, e2e_seconds=last - started,
        expected=len(expected), delivered=len(delivered), other_arrivals=dict(tracker.other),
        accept_latencies=load.accept_latencies,
        e2e_latencies=[max(0.0, tracker.delivered_at[i] - accepts.accepted_at[i])
                       for i in delivered],
        delivered_times=[tracker.delivered_at[i] - started for i in delivered],
        cpu_seconds=monitor.samples[-1].cpu if monitor.samples else None,
        peak_memory=target.processes.peak_memory if target.processes else None,
        peak_queue=max(queues) if queues else None, samples=monitor.samples,
    )
    if dkim:
        result.notes.append(f"DKIM-signed at the sinks: {tracker.signed} of {tracker.matched}")
    if len(accepts.accepted_at) != load.accepted:
        result.notes.append(f"{load.accepted - len(accepts.accepted_at)} accepts not matched")
    return result


def add_throttled(run: RunResult, rig: Rig, expected: int, started: float, drain: Drain) -> None:
    """Count the messages the throttling MX took (it dates none: no latencies from it)."""
    if rig.throttle is None:
        return
    stats = rig.throttle.stats
    got = min(stats.accepted, expected)
    run.expected += expected
    run.delivered += got
    if got:
        run.e2e_seconds = max(run.e2e_seconds, drain.at - started)
    run.notes.append(f"throttling MX: took {stats.accepted} of {expected}, answered"
                     f" {stats.deferred} messages and {stats.refused} connections with 421,"
                     f" at most {stats.max_concurrent} connections at once")
