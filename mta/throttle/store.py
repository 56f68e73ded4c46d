"""Throttle snapshots in the spool's LMDB environment, for `mta throttle status`.

Named database "throttle": key = the worker index (4 bytes, big endian), value = msgpack
of {"worker", "saved" (wall time), "rows"}. Each worker writes its own key about once a
second; the CLI reads them all from another process.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

import lmdb
import msgpack

DB_NAME = b"throttle"
_KEY = struct.Struct(">I")


def snapshot_op(env: lmdb.Environment, worker: int, rows: list[dict[str, Any]],
                now: float | None = None) -> Callable[[Any], None]:
    """A write operation for `Spool.apply`, to fold the snapshot into a group commit."""
    value = msgpack.packb({"worker": worker, "saved": time.time() if now is None else now,
                           "rows": rows}, use_bin_type=True)

    def put(txn: Any) -> None:
        db = env.open_db(DB_NAME, txn=txn)
        txn.put(_KEY.pack(worker), value, db=db)

    return put


def save_snapshot(env: lmdb.Environment, worker: int, rows: list[dict[str, Any]],
                  now: float | None = None) -> None:
    """Replace worker `worker`'s snapshot (one write transaction)."""
    with env.begin(write=True) as txn:
        snapshot_op(env, worker, rows, now)(txn)


def clear_snapshots(env: lmdb.Environment) -> None:
    """Drop every worker's snapshot (the engine calls this at start)."""
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(DB_NAME, txn=txn), delete=False)


def load_snapshots(env: lmdb.Environment, db: Any = None) -> list[dict[str, Any]]:
    """Every worker's rows, each with "worker" and "saved"; [] when none were saved.
    In a running engine pass `db`, the handle its spool keeps (mta.queue.spool.Spool
    .open_db): opening one here takes the write lock (only for the CLI's own env)."""
    if db is None:
        with env.begin() as txn:
            if txn.get(DB_NAME) is None:
                return []
        db = env.open_db(DB_NAME, create=False)
    rows: list[dict[str, Any]] = []
    with env.begin(db=db) as txn:
        for _, raw in txn.cursor():
            snap = msgpack.unpackb(raw, raw=False)
            for row in snap["rows"]:
                rows.append({**row, "worker": snap["worker"], "saved": snap["saved"]})
    return rows
