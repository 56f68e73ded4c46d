"""What the TLS policy keeps in the spool's LMDB environment: MTA-STS policies (until
their max_age, for every worker and across restarts) and the TLS-RPT session counts
per day and policy. Reads open their own read transaction; writes are operations for
the group committer (`GroupCommitter.submit(op)`), or `Spool.apply` from a command.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from mta.delivery.tls.mtasts import StsPolicy
from mta.delivery.tls.report import PolicyCounts

STS_DB = "mta_sts"
REPORT_DB = "tlsrpt"
Operation = Callable[[Any], Any]


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


class TlsStore:
    """The two named databases of a spool (`spool.open_db`)."""

    def __init__(self, spool: Any) -> None:
        self.spool = spool
        self.env = spool.env
        self.sts_db = spool.open_db(STS_DB)
        self.report_db = spool.open_db(REPORT_DB)

    # --- MTA-STS policies ------------------------------------------------------

    def sts_policy(self, domain: str) -> StsPolicy | None:
        if self.sts_db is None:  # a read-only spool that never had one
            return None
        with self.env.begin(db=self.sts_db) as txn:
            raw = txn.get(domain.encode())
        if raw is None:
            return None
        try:
            return StsPolicy.from_record(_unpack(raw))
        except (KeyError, TypeError, ValueError):
            return None

    def put_sts_op(self, policy: StsPolicy) -> Operation:
        key, value, db = policy.domain.encode(), _pack(policy.to_record()), self.sts_db

        def put(txn: Any) -> None:
            txn.put(key, value, db=db)

        return put

    # --- TLS-RPT counts ---------------------------------------------------------

    @staticmethod
    def report_key(day: str, domain: str, digest: str) -> bytes:
        return f"{day}\0{domain}\0{digest}".encode()

    def add_counts_op(self, counts: dict[tuple[str, str, str], PolicyCounts]) -> Operation:
        """Merge counts (keyed by day, policy domain, policy digest) into the stored ones."""
        items = [(self.report_key(*key), value) for key, value in counts.items()]
        db = self.report_db

        def merge(txn: Any) -> None:
            for key, value in items:
                raw = txn.get(key, db=db)
                if raw is not None:
                    stored = PolicyCounts.from_record(_unpack(raw))
                    stored.merge(value)
                    value = stored
                txn.put(key, _pack(value.to_record()), db=db)

        return merge

    def days(self) -> list[str]:
        return sorted({day for day, _, _ in self._keys()})

    def _keys(self) -> Iterator[tuple[str, str, str]]:
        if self.report_db is None:
            return
        with self.env.begin(db=self.report_db) as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                day, domain, digest = bytes(key).decode().split("\0")
                yield day, domain, digest

    def day_counts(self, day: str) -> dict[str, list[PolicyCounts]]:
        """Every policy domain's counts of `day`."""
        found: dict[str, list[PolicyCounts]] = {}
        if self.report_db is None:
            return found
        prefix = f"{day}\0".encode()
        with self.env.begin(db=self.report_db) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, raw in cursor:
                    if not bytes(key).startswith(prefix):
                        break
                    counts = PolicyCounts.from_record(_unpack(raw))
                    found.setdefault(counts.scope.domain, []).append(counts)
        return found

    def drop_op(self, day: str, domain: str) -> Operation:
        """Forget a domain's counts of a day (its report went out, or never will)."""
        prefix = f"{day}\0{domain}\0".encode()
        db = self.report_db

        def drop(txn: Any) -> None:
            cursor = txn.cursor(db=db)
            keys = []
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if not bytes(key).startswith(prefix):
                        break
                    keys.append(bytes(key))
            for key in keys:
                txn.delete(key, db=db)

        return drop
