"""What an attempt's SMTP results mean for a job: plain functions, no sockets.

An attempt yields one `RcptResult` per recipient (from RCPT, DATA or a failure
that hit the whole transaction). `apply_attempt` turns them into the job's new
state: delivered and bounced recipients are final, deferred ones wait for the
next attempt on the backoff schedule, unless the message is past its maximum
age, when they expire.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from mta.queue.jobs import Job, RcptState

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass
class RcptResult:
    recipient: str
    code: int  # SMTP reply code; 0 when no reply was had (connection failure)
    text: str
    enhanced: str = ""  # x.y.z from the reply, or chosen by the engine
    mx: str = ""
    possible_duplicate: bool = False  # connection lost after the final dot
    tls: dict[str, Any] | None = None  # the session's TLS fields (delivery), for the events

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300


def enhanced_status(code: int, text: str, default: str = "") -> str:
    """The enhanced status code at the start of a reply text, else one from the code."""
    match = _ENHANCED.match(text.strip())
    if match and match.group(1) == str(code)[:1]:
        return match.group(0)
    if default:
        return default
    if 200 <= code < 300:
        return "2.0.0"
    return "5.0.0" if code >= 500 else "4.0.0"


@dataclass
class AttemptOutcome:
    """The result of applying an attempt to a job."""

    delivered: list[RcptResult] = field(default_factory=list)
    bounced: list[RcptResult] = field(default_factory=list)
    deferred: list[RcptResult] = field(default_factory=list)
    expired: list[RcptResult] = field(default_factory=list)
    next_attempt_ms: int | None = None  # None: the job is finished
    events: list[dict[str, Any]] = field(default_factory=list)  # built in the transaction
    # (when an event outbox is kept, mta.outbox), emitted as they are after the commit

    @property
    def failed(self) -> list[RcptResult]:
        """Recipients that get a DSN: bounced now or expired."""
        return self.bounced + self.expired


def retry_delay(attempts: int, initial: float, maximum: float, jitter: float,
                rng: random.Random | None = None) -> float:
    """Seconds until the next attempt after `attempts` failed ones: doubling, capped, jittered."""
    base = min(maximum, initial * (2 ** max(0, attempts - 1)))
    spread = base * jitter
    return max(1.0, base + (rng or random).uniform(-spread, spread))


def apply_attempt(job: Job, results: list[RcptResult], now_ms: int, received_ms: int,
                  max_age: float, retry: tuple[float, float, float],
                  retry_after: float | None = None) -> AttemptOutcome:
    """Update `job` in place with an attempt's per-recipient results.

    retry is (initial, maximum, jitter) seconds; retry_after, when given, replaces
    the backoff for deferred recipients (a destination that asked to slow down).
    """
    by_rcpt = {r.recipient: r for r in results}
    outcome = AttemptOutcome()
    job.attempts += 1
    too_old = (now_ms - received_ms) / 1000 >= max_age
    for rcpt in job.rcpts:
        result = by_rcpt.get(rcpt.address)
        if rcpt.state != RcptState.QUEUED or result is None:
            continue
        rcpt.code, rcpt.reply = result.code, result.text[:500]
        if result.delivered:
            rcpt.state = RcptState.DELIVERED
            outcome.delivered.append(result)
        elif result.permanent:
            rcpt.state = RcptState.BOUNCED
            outcome.bounced.append(result)
        elif too_old:
            rcpt.state = RcptState.BOUNCED
            outcome.expired.append(result)
        else:
            outcome.deferred.append(result)
    if job.waiting():
        delay = retry_after if retry_after is not None else retry_delay(job.attempts, *retry)
        outcome.next_attempt_ms = now_ms + int(delay * 1000)
        if outcome.deferred:
            job.error = outcome.deferred[0].text[:500]
    return outcome

