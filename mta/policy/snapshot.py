"""The campaigns and accounts that are not active, cached per worker for `cache_ttl`.

Pauses and suspensions live in the spool's LMDB (mta.policy.store); each worker keeps a
copy for at most `[policy] cache_ttl` seconds, so a pause decided by another worker or
by `mta campaign pause` is honoured by every worker within a second, and the intake
checks and delivery holds cost no read transaction per message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mta.policy.model import ACTIVE, AccountState, CampaignState
from mta.policy.store import PolicyStore


@dataclass
class Snapshot:
    """Campaigns and accounts that are not active, as one worker last read them."""

    campaigns: dict[tuple[str, str], CampaignState] = field(default_factory=dict)
    accounts: dict[str, AccountState] = field(default_factory=dict)


def load_snapshot(store: PolicyStore, txn: Any) -> Snapshot:
    snap = Snapshot()
    for key, data in store.states(txn):
        if data.get("status", ACTIVE) == ACTIVE:
            continue
        if key.startswith(b"C"):
            account, _, campaign = key[1:].partition(b"\0")
            snap.campaigns[(account.decode(), campaign.decode())] = CampaignState.from_dict(data)
        elif key.startswith(b"A"):
            snap.accounts[key[1:].decode()] = AccountState.from_dict(data)
    return snap


class SnapshotCache:
    def __init__(self, store: PolicyStore, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._snapshot = Snapshot()
        self._loaded_at = float("-inf")

    def get(self) -> Snapshot:
        now = time.monotonic()
        if now - self._loaded_at >= self.ttl:
            with self.store.read() as txn:
                self._snapshot = load_snapshot(self.store, txn)
            self._loaded_at = now
        return self._snapshot

    def refresh(self) -> None:
        """Read again at the next `get` (a change was just made)."""
        self._loaded_at = float("-inf")
