"""Delivery jobs: their records, their states, and the only code that changes them.

A job is one destination domain's recipients of a message. Its state is one of
`JobState`; each recipient has a `RcptState`. Every change of a job's state (held,
released, postponed, sent, removed) goes through the functions here and the
`Spool` methods they call, inside a write transaction: the scheduler, the policy
guard, the admin API and the CLI ask for a change, they never write job records.

On disk a job is a msgpack map and each recipient a list ``[address, state, code,
reply]`` (compact, and the same layout as earlier versions of the spool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mta.queue.spool import Spool


class RcptState(StrEnum):
    QUEUED = "queued"  # waiting for delivery
    DELIVERED = "delivered"
    BOUNCED = "bounced"  # refused for good, or expired


class JobState(StrEnum):
    QUEUED = "queued"  # due, never tried
    DEFERRED = "deferred"  # tried before, due again later
    SENDING = "sending"  # an attempt is under way
    HELD = "held"  # kept out of delivery (a pause, a review)
    DONE = "done"  # every recipient is final; the job leaves the spool


class HoldResult(StrEnum):
    HELD = "held"
    GONE = "gone"  # removed, or held already
    STALE = "stale"  # the reason to hold it no longer applies


@dataclass
class Recipient:
    address: str
    state: RcptState = RcptState.QUEUED
    code: int | None = None  # the last reply's code
    reply: str | None = None  # and its text

    @classmethod
    def from_record(cls, record: list[Any]) -> Recipient:
        address, state, code, reply = record
        return cls(address, RcptState(state), code, reply)

    def to_record(self) -> list[Any]:
        return [self.address, str(self.state), self.code, self.reply]


@dataclass
class Job:
    id: bytes
    msg: str  # the message id
    domain: str
    account: str = ""
    campaign: str = ""
    rcpts: list[Recipient] = field(default_factory=list)
    attempts: int = 0
    next_ms: int = 0  # when it is due
    first_ms: int = 0  # when it was queued
    error: str | None = None  # the last deferral's reply
    held: str = ""  # why it is held; empty: it is not
    not_before_ms: int = 0  # scheduled sending: never due before this (0: no such time)
    lane: str = ""  # "transactional" (mta.queue.lanes); "": bulk

    @classmethod
    def from_record(cls, job_id: bytes, record: dict[str, Any]) -> Job:
        return cls(
            bytes(job_id), record["msg"], record["domain"], record.get("account", ""),
            record.get("campaign", ""), [Recipient.from_record(r) for r in record["rcpts"]],
            record["attempts"], record["next"], record["first"], record.get("error"),
            record.get("held", ""), record.get("nb", 0), record.get("lane", ""))

    def to_record(self) -> dict[str, Any]:
        record = {
            "msg": self.msg, "domain": self.domain, "account": self.account,
            "campaign": self.campaign, "rcpts": [r.to_record() for r in self.rcpts],
            "attempts": self.attempts, "next": self.next_ms, "first": self.first_ms,
            "error": self.error,
        }
        if self.held:
            record["held"] = self.held
        if self.not_before_ms:
            record["nb"] = self.not_before_ms
        if self.lane:
            record["lane"] = self.lane
        return record

    def as_dict(self) -> dict[str, Any]:
        """The job as the admin API and `mta queue show` print it, with its state."""
        return self.to_record() | {"job": self.id.decode(), "state": str(self.state())}

    def waiting(self) -> list[str]:
        """The recipients still to deliver."""
        return [r.address for r in self.rcpts if r.state == RcptState.QUEUED]

    def state(self, sending: bool = False) -> JobState:
        if self.held:
            return JobState.HELD
        if not self.waiting():
            return JobState.DONE
        if sending:
            return JobState.SENDING
        return JobState.DEFERRED if self.attempts else JobState.QUEUED


def new_job(job_id: bytes, message_id: str, domain: str, account: str, campaign: str,
            recipients: list[str], now_ms: int, not_before_ms: int = 0, lane: str = "") -> Job:
    """A job first due at `now_ms`, or at its send time `not_before_ms` if later."""
    not_before_ms = not_before_ms if not_before_ms > now_ms else 0
    return Job(job_id, message_id, domain, account, campaign,
               [Recipient(r) for r in recipients], 0, max(now_ms, not_before_ms), now_ms,
               not_before_ms=not_before_ms, lane=lane)


@dataclass
class RemovedJob:
    """What a removed job still had to deliver (for the events of a drop or a reject)."""

    message_id: str
    domain: str
    account: str
    campaign: str
    recipients: list[str]


# --- finding jobs -------------------------------------------------------------------

JobFilter = Callable[[Job], bool]


def find_jobs(spool: Spool, txn: Any, account: str, campaign: str | None = None) -> list[Job]:
    """Every job of `account` (and of `campaign`, when given)."""
    names = [account] + ([campaign] if campaign else [])
    return [job for job in spool.scan_jobs(txn, names)
            if job.account == account and campaign in (None, job.campaign)]


def campaign_owners(spool: Spool, txn: Any, campaign: str) -> set[str]:
    """The accounts with mail of `campaign` in the spool."""
    return {job.account for job in spool.scan_jobs(txn, [campaign])
            if job.campaign == campaign}


def message_jobs(spool: Spool, txn: Any, message_id: str) -> list[Job]:
    return list(spool.jobs(txn, prefix=message_id.encode() + b"."))


def held_jobs(spool: Spool, txn: Any) -> Iterator[tuple[bytes, str]]:
    """(job id, reason) of every held job."""
    for key, raw in txn.cursor(db=spool.dbs["held"]):
        yield bytes(key), bytes(raw).decode("utf-8", "replace")


def jobs_by_ids(spool: Spool, txn: Any, job_ids: list[bytes]) -> list[Job]:
    return [job for job_id in job_ids if (job := spool.get_job(txn, job_id)) is not None]


# --- changing them ------------------------------------------------------------------

def hold(spool: Spool, txn: Any, jobs: list[Job], reason: str,
         not_due_before_ms: int | None = None) -> int:
    """Hold the jobs that are not held yet; how many were held.

    With `not_due_before_ms`, only jobs due after it: a due job may be in a worker's
    hands right now, and the scheduler holds those itself when it picks them up.
    """
    held = 0
    for job in jobs:
        if job.held or (not_due_before_ms is not None and job.next_ms <= not_due_before_ms):
            continue
        spool.hold_job(txn, job, reason)
        held += 1
    return held


def release(spool: Spool, txn: Any, jobs: list[Job], now_ms: int,
            reason: str | None = None) -> int:
    """Put held jobs (only those held for `reason`, unless None) back in delivery."""
    released = 0
    for job in jobs:
        if job.held and reason in (None, job.held):
            spool.release_job(txn, job, now_ms)
            released += 1
    return released


def release_reason(spool: Spool, txn: Any, reason: str, now_ms: int,
                   accept: JobFilter | None = None) -> int:
    """Put every job held for `reason` back in delivery, due now; how many."""
    ids = [job_id for job_id, why in held_jobs(spool, txn) if why == reason]
    found = [job for job in jobs_by_ids(spool, txn, ids) if accept is None or accept(job)]
    return release(spool, txn, found, now_ms, reason)


def remove(spool: Spool, txn: Any, jobs: list[Job]) -> list[RemovedJob]:
    """Delete jobs (and messages left without jobs); what each one still had to deliver."""
    removed = []
    for job in jobs:
        spool.remove_job(txn, job)
        removed.append(RemovedJob(job.msg, job.domain, job.account, job.campaign,
                                  job.waiting()))
    return removed
