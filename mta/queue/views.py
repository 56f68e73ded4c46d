"""Read-only views of the spool: queue counts, message listings, one message with its jobs.

Shared by the `mta queue` commands (on a stopped engine's spool) and the admin API
(mta/http/api.py), so both answer the same JSON.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mta.queue.jobs import message_jobs
from mta.queue.spool import Spool


def queue_stats(spool: Spool) -> dict[str, Any]:
    by_state: Counter[str] = Counter()
    by_domain: dict[str, Counter[str]] = {}
    recipients = 0
    with spool.read() as txn:
        for job in spool.jobs(txn):
            state = job.state()
            recipients += len(job.waiting())
            by_state[str(state)] += 1
            by_domain.setdefault(job.domain, Counter())[str(state)] += 1
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
        jobs = [job.as_dict() for job in message_jobs(spool, txn, message_id)]
    return message_summary(message) | {"jobs": jobs}

