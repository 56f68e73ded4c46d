"""The outbox: events waiting for their sinks, in the spool's LMDB (plain functions on a txn).

Layout (named databases of the spool's environment, see mta.queue.spool.DB_NAMES):

- ``outbox``      ``be64(seq)`` -> msgpack ``[only, event JSON]`` (bytes; str in older
  entries): every event in the order it was committed; ``only`` is "" (every sink) or
  the one sink a replayed dead letter is for.
- ``outbox_meta`` ``b"seq"`` -> ``be64``: the next sequence number (never reused, so a sink's
  cursor stays valid when the outbox is empty); ``b"cursor:" + name`` -> ``be64``: the
  last sequence number that sink has passed (delivered, filtered out or dead-lettered).
- ``outbox_dead`` ``name + NUL + be64(seq)`` -> msgpack ``[reason, failed at, event JSON]``:
  a sink's dead letters, kept until an operator replays them (`mta webhook replay`).

An entry leaves the outbox (`prune`) once every configured sink's cursor has passed it.
Sequence numbers are taken inside the write transaction, and LMDB has one writer at a
time across processes, so the order of the outbox is the commit order.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from mta.outbox import codec

OUTBOX_DBS = ("outbox", "outbox_meta", "outbox_dead")
SCHEMA_VERSION = 1
SEQ = struct.Struct(">Q")
SEQ_KEY = b"seq"
PRUNE_BATCH = 2000  # entries deleted per transaction at most (the writer is shared)


@dataclass(frozen=True)
class Entry:
    seq: int
    event: dict[str, Any]
    only: str = ""  # "": for every sink; else the one sink it is replayed to

    def for_sink(self, name: str) -> bool:
        return not self.only or self.only == name


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    reason: str
    failed_at: float
    event: dict[str, Any]


_random = random.Random(os.urandom(16))  # seeded per process: no system call per event
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(16)))  # workers differ


def new_event_id(now: float | None = None) -> str:
    """Unique across processes and restarts, time-ordered: 12 hex digits of ms + 12 random."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{_random.getrandbits(48):012x}"


def outbox_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event as sinks get it: the event log's fields, its own `id`, the `schema`
    version; the log's `id` (the message's id) is `message_id` here."""
    out = {k: v for k, v in event.items() if k not in ("id", "event_id")}
    if "id" in event:
        out["message_id"] = event["id"]
    out["id"] = event["event_id"]
    out["schema"] = SCHEMA_VERSION
    return out


def stamp(event: dict[str, Any], worker: int | None) -> dict[str, Any]:
    """Give a log event its outbox id, time and worker (None: not a worker's, the CLI's)."""
    event.setdefault("event_id", new_event_id())
    event.setdefault("time", round(time.time(), 3))
    if worker is not None:
        event.setdefault("worker", worker)
    return event


def _dbs(spool: Any) -> tuple[Any, Any, Any]:
    return spool.dbs["outbox"], spool.dbs["outbox_meta"], spool.dbs["outbox_dead"]


def _encode(event: dict[str, Any], only: str = "") -> bytes:
    return msgpack.packb([only, codec.encode(event)])


def _decode(seq: int, raw: bytes) -> Entry:
    only, text = msgpack.unpackb(raw, raw=False)
    return Entry(seq, codec.decode(text), only)


# --- writes (inside the caller's write transaction) --------------------------------------

def append(spool: Any, txn: Any, events: Iterable[dict[str, Any]], only: str = "") -> int:
    """Add events (already in their outbox form) at the end; the last seq, or 0."""
    box, meta, _ = _dbs(spool)
    raw = txn.get(SEQ_KEY, db=meta)
    seq = SEQ.unpack(raw)[0] if raw else 1
    last = 0
    for event in events:
        txn.put(SEQ.pack(seq), _encode(event, only), db=box, append=True)
        last, seq = seq, seq + 1
    if last:
        txn.put(SEQ_KEY, SEQ.pack(seq), db=meta)
    return last


def set_cursor(spool: Any, txn: Any, name: str, seq: int) -> None:
    _, meta, _ = _dbs(spool)
    if seq > cursor(spool, txn, name):
        txn.put(b"cursor:" + name.encode(), SEQ.pack(seq), db=meta)


def prune(spool: Any, txn: Any, names: Iterable[str], limit: int = PRUNE_BATCH) -> int:
    """Delete entries every sink in `names` has passed (at most `limit`); how many."""
    names = list(names)
    if not names:
        return 0
    upto = min(cursor(spool, txn, name) for name in names)
    box = _dbs(spool)[0]
    deleted = 0
    cur = txn.cursor(db=box)
    while deleted < limit and cur.first() and SEQ.unpack(cur.key())[0] <= upto:
        cur.delete()
        deleted += 1
    return deleted


def add_dead(spool: Any, txn: Any, name: str, entries: list[Entry], reason: str,
             now: float) -> None:
    dead = _dbs(spool)[2]
    for entry in entries:
        value = msgpack.packb([reason[:500], now, codec.encode(entry.event)])
        txn.put(dead_key(name, entry.seq), value, db=dead)


def replay(spool: Any, txn: Any, name: str) -> int:
    """Move a sink's dead letters back into the outbox, for that sink only, with their
    ids unchanged (the receiver may deduplicate); how many."""
    dead = _dbs(spool)[2]
    prefix = name.encode() + b"\0"
    cur = txn.cursor(db=dead)
    events = []
    if cur.set_range(prefix):
        while cur.key().startswith(prefix):
            events.append(codec.decode(msgpack.unpackb(cur.value(), raw=False)[2]))
            if not cur.delete():
                break
    append(spool, txn, events, only=name)
    return len(events)


def dead_key(name: str, seq: int) -> bytes:
    return name.encode() + b"\0" + SEQ.pack(seq)


# --- reads ---------------------------------------------------------------------------------

def cursor(spool: Any, txn: Any, name: str) -> int:
    meta = _dbs(spool)[1]
    if meta is None:
        return 0
    raw = txn.get(b"cursor:" + name.encode(), db=meta)
    return SEQ.unpack(raw)[0] if raw else 0


def read_after(spool: Any, txn: Any, after: int, limit: int) -> list[Entry]:
    """Up to `limit` entries with seq > after, in order."""
    box = _dbs(spool)[0]
    if box is None:
        return []
    cur = txn.cursor(db=box)
    found: list[Entry] = []
    if not cur.set_range(SEQ.pack(after + 1)):
        return found
    for key, raw in cur:
        found.append(_decode(SEQ.unpack(key)[0], raw))
        if len(found) >= limit:
            break
    return found


def dead_letters(spool: Any, txn: Any, name: str, limit: int = 1000) -> list[DeadLetter]:
    dead = _dbs(spool)[2]
    if dead is None:
        return []
    prefix = name.encode() + b"\0"
    cur = txn.cursor(db=dead)
    found: list[DeadLetter] = []
    if not cur.set_range(prefix):
        return found
    for key, raw in cur:
        if not key.startswith(prefix) or len(found) >= limit:
            break
        reason, failed_at, text = msgpack.unpackb(raw, raw=False)
        found.append(DeadLetter(SEQ.unpack(key[len(prefix):])[0], reason, failed_at,
                                codec.decode(text)))
    return found


def dead_count(spool: Any, txn: Any, name: str) -> int:
    dead = _dbs(spool)[2]
    if dead is None:
        return 0
    prefix = name.encode() + b"\0"
    cur = txn.cursor(db=dead)
    count = 0
    if cur.set_range(prefix):
        for key in cur.iternext(keys=True, values=False):
            if not key.startswith(prefix):
                break
            count += 1
    return count


@dataclass(frozen=True)
class OutboxFigures:
    depth: int  # entries in the outbox
    oldest_age: float  # seconds since the oldest entry's event time; 0 when empty
    last_seq: int  # the last sequence number given


def figures(spool: Any, txn: Any, now: float) -> OutboxFigures:
    box, meta = _dbs(spool)[:2]
    if box is None:
        return OutboxFigures(0, 0.0, 0)
    depth = txn.stat(box)["entries"]
    oldest = 0.0
    cur = txn.cursor(db=box)
    if cur.first():
        event_time = _decode(0, cur.value()).event.get("time")
        if isinstance(event_time, int | float):
            oldest = max(0.0, now - float(event_time))
    raw = txn.get(SEQ_KEY, db=meta)
    return OutboxFigures(depth, round(oldest, 3), (SEQ.unpack(raw)[0] - 1) if raw else 0)


def pending_for(spool: Any, txn: Any, name: str, last_seq: int) -> int:
    """Entries after a sink's cursor (an upper bound of what it still has to pass)."""
    return max(0, last_seq - cursor(spool, txn, name))
