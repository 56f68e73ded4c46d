"""The policy guard's named databases in the spool's LMDB environment.

- ``policy.count``  ``C<account>\\0<campaign>`` / ``A<account>`` / ``M<account>\\0<YYYY-MM>``
  -> counters (msgpack dict)
- ``policy.state``  ``C<account>\\0<campaign>`` -> CampaignState, ``A<account>`` -> AccountState;
  only campaigns and accounts that were ever paused, suspended or deleted have one
- ``policy.supp``   ``<account>\\0<address>`` -> Suppression
- ``policy.meta``   ``unsubscribe_secret`` -> bytes
- ``policy.feedback`` ``<message id>\0<recipient>\0<kind>`` -> time: feedback already
  counted, so that a report sent (or replayed) again counts once
- ``policy.journal`` (only with `[cluster] redis`) ``<8-byte ns time><T|S><record key>``
  -> b"": states and suppressions changed on this node and not yet published to Redis
  (`mta.cluster.policy` reads and clears it)

Every function takes an open transaction: writers run inside the group committer's
writer thread (or, in the CLI, in their own write transaction), readers anywhere.
A database missing from a read-only environment reads as empty.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from mta.policy.model import AccountState, CampaignState, Counters, Suppression
from mta.queue.spool import Spool, pack, unpack
from mta.tracking.stats import open_dbs as open_tracking_dbs

COUNT_DB, STATE_DB, SUPP_DB, META_DB = "policy.count", "policy.state", "policy.supp", "policy.meta"
JOURNAL_DB, FEEDBACK_DB = "policy.journal", "policy.feedback"
STATE_REF, SUPP_REF = b"T", b"S"  # journal entries: a state or a suppression changed
SECRET_KEY = b"unsubscribe_secret"


def clean_name(name: str) -> bytes:
    return name.replace("\0", "").encode("utf-8", "replace")


def campaign_key(account: str, campaign: str) -> bytes:
    return b"C" + clean_name(account) + b"\0" + clean_name(campaign)


def account_key(account: str) -> bytes:
    return b"A" + clean_name(account)


def month_key(account: str, month: str) -> bytes:
    return b"M" + clean_name(account) + b"\0" + month.encode()


def supp_key(account: str, address: str) -> bytes:
    return clean_name(account) + b"\0" + clean_name(address)


def split_pair(key: bytes) -> tuple[str, str]:
    """(account, campaign-or-month) from a C or M key."""
    first, _, second = key[1:].partition(b"\0")
    return first.decode("utf-8", "replace"), second.decode("utf-8", "replace")


def journal_key(ref: bytes) -> bytes:
    return time.time_ns().to_bytes(8, "big") + ref


class PolicyStore:
    def __init__(self, spool: Spool, journal: bool = False) -> None:
        self.spool = spool
        self.count = spool.open_db(COUNT_DB)
        self.state = spool.open_db(STATE_DB)
        self.supp = spool.open_db(SUPP_DB)
        self.meta = spool.open_db(META_DB)
        self.feedback = spool.open_db(FEEDBACK_DB)
        self.journal = spool.open_db(JOURNAL_DB) if journal else None
        open_tracking_dbs(spool)  # engagement counters shown with the campaign's

    def first_feedback(self, txn: Any, message_id: str, recipient: str, kind: str,
                       now: float) -> bool:
        """True the first time this feedback about this message and recipient is seen."""
        key = b"\0".join((clean_name(message_id), clean_name(recipient.lower()), kind.encode()))
        return bool(txn.put(key, pack(now), db=self.feedback, overwrite=False))

    def keep_journal(self) -> None:
        """Journal every change from now on (several nodes share them)."""
        if self.journal is None:
            self.journal = self.spool.open_db(JOURNAL_DB)

    def note(self, txn: Any, ref: bytes) -> None:
        """Journal a changed state or suppression (several nodes: published to Redis)."""
        if self.journal is not None:
            txn.put(journal_key(ref), b"", db=self.journal)

    def read(self) -> Any:
        return self.spool.read()

    # --- counters -----------------------------------------------------------

    def get_counters(self, txn: Any, key: bytes) -> Counters:
        raw = txn.get(key, db=self.count) if self.count is not None else None
        return Counters.from_dict(unpack(raw) if raw else None)

    def put_counters(self, txn: Any, key: bytes, counters: Counters) -> None:
        txn.put(key, pack(counters.as_dict()), db=self.count)

    def campaigns(self, txn: Any) -> Iterator[tuple[str, str, Counters]]:
        """(account, campaign, counters) of every campaign that has counters."""
        yield from ((a, c, n) for a, c, n in self._pairs(txn, b"C"))

    def months(self, txn: Any, account: str) -> Iterator[tuple[str, int]]:
        for acct, month, counters in self._pairs(txn, b"M" + clean_name(account) + b"\0"):
            if acct == account:
                yield month, counters.submitted

    def _pairs(self, txn: Any, prefix: bytes) -> Iterator[tuple[str, str, Counters]]:
        if self.count is None:
            return
        cursor = txn.cursor(db=self.count)
        if not cursor.set_range(prefix):
            return
        for key, raw in cursor:
            if not key.startswith(prefix):
                return
            account, second = split_pair(key)
            yield account, second, Counters.from_dict(unpack(raw))

    # --- states -------------------------------------------------------------

    def get_campaign(self, txn: Any, account: str, campaign: str) -> CampaignState:
        raw = txn.get(campaign_key(account, campaign), db=self.state) if self.state else None
        return CampaignState.from_dict(unpack(raw) if raw else None)

    def put_campaign(self, txn: Any, account: str, campaign: str, state: CampaignState) -> None:
        self.put_state(txn, campaign_key(account, campaign), state.as_dict())

    def get_account(self, txn: Any, account: str) -> AccountState:
        raw = txn.get(account_key(account), db=self.state) if self.state else None
        return AccountState.from_dict(unpack(raw) if raw else None)

    def put_account(self, txn: Any, account: str, state: AccountState) -> None:
        self.put_state(txn, account_key(account), state.as_dict())

    def put_state(self, txn: Any, key: bytes, data: dict[str, Any], note: bool = True) -> None:
        txn.put(key, pack(data), db=self.state)
        if note:
            self.note(txn, STATE_REF + key)

    def get_state(self, txn: Any, key: bytes) -> dict[str, Any] | None:
        raw = txn.get(key, db=self.state) if self.state is not None else None
        return unpack(raw) if raw else None

    def states(self, txn: Any) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """Every (key, state dict) in policy.state: a small table, read whole."""
        if self.state is None:
            return
        for key, raw in txn.cursor(db=self.state):
            yield bytes(key), unpack(raw)

    # --- suppression ----------------------------------------------------------

    def get_suppression(self, txn: Any, account: str, address: str) -> Suppression | None:
        if self.supp is None:
            return None
        raw = txn.get(supp_key(account, address), db=self.supp)
        return Suppression.from_dict(unpack(raw)) if raw else None

    def put_suppression(self, txn: Any, account: str, entry: Suppression) -> None:
        key = supp_key(account, entry.address)
        txn.put(key, pack(entry.as_dict()), db=self.supp)
        self.note(txn, SUPP_REF + key)

    def delete_suppression(self, txn: Any, account: str, address: str) -> bool:
        key = supp_key(account, address)
        deleted = bool(txn.delete(key, db=self.supp))
        if deleted:
            self.note(txn, SUPP_REF + key)
        return deleted

    def suppressions(self, txn: Any, account: str) -> Iterator[Suppression]:
        if self.supp is None:
            return
        prefix = clean_name(account) + b"\0"
        cursor = txn.cursor(db=self.supp)
        if not cursor.set_range(prefix):
            return
        for key, raw in cursor:
            if not key.startswith(prefix):
                return
            yield Suppression.from_dict(unpack(raw))

    # --- the unsubscribe secret -------------------------------------------------

    def get_secret(self, txn: Any) -> bytes | None:
        if self.meta is None:
            return None
        raw = txn.get(SECRET_KEY, db=self.meta)
        return bytes(raw) if raw else None

    def ensure_secret(self, txn: Any) -> bytes:
        """The spool's random unsubscribe key, made on first use (shared by every worker)."""
        secret = self.get_secret(txn)
        if secret is None:
            secret = os.urandom(32)
            txn.put(SECRET_KEY, secret, db=self.meta)
        return secret

    # --- deleting an account's records -------------------------------------------

    def delete_prefix(self, txn: Any, db: Any, prefix: bytes) -> int:
        if db is None:
            return 0
        cursor = txn.cursor(db=db)
        removed = 0
        if not cursor.set_range(prefix):
            return 0
        while cursor.key().startswith(prefix):
            if not cursor.delete():
                break
            removed += 1
            if not cursor.key():
                break
        return removed
