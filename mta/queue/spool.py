"""The durable spool: messages, per-destination delivery jobs and their indexes in LMDB.

Layout (named databases in one environment):

- ``msg``  message id -> msgpack record: envelope, account, campaign, bytes.
- ``job``  job id (``<message id>.<n>``) -> one destination domain's recipients
  of a message, with per-recipient state, attempts and next attempt time.
- ``due``  ``be64(next attempt ms) + be16(domain hash) + job id`` -> b"": what is
  due next; the domain hash lets each worker process take its own share of the
  destinations without reading values.
- ``due_t`` the same for the jobs of the transactional lane (mta.queue.lanes): read first.
- ``dom``  ``domain + NUL + job id`` -> b"": the jobs of each destination domain.
  A scheduled message's jobs are first due at its send time (`NewMessage.send_at`).
- ``held`` job id -> reason: jobs kept out of delivery (paused campaign, review).
- ``sending`` job id -> b"": an attempt is under way; found after a crash, it means
  the remote may already have the message (the next delivery is a possible duplicate).
- ``rules`` ``action:scope:value`` -> an operator's suspension or bounce (mta.queue.rules).
- ``rates`` ``account/campaign`` -> a campaign's sending rate (messages/s; mta.queue.rules).
- ``sent`` message id -> [account, campaign, recipients]: kept after delivery, so that
  a late bounce or complaint naming the message is attributed to its campaign.
- ``outbox``, ``outbox_meta``, ``outbox_dead``: events waiting for webhooks and other
  sinks, written in the transaction of the change that caused them (mta.outbox.store).

A message is stored once whatever its number of recipients. The spool knows
nothing of SMTP; every write goes through `apply` so that callers can group
many changes into one transaction (one fsync).
"""

from __future__ import annotations

import os
import random
import struct
import time
import zlib
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from mta.queue.jobs import Job, new_job

DB_NAMES = ("msg", "job", "due", "dom", "held", "sent", "sending", "meta", "rules", "rates",
            "due_t", "outbox", "outbox_meta", "outbox_dead")  # outbox*: mta.outbox.store
_DUE = struct.Struct(">QH")



class SpoolFullError(Exception):
    """The spool or the disk under it has no room; nothing of the write is kept."""


def new_message_id() -> str:
    """Time-ordered, unique across processes: 12 hex digits of ms + 8 random."""
    # random, not os.urandom: no system call per message (the module is seeded afresh
    # from the system in every process, after fork too)
    return f"{int(time.time() * 1000):012X}{random.getrandbits(32):08X}"


def domain_hash(domain: str) -> int:
    return zlib.crc32(domain.encode()) & 0xFFFF


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def due_key(when_ms: int, domain: str, job_id: bytes) -> bytes:
    return _DUE.pack(when_ms, domain_hash(domain)) + job_id


def split_due_key(key: bytes) -> tuple[int, int, bytes]:
    when, dhash = _DUE.unpack_from(key)
    return when, dhash, key[_DUE.size:]


def dom_key(domain: str, job_id: bytes) -> bytes:
    return domain.encode() + b"\0" + job_id


def rcpt_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass
class NewMessage:
    """A message as intake hands it to the spool."""

    sender: str
    recipients: list[str]
    data: bytes
    account: str = ""
    campaign: str = ""
    client: str = ""
    message_id_header: str = ""
    id: str = field(default_factory=new_message_id)
    received: float = field(default_factory=time.time)
    hold: str = ""  # non-empty: keep every job out of delivery with this reason
    send_at: float = 0.0  # scheduled sending (Unix seconds): not attempted before; 0: now
    lane: str = ""  # "transactional" (mta.queue.lanes); "": bulk
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SentOrigin:
    account: str
    campaign: str
    recipients: list[str]
    # recipient domain -> [egress source, provider] that delivered there (mta.egress)
    sources: dict[str, list[str]] = field(default_factory=dict)


class Spool:
    """One LMDB environment; open it in each process after fork, never before."""

    def __init__(self, path: str | os.PathLike[str], map_size: int = 8 * 1024**3,
                 readonly: bool = False) -> None:
        self.path = Path(path)
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / "data.mdb").exists():
            raise FileNotFoundError(f"no spool at {self.path}")
        self.env = lmdb.open(
            str(self.path), map_size=map_size, max_dbs=64, max_readers=512,
            sync=True, metasync=True, writemap=False, readonly=readonly,
            lock=True, readahead=False,
        )
        self.dbs: dict[str, Any] = {}
        for name in DB_NAMES:
            self.open_db(name)

    def open_db(self, name: str, dupsort: bool = False) -> Any:
        """A named database, created when missing (other parts add their own)."""
        if name not in self.dbs:
            if self.env.flags()["readonly"]:
                with self.env.begin() as txn:
                    exists = txn.get(name.encode()) is not None
                self.dbs[name] = self.env.open_db(name.encode(), create=False) if exists else None
            else:  # in a transaction of its own: a bare env.open_db waits for the write
                # lock holding the GIL, a deadlock with this process's writer thread
                with self.env.begin(write=True) as txn:
                    self.dbs[name] = self.env.open_db(name.encode(), txn=txn,
                                                      dupsort=dupsort)
        return self.dbs[name]

    def close(self) -> None:
        self.env.close()

    # --- writes -----------------------------------------------------------

    def apply(self, operations: list[Callable[[Any], Any]]) -> list[Any]:
        """Run write operations in one transaction (one fsync); returns each one's result.

        When the batch as a whole does not fit, each operation is retried in its own
        transaction so that one large message does not fail the others. A result is
        the operation's return value or the exception it raised.
        """
        try:
            return self.apply_taken(lambda: operations)
        except Exception as exc:  # no transaction could begin
            return [_as_full(exc)] * len(operations)

    def apply_taken(self, take: Callable[[], list[Callable[[Any], Any]]]) -> list[Any]:
        """`apply` to the operations `take()` returns, called once the write lock is held:
        what was queued while this waited for the lock (every worker's commits share it)
        goes in this commit, not the next. Raises only if no transaction could begin,
        before `take` was called."""
        operations: list[Callable[[Any], Any]] | None = None
        try:
            with self.env.begin(write=True) as txn:
                operations = take()
                return [op(txn) for op in operations]
        except Exception as exc:
            if operations is None:
                raise
            if len(operations) == 1:
                return [_as_full(exc)]
        results: list[Any] = []
        for op in operations:
            try:
                with self.env.begin(write=True) as txn:
                    result = op(txn)
            except Exception as exc:  # the op, or its commit (a full map) failed
                result = _as_full(exc)
            results.append(result)  # one result per op, whichever step failed
        return results

    def secret(self, name: str) -> bytes:
        """A random key kept in the spool, made on first use: every worker, and every run
        on this spool, gets the same one."""
        key = b"secret:" + name.encode()
        with self.env.begin(db=self.dbs["meta"]) as txn:
            found = txn.get(key)
        if found:
            return bytes(found)  # no write transaction (and no fsync) once it exists

        def get_or_make(txn: Any) -> bytes:  # another worker may have made it meanwhile
            found = txn.get(key, db=self.dbs["meta"])
            if found:
                return bytes(found)
            made = os.urandom(32)
            txn.put(key, made, db=self.dbs["meta"])
            return made

        [result] = self.apply([get_or_make])
        if isinstance(result, BaseException):
            raise result
        return result

    def store_op(self, message: NewMessage) -> Callable[[Any], str]:
        """An operation that stores a message and its delivery jobs."""
        store = self.store_many_op([message])
        return lambda txn: store(txn)[0]

    def store_many_op(self, messages: list[NewMessage]) -> Callable[[Any], list[str]]:
        """An operation that stores several messages: all of them or, if it fails, none.
        Their records are packed now, before the transaction: the write lock (one for
        every worker on the spool) is then held only to put them."""
        records = [self._message_records(message) for message in messages]

        def store(txn: Any) -> list[str]:
            for each in records:
                self._put_message_records(txn, each)
            return [m.id for m in messages]

        return store

    def put_message(self, txn: Any, m: NewMessage) -> None:
        self._put_message_records(txn, self._message_records(m))

    def _message_records(self, m: NewMessage) -> list[tuple[Any, bytes, bytes]]:
        """(database, key, value) of everything that stores `m`, the message first."""
        by_domain: dict[str, list[str]] = {}
        for rcpt in m.recipients:
            by_domain.setdefault(rcpt_domain(rcpt), []).append(rcpt)
        mid = m.id.encode()
        record = {
            "id": m.id, "from": m.sender, "rcpts": m.recipients, "account": m.account,
            "campaign": m.campaign, "received": m.received, "client": m.client,
            "msgid": m.message_id_header, "size": len(m.data), "data": m.data,
            "jobs": len(by_domain), **m.extra,
        }
        if m.send_at > m.received:
            record["send_at"] = m.send_at
        if m.lane:
            record["lane"] = m.lane
        records = [(self.dbs["msg"], mid, pack(record))]
        if m.account or m.campaign:
            records.append((self.dbs["sent"], mid, pack([m.account, m.campaign, m.recipients])))
        now_ms = int(m.received * 1000)
        for n, (domain, rcpts) in enumerate(by_domain.items()):
            job = new_job(b"%s.%d" % (mid, n), m.id, domain, m.account, m.campaign, rcpts,
                          now_ms, int(m.send_at * 1000), m.lane)
            records += self._job_records(job, m.hold)
        return records

    @staticmethod
    def _put_message_records(txn: Any, records: list[tuple[Any, bytes, bytes]]) -> None:
        db, mid, value = records[0]
        if not txn.put(mid, value, db=db, overwrite=False):
            raise ValueError(f"message {mid.decode()} already in the spool")
        for db, key, value in records[1:]:
            txn.put(key, value, db=db)

    # Job state changes: called only by mta.queue (the scheduler and mta.queue.jobs).

    def put_job(self, txn: Any, job: Job, hold: str = "") -> None:
        """Write a new job and index it as due (or held)."""
        for db, key, value in self._job_records(job, hold):
            txn.put(key, value, db=db)

    def _job_records(self, job: Job, hold: str) -> list[tuple[Any, bytes, bytes]]:
        job.held = hold
        index = (self.dbs["held"], job.id, hold.encode()) if hold else (
            self._due_db(job), due_key(job.next_ms, job.domain, job.id), b"")
        return [(self.dbs["job"], job.id, pack(job.to_record())),
                (self.dbs["dom"], dom_key(job.domain, job.id), b""), index]

    def _due_db(self, job: Job) -> Any:
        """The due index of the job's lane."""
        return self.dbs["due_t"] if job.lane else self.dbs["due"]

    def _write(self, txn: Any, job: Job) -> None:
        txn.put(job.id, pack(job.to_record()), db=self.dbs["job"])

    def mark_sending(self, txn: Any, job_ids: list[bytes]) -> None:
        """An attempt starts: found after a crash, the marker flags a possible duplicate."""
        for job_id in job_ids:
            txn.put(job_id, b"", db=self.dbs["sending"])

    def is_sending(self, txn: Any, job_id: bytes) -> bool:
        return txn.get(job_id, db=self.dbs["sending"]) is not None

    def save_attempt(self, txn: Any, job: Job, old_next_ms: int) -> None:
        """Write a job after an attempt (or a postponement): due at job.next_ms."""
        txn.delete(job.id, db=self.dbs["sending"])
        txn.delete(due_key(old_next_ms, job.domain, job.id), db=self._due_db(job))
        self._write(txn, job)
        txn.put(due_key(job.next_ms, job.domain, job.id), b"", db=self._due_db(job))

    def remove_job(self, txn: Any, job: Job) -> bool:
        """Delete a finished job; deletes its message when it was the last. True if so."""
        job_id = job.id
        txn.delete(due_key(job.next_ms, job.domain, job_id), db=self._due_db(job))
        txn.delete(dom_key(job.domain, job_id), db=self.dbs["dom"])
        txn.delete(job_id, db=self.dbs["held"])
        txn.delete(job_id, db=self.dbs["sending"])
        txn.delete(job_id, db=self.dbs["job"])
        mid = job.msg.encode()
        cursor = txn.cursor(db=self.dbs["job"])
        prefix = mid + b"."
        if cursor.set_range(prefix) and cursor.key().startswith(prefix):
            return False
        txn.delete(mid, db=self.dbs["msg"])
        return True

    def hold_job(self, txn: Any, job: Job, reason: str) -> None:
        """Take a job out of delivery (a paused campaign, a review). An attempt that was
        under way is over: the job is not a possible duplicate when it is released."""
        txn.delete(due_key(job.next_ms, job.domain, job.id), db=self._due_db(job))
        txn.delete(job.id, db=self.dbs["sending"])
        job.held = reason
        self._write(txn, job)
        txn.put(job.id, reason.encode(), db=self.dbs["held"])

    def release_job(self, txn: Any, job: Job, when_ms: int) -> None:
        """Put a held job back in delivery, due at when_ms (or at its send time, if later)."""
        txn.delete(job.id, db=self.dbs["held"])
        txn.delete(job.id, db=self.dbs["sending"])
        job.held = ""
        job.next_ms = max(when_ms, job.not_before_ms)
        self._write(txn, job)
        txn.put(due_key(job.next_ms, job.domain, job.id), b"", db=self._due_db(job))

    # --- reads ------------------------------------------------------------

    def read(self) -> Any:
        return self.env.begin(buffers=False)

    def get_job(self, txn: Any, job_id: bytes) -> Job | None:
        raw = txn.get(job_id, db=self.dbs["job"])
        return None if raw is None else Job.from_record(job_id, unpack(raw))

    def get_message(self, txn: Any, message_id: str) -> dict[str, Any] | None:
        raw = txn.get(message_id.encode(), db=self.dbs["msg"])
        return None if raw is None else unpack(raw)

    def sent_origin(self, txn: Any, message_id: str) -> SentOrigin | None:
        """Account, campaign and recipients of a message accepted earlier, even if long
        delivered (records from before recipients were kept have none)."""
        db = self.dbs.get("sent")
        raw = None if db is None else txn.get(message_id.encode(), db=db)
        if raw is None:
            return None
        account, campaign, *rest = unpack(raw)
        return SentOrigin(account, campaign, rest[0] if rest else [],
                          rest[1] if len(rest) > 1 and isinstance(rest[1], dict) else {})

    def note_sent_source(self, txn: Any, message_id: str, domain: str, source: str,
                         provider: str) -> None:
        """Record in a message's `sent` record the egress source (and provider) that
        delivered its mail for `domain` (SentOrigin.sources); no record, nothing."""
        db = self.dbs.get("sent")
        raw = None if db is None else txn.get(message_id.encode(), db=db)
        if raw is None:
            return
        record = unpack(raw)
        while len(record) < 4:  # older records: no recipients, no sources yet
            record.append([] if len(record) == 2 else {})
        record[3][domain] = [source, provider]
        txn.put(message_id.encode(), pack(record), db=db)

    def due(self, txn: Any, now_ms: int, start: bytes = b"",
            share: tuple[int, int] | None = None, transactional: bool = False,
            skip: Container[bytes] = ()) -> Iterator[tuple[bytes, int, bytes]]:
        """(due key, due ms, job id) for jobs due at or before now_ms, from `start` on (of
        the transactional lane's index, or the bulk one's); with `share` (index, of) only
        those whose domain hash modulo `of` is `index`; none whose job id is in `skip`.
        A scheduler passes over its jobs in flight and another worker's here, in one
        tight loop: a scan walks tens of them for every job it takes."""
        db = self.dbs["due_t" if transactional else "due"]
        if db is None:
            return
        cursor = txn.cursor(db=db)
        if not cursor.set_range(start):
            return
        index, of = share or (0, 1)
        read, size = _DUE.unpack_from, _DUE.size
        for key in cursor.iternext(keys=True, values=False):
            when, dhash = read(key)
            if when > now_ms:
                return
            if dhash % of == index:
                job_id = key[size:]
                if job_id not in skip:
                    yield key, when, job_id

    def next_due_ms(self, txn: Any) -> int | None:
        found = []
        for name in ("due_t", "due"):
            if self.dbs.get(name) is not None:
                cursor = txn.cursor(db=self.dbs[name])
                if cursor.first():
                    found.append(split_due_key(cursor.key())[0])
        return min(found, default=None)

    def jobs(self, txn: Any, prefix: bytes = b"") -> Iterator[Job]:
        """Every job (whose id starts with `prefix`)."""
        db = self.dbs["job"]
        if db is None:
            return
        cursor = txn.cursor(db=db)
        if not cursor.set_range(prefix):
            return
        for key, raw in cursor:
            if not key.startswith(prefix):
                return
            yield Job.from_record(bytes(key), unpack(raw))

    def scan_jobs(self, txn: Any, names: list[str]) -> Iterator[Job]:
        """Jobs whose record contains every one of `names` (an account, a campaign): only
        those are unpacked, so a scan over many jobs stays cheap."""
        needles = [pack(name) for name in names]
        for key, raw in txn.cursor(db=self.dbs["job"]):
            raw = bytes(raw)
            if all(n in raw for n in needles):
                yield Job.from_record(bytes(key), unpack(raw))

    def messages(self, txn: Any) -> Iterator[dict[str, Any]]:
        for _, raw in txn.cursor(db=self.dbs["msg"]):
            yield unpack(raw)

    def count(self, name: str) -> int:
        db = self.dbs.get(name)
        if db is None:
            return 0
        with self.env.begin() as txn:
            return txn.stat(db)["entries"]

    def usage(self) -> tuple[int, int]:
        """(bytes in use inside the map, map size). Pages freed by deletions count as free
        (LMDB reuses them), so intake resumes by itself when delivered mail leaves."""
        stat = self.env.stat()
        kinds = ("branch_pages", "leaf_pages", "overflow_pages")
        pages = sum(stat[k] for k in kinds)
        with self.env.begin() as txn:
            for db in self.dbs.values():
                if db is not None:
                    db_stat = txn.stat(db)
                    pages += sum(db_stat[k] for k in kinds)
        return pages * stat["psize"], self.env.info()["map_size"]


def _as_full(exc: BaseException) -> BaseException:
    if isinstance(exc, lmdb.MapFullError) or (
        isinstance(exc, (OSError, lmdb.DiskError)) and "space" in str(exc).lower()
    ):
        return SpoolFullError(str(exc))
    return exc

