"""Holding, releasing and removing the spool's delivery jobs of a campaign, account or message.

Transaction-level helpers for the policy guard's writer-thread operations and the CLI.
Finding a campaign's jobs scans the `job` database; a record is unpacked only when its
raw bytes contain the packed campaign and account names, so a scan over many jobs
stays cheap. Pausing and suspending only hold jobs that are not due yet: a due job may
be in a worker's hands right now, so those are held by the scheduler (through
`PolicyGuard.hold_reason`) when it picks them up, never behind its back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mta.queue.spool import QUEUED, Spool, pack, unpack

JobFilter = Callable[[dict[str, Any]], bool]


@dataclass
class RemovedJob:
    message_id: str
    domain: str
    account: str
    campaign: str
    recipients: list[str]


def find_jobs(spool: Spool, txn: Any, account: str,
              campaign: str | None = None) -> list[tuple[bytes, dict[str, Any]]]:
    """Every job of `account` (and of `campaign`, when given)."""
    needles = [pack(account)] + ([pack(campaign)] if campaign else [])
    found = []
    for key, raw in txn.cursor(db=spool.dbs["job"]):
        raw = bytes(raw)
        if not all(n in raw for n in needles):
            continue
        job = unpack(raw)
        if job.get("account") == account and (campaign is None or job.get("campaign") == campaign):
            found.append((bytes(key), job))
    return found


def campaign_owners(spool: Spool, txn: Any, campaign: str) -> set[str]:
    """The accounts with mail of `campaign` in the spool."""
    needle = pack(campaign)
    owners = set()
    for _, raw in txn.cursor(db=spool.dbs["job"]):
        if needle in bytes(raw):
            job = unpack(raw)
            if job.get("campaign") == campaign:
                owners.add(job.get("account", ""))
    return owners


def message_jobs(spool: Spool, txn: Any, message_id: str) -> list[tuple[bytes, dict[str, Any]]]:
    prefix = message_id.encode() + b"."
    cursor = txn.cursor(db=spool.dbs["job"])
    found: list[tuple[bytes, dict[str, Any]]] = []
    if not cursor.set_range(prefix):
        return found
    for key, raw in cursor:
        if not key.startswith(prefix):
            break
        found.append((bytes(key), unpack(raw)))
    return found


def held_jobs(spool: Spool, txn: Any) -> Iterator[tuple[bytes, str]]:
    """(job id, reason) of every held job."""
    for key, raw in txn.cursor(db=spool.dbs["held"]):
        yield bytes(key), bytes(raw).decode("utf-8", "replace")


def hold_waiting(spool: Spool, txn: Any, jobs: list[tuple[bytes, dict[str, Any]]],
                 reason: str, now_ms: int) -> int:
    """Hold the jobs that are neither held nor due yet; how many were held."""
    held = 0
    for job_id, job in jobs:
        if not job.get("held") and job["next"] > now_ms:
            spool.hold_job(txn, job_id, job, reason)
            held += 1
    return held


def release(spool: Spool, txn: Any, reason: str, now_ms: int,
            accept: JobFilter | None = None) -> int:
    """Put every job held for `reason` back in delivery, due now; how many."""
    ids = [job_id for job_id, why in held_jobs(spool, txn) if why == reason]
    released = 0
    for job_id in ids:
        job = spool.get_job(txn, job_id)
        if job is None or (accept is not None and not accept(job)):
            continue
        spool.release_job(txn, job_id, job, now_ms)
        released += 1
    return released


def remove(spool: Spool, txn: Any, jobs: list[tuple[bytes, dict[str, Any]]]) -> list[RemovedJob]:
    """Delete jobs (and messages left without jobs); what each one still had to deliver."""
    removed = []
    for job_id, job in jobs:
        spool.remove_job(txn, job_id, job)
        removed.append(RemovedJob(
            job["msg"], job["domain"], job.get("account", ""), job.get("campaign", ""),
            [r[0] for r in job["rcpts"] if r[1] == QUEUED]))
    return removed
