"""Read-only views of the spool: queue counts, message listings, one message with its jobs.

Shared by the `mta queue` commands (on a stopped engine's spool) and the admin API
(mta/http/admin.py), so both answer the same JSON.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from mta.queue.spool import QUEUED, Spool, job_state


def queue_stats(spool: Spool) -> dict[str, Any]:
    by_state: Counter[str] = Counter()
    by_domain: dict[str, Counter[str]] = {}
    recipients = 0
    with spool.read() as txn:
        for _, job in spool.jobs(txn):
            state = job_state(job)
            waiting = sum(1 for r in job["rcpts"] if r[1] == QUEUED)
            recipients += waiting
            by_state[state] += 1
            by_domain.setdefault(job["domain"], Counter())[state] += 1
    return {
        "total": spool.count("msg"),
        "jobs": sum(by_state.values()),
        "recipients": recipients,
        "by_state": dict(by_state),
        "by_domain": {d: dict(c) for d, c in sorted(by_domain.items(), key=lambda x: -x[1].total())},
    }


def message_summary(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "data"}


def message_list(spool: Spool, limit: int) -> list[dict[str, Any]]:
    rows = []
    with spool.read() as txn:
        for message in spool.messages(txn):
            rows.append(message_summary(message))
            if len(rows) >= limit:
                break
    return rows


def message_detail(spool: Spool, message_id: str) -> dict[str, Any] | None:
    """A message with its delivery jobs (each with its `job` id), or None."""
    with spool.read() as txn:
        message = spool.get_message(txn, message_id)
        if message is None:
            return None
        jobs = [dict(job, job=key.decode()) for key, job in _jobs_of(spool, txn, message_id)]
    return message_summary(message) | {"jobs": jobs}


def _jobs_of(spool: Spool, txn: Any, message_id: str) -> Iterator[tuple[bytes, Any]]:
    prefix = message_id.encode() + b"."
    cursor = txn.cursor(db=spool.dbs["job"])
    if not cursor.set_range(prefix):
        return
    for key in cursor.iternext(keys=True, values=False):
        if not key.startswith(prefix):
            return
        yield key, spool.get_job(txn, key)
