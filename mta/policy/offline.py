"""Operator actions on the spool from a separate process (the `mta` CLI).

The CLI opens the spool's LMDB environment itself and writes in its own transactions:
LMDB lets one writer at a time in, across processes, so this is safe while the engine
runs, and the workers see the change within `[policy] cache_ttl`. Events (Dropped,
Rejected, CampaignPaused, ...) are appended to the engine's event log and every action
to the audit log, as the engine would.
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mta.audit import AuditLog, action_record
from mta.config import Config
from mta.events import EventLog
from mta.outbox.wiring import append_now
from mta.policy import operations
from mta.policy.rates import Thresholds, monthly_cap
from mta.policy.store import PolicyStore
from mta.queue.spool import Spool

T = TypeVar("T")


def operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


class OfflineSession:
    def __init__(self, cfg: Config, write: bool = False) -> None:
        path = Path(cfg.spool.path)
        if not (path / "data.mdb").exists():
            raise FileNotFoundError(f"no spool at {path} (start the engine once first)")
        self.cfg = cfg
        self.spool = Spool(path, cfg.spool.map_size, readonly=not write)
        self.spool_writable = write
        self.store = PolicyStore(self.spool, journal=write and bool(cfg.cluster.redis))
        self.thresholds = Thresholds.from_config(cfg.policy)
        self.by = operator()
        self._events: EventLog | None = None
        self._audit: AuditLog | None = None

    def now(self) -> float:
        return time.time()

    def read(self, fn: Callable[[Any], T]) -> T:
        with self.spool.read() as txn:
            return fn(txn)

    def write(self, fn: Callable[[Any], T]) -> T:
        with self.spool.env.begin(write=True) as txn:
            return fn(txn)

    def emit(self, event: dict[str, Any]) -> None:
        if self._events is None:
            self._events = EventLog(self.cfg.engine.event_log)
        event.setdefault("by", self.by)
        if self.spool_writable:  # the engine's webhooks and AMQP sinks get it too
            append_now(self.cfg, self.spool, event)
        self._events.emit(event)

    def audit(self, action: str, obj: str, result: str = "ok", **details: Any) -> None:
        if self._audit is None:
            self._audit = AuditLog(self.cfg.engine.audit_log)
        self._audit.record(action_record("cli", self.by, action, obj, result, **details))

    def require_account(self, txn: Any, name: str) -> None:
        """NotFoundError (mta.policy.operations) unless `name` is an account."""
        operations.require_account(self.store, txn, name, operations.configured_accounts(self.cfg))

    def monthly_cap(self, account: str) -> int | None:
        config = self.cfg.account(account)
        if config is None:
            return None
        return monthly_cap(config.subscriber_level, self.cfg.policy.monthly_cap_factor)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        if self._audit is not None:
            self._audit.close()
        self.spool.close()

    def __enter__(self) -> OfflineSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
