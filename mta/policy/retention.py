"""Data retention: a deleted account's data is purged once its retention has passed.

`mta account delete NAME` marks the account deleted with a purge date
(`[policy] retention_days` later, 92 days: three months). From then on its mail is
refused and what it had queued is held. The purge (`mta account purge` from cron, or
`PolicyGuard.purge_due()` from the engine once a day) removes, for every account past
its date:

- its suppression list, counters (account, campaigns, months) and campaign states;
- its mail still in the spool (held or not), without DSNs;
- what the spool kept of its delivered mail to attribute late feedback (the ``sent``
  records, with their recipients) and the feedback already counted about those messages;
- its lines in the event log: the live file and rotated ones (``events.jsonl.*``,
  gzip too) are rewritten without any record whose ``account`` is the purged account,
  written to a temporary file that replaces the original. Workers append to the live
  file through their own descriptor: lines they append while the purge runs are
  carried over (the old file is followed for `settle` seconds after the swap), and the
  event log must reopen its file when the path points to a new file (as for logrotate).

The account's state record stays, marked purged, so that the purge is logged once and
the name keeps being refused. Each purge is logged and returned as a report.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from mta.policy.model import DELETED, AccountState
from mta.policy.store import PolicyStore, account_key, clean_name
from mta.queue import jobs
from mta.queue.spool import unpack
from mta.tracking.stats import purge_account as purge_engagement

log = logging.getLogger("mta.policy.retention")

PURGED = "purged"


@dataclass
class PurgeReport:
    account: str
    suppressions: int = 0
    counters: int = 0
    states: int = 0
    jobs: int = 0
    recipients: int = 0
    sent_records: int = 0
    event_lines: int = 0
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def due_accounts(store: PolicyStore, txn: Any, now: float) -> list[str]:
    due = []
    for key, data in store.states(txn):
        if key.startswith(b"A"):
            state = AccountState.from_dict(data)
            if state.status == DELETED and state.purge_after <= now:
                due.append(key[1:].decode("utf-8", "replace"))
    return due


def purge_account_records(store: PolicyStore, txn: Any, account: str, now: float
                          ) -> PurgeReport:
    """Everything of `account` in LMDB (one transaction); its state becomes 'purged'."""
    name = clean_name(account)
    report = PurgeReport(account)
    report.suppressions = store.delete_prefix(txn, store.supp, name + b"\0")
    report.counters = (store.delete_prefix(txn, store.count, b"C" + name + b"\0")
                       + store.delete_prefix(txn, store.count, b"M" + name + b"\0")
                       + int(bool(txn.delete(account_key(account), db=store.count))))
    report.states = store.delete_prefix(txn, store.state, b"C" + name + b"\0")
    report.counters += purge_engagement(store, txn, account)  # opens, clicks, who counted
    removed = jobs.remove(store.spool, txn, jobs.find_jobs(store.spool, txn, account))
    report.jobs = len(removed)
    report.recipients = sum(len(r.recipients) for r in removed)
    report.sent_records = purge_sent_records(store, txn, account)
    state = store.get_account(txn, account)
    state.status, state.reason, state.at = PURGED, "data purged", now
    store.put_account(txn, account, state)
    return report


def purge_sent_records(store: PolicyStore, txn: Any, account: str) -> int:
    """The account's `sent` records (who its messages went to) and the feedback keys about
    those messages; one pass over the `sent` database."""
    spool = store.spool
    sent = spool.dbs.get("sent")
    if sent is None:
        return 0
    mine = []
    for key, raw in txn.cursor(db=sent):
        if unpack(raw)[0] == account:
            mine.append(key)
    for key in mine:
        txn.delete(key, db=sent)
        store.delete_prefix(txn, store.feedback, key + b"\0")
    return len(mine)


def event_log_files(path: str | os.PathLike[str]) -> list[Path]:
    """The live event log and its rotated siblings (events.jsonl.1, events.jsonl.2.gz, ...)."""
    live = Path(path)
    files = [live] if live.exists() else []
    if live.parent.is_dir():
        files += sorted(p for p in live.parent.glob(live.name + ".*")
                        if p.is_file() and not p.name.endswith(".purge"))
    return files


def names_account(line: bytes, accounts: set[str]) -> bool:
    if not any(a.encode() in line for a in accounts):
        return False  # cheap test first: most lines are other accounts'
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("account") in accounts


def _filter(lines: Iterable[bytes], out: IO[bytes], accounts: set[str]) -> int:
    removed = 0
    for line in lines:
        if names_account(line, accounts):
            removed += 1
        else:
            out.write(line)
    return removed


def purge_log_file(path: Path, accounts: set[str], settle: float = 0.0) -> int:
    """Rewrite one file without the accounts' records; how many lines went."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    tmp = path.with_name(path.name + ".purge")
    tmp.unlink(missing_ok=True)  # left by an interrupted purge
    with opener(path, "rb") as old, opener(tmp, "ab") as out:
        removed = _filter(_complete_lines(old), out, accounts)
        out.flush()
        os.replace(tmp, path)
        if opener is open:
            removed += _follow(old, out, accounts, settle)
    return removed


def _complete_lines(stream: IO[bytes]) -> Iterable[bytes]:
    """Whole lines only; a partial last line is left for the next read."""
    while True:
        at = stream.tell()
        line = stream.readline()
        if not line:
            return
        if not line.endswith(b"\n"):
            stream.seek(at)
            return
        yield line


def _follow(old: IO[bytes], out: IO[bytes], accounts: set[str], settle: float) -> int:
    """Carry lines still appended to the replaced file over to the new one, for a while."""
    removed = _filter(_complete_lines(old), out, accounts)
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        removed += _filter(_complete_lines(old), out, accounts)
        out.flush()
    rest = old.read()
    if rest and not names_account(rest, accounts):
        out.write(rest)
    return removed


def purge_event_logs(path: str | os.PathLike[str], accounts: set[str],
                     settle: float = 0.0) -> tuple[int, list[str]]:
    if not accounts:
        return 0, []
    removed, files = 0, []
    for file in event_log_files(path):
        try:
            removed += purge_log_file(file, accounts, settle if file == Path(path) else 0.0)
            files.append(str(file))
        except (OSError, EOFError) as exc:
            log.error("could not purge %s: %s", file, exc)
    return removed, files


def log_report(report: PurgeReport) -> None:
    log.info(
        "purged account %s: %d suppression entries, %d counters, %d campaign states, "
        "%d jobs (%d recipients), %d sent records, %d event lines", report.account,
        report.suppressions, report.counters, report.states, report.jobs, report.recipients,
        report.sent_records, report.event_lines)
