"""The shared policy state's plain parts: what goes to Redis, how it merges back.

Two shared tables hold what every node must honour: ``state`` (campaign and account
states, by their `policy.state` key) and ``supp`` (suppression entries, by their
`policy.supp` key; an empty value is a removal). Every record carries a version, the
time of the change (`at`); the newer version wins everywhere (last writer wins), in
Redis (the PUT script) and in each node's LMDB (`merge_op`). A log sorted set numbers
the changes so each node pulls only what changed since its cursor.

Counters are hashes added to atomically (the ADD script, once per batch id); trial and
monthly limits are reserved with a check-and-increment (the RESERVE script).

The transaction-level functions run in the spool writer (group committer); the rest
is plain logic tested without sockets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mta.policy.ledger import Applied, Batch
from mta.policy.model import (
    ACTIVE,
    COUNTER_FIELDS,
    DROPPED,
    PAUSED,
    Counters,
    account_hold,
    campaign_hold,
)
from mta.policy.store import (
    STATE_REF,
    SUPP_REF,
    PolicyStore,
    account_key,
    month_key,
    split_pair,
)
from mta.queue import jobs
from mta.queue.spool import unpack

TABLES = {"state": STATE_REF, "supp": SUPP_REF}
TOMBSTONE = b""

# KEYS: data hash, version hash, log zset, sequence; ARGV: field, value, version, ...
# Writes each record newer than Redis's; returns the rejected ones as Redis has them.
PUT = """
local rejected = {}
for i = 1, #ARGV, 3 do
  local f, v = ARGV[i], tonumber(ARGV[i + 2])
  local cur = redis.call('HGET', KEYS[2], f)
  if cur and tonumber(cur) >= v then
    rejected[#rejected + 1] = f
    rejected[#rejected + 1] = redis.call('HGET', KEYS[1], f) or ''
    rejected[#rejected + 1] = cur
  else
    redis.call('HSET', KEYS[1], f, ARGV[i + 1])
    redis.call('HSET', KEYS[2], f, ARGV[i + 2])
    redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[4]), f)
  end
end
return rejected
"""

# KEYS: data hash, version hash, log zset; ARGV: cursor (exclusive), limit.
# Returns field, sequence, value, version for each change after the cursor.
PULL = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf', 'WITHSCORES',
                       'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for i = 1, #ids, 2 do
  out[#out + 1] = ids[i]
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], ids[i]) or ''
  out[#out + 1] = redis.call('HGET', KEYS[2], ids[i]) or '0'
end
return out
"""

# KEYS: the batch's done marker, then counter hashes; ARGV: ttl, then per hash:
# field count, field, increment, ... Adds once per batch id; returns every hash.
ADD = """
local fresh = redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1]))
local at = 2
local totals = {}
for k = 2, #KEYS do
  local n = tonumber(ARGV[at])
  for j = 1, n do
    if fresh then
      redis.call('HINCRBY', KEYS[k], ARGV[at + 2 * j - 1], tonumber(ARGV[at + 2 * j]))
    end
  end
  at = at + 1 + 2 * n
  totals[#totals + 1] = redis.call('HGETALL', KEYS[k])
end
return totals
"""

# KEYS: the account's all-time and monthly counter hashes; ARGV: count, trial limit,
# monthly cap (-1: none). Counts the submission only if both limits hold; returns
# {1 or 0, all-time submitted, monthly submitted} as they were before.
RESERVE = """
local n = tonumber(ARGV[1])
local total = tonumber(redis.call('HGET', KEYS[1], 'submitted') or '0')
local month = tonumber(redis.call('HGET', KEYS[2], 'submitted') or '0')
local trial, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
if (trial >= 0 and total + n > trial) or (cap >= 0 and month + n > cap) then
  return {0, total, month}
end
redis.call('HINCRBY', KEYS[1], 'submitted', n)
redis.call('HINCRBY', KEYS[2], 'submitted', n)
return {1, total, month}
"""


@dataclass(frozen=True)
class Record:
    """One shared record: `table` state | supp, its LMDB key, msgpack value, version."""

    table: str
    key: bytes
    value: bytes
    version: float

    @property
    def ref(self) -> bytes:
        return TABLES[self.table] + self.key


def newer(remote: float, local: float | None) -> bool:
    """Last writer wins: a remote version replaces a local one only if strictly newer."""
    return local is None or remote > local


def version_of(value: bytes | None) -> float | None:
    """The version (`at`) of a stored state or suppression; None when absent."""
    if not value:
        return None
    return float(unpack(value).get("at") or 0.0)


# --- counters ---------------------------------------------------------------------

def shared_deltas(batch: Batch, applied: Applied) -> dict[bytes, Counters]:
    """What a counted batch adds to the cluster's totals: everything, except submissions
    a Redis reservation counted already (their account and month counters)."""
    deltas = {key: Counters.from_dict(c.as_dict()) for key, c in applied.deltas.items()}
    for s in batch.submissions:
        if s.shared:
            for key in (account_key(s.account), month_key(s.account, s.month)):
                if key in deltas:
                    deltas[key].submitted -= s.count
    return {k: d for k, d in deltas.items() if any(getattr(d, n) for n in COUNTER_FIELDS)}


def merge_deltas(into: dict[bytes, Counters], more: dict[bytes, Counters]) -> None:
    for key, delta in more.items():
        into.setdefault(key, Counters()).add(delta)


def add_args(ttl: int, deltas: dict[bytes, Counters]) -> list[Any]:
    """ARGV of the ADD script for `deltas` (in the order of their keys)."""
    args: list[Any] = [ttl]
    for delta in deltas.values():
        fields = [(n, getattr(delta, n)) for n in COUNTER_FIELDS if getattr(delta, n)]
        args.append(len(fields))
        for name, value in fields:
            args += [name, value]
    return args


def parse_hash(flat: list[Any]) -> Counters:
    """Counters from a flat HGETALL reply [field, value, ...]."""
    pairs = {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
    return Counters.from_dict(pairs)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def plus(*parts: Counters | None) -> Counters:
    total = Counters()
    for part in parts:
        if part is not None:
            total.add(part)
    return total


@dataclass
class LocalShare:
    """While Redis is unreachable: this worker's share of what an account may still send
    (what was left when last known, divided by the workers then alive on all nodes)."""

    trial_left: int | None
    month_left: int | None
    used: int = 0

    @classmethod
    def split(cls, limits: tuple[int | None, int | None], known: tuple[int, int],
              workers: int) -> LocalShare:
        trial, cap = limits
        workers = max(1, workers)
        return cls(None if trial is None else max(0, trial - known[0]) // workers,
                   None if cap is None else max(0, cap - known[1]) // workers)

    def view(self, limits: tuple[int | None, int | None]) -> tuple[int, int]:
        """(all-time, monthly) figures that put this share's end at the account's limits."""
        trial, cap = limits
        return (0 if trial is None or self.trial_left is None
                else trial - self.trial_left + self.used,
                0 if cap is None or self.month_left is None else cap - self.month_left + self.used)


# --- the journal of local changes ---------------------------------------------------

@dataclass
class Outgoing:
    """Journal entries read for publishing: the records, and the journal keys to clear."""

    records: list[Record] = field(default_factory=list)
    journal_keys: list[bytes] = field(default_factory=list)


def read_journal(store: PolicyStore, txn: Any, limit: int) -> Outgoing:
    """The records changed on this node (their current value; a removal when gone)."""
    out = Outgoing()
    if store.journal is None:
        return out
    seen: set[bytes] = set()
    for jkey, _ in txn.cursor(db=store.journal):
        if len(out.journal_keys) >= limit:
            break
        out.journal_keys.append(bytes(jkey))
        ref = bytes(jkey[8:])
        if ref not in seen:
            seen.add(ref)
            record = current(store, txn, ref, int.from_bytes(jkey[:8], "big") / 1e9)
            if record is not None:
                out.records.append(record)
    return out


def current(store: PolicyStore, txn: Any, ref: bytes, changed_at: float) -> Record | None:
    key = ref[1:]
    if ref[:1] == STATE_REF:
        raw = txn.get(key, db=store.state) if store.state is not None else None
        return Record("state", key, bytes(raw), version_of(raw) or 0.0) if raw else None
    raw = txn.get(key, db=store.supp) if store.supp is not None else None
    if raw is None:
        return Record("supp", key, TOMBSTONE, changed_at)
    return Record("supp", key, bytes(raw), version_of(raw) or 0.0)


def clear_journal(store: PolicyStore, txn: Any, keys: Iterable[bytes]) -> None:
    for key in keys:
        txn.delete(key, db=store.journal)


def journal_everything(store: PolicyStore, txn: Any) -> int:
    """Journal every state and suppression (Redis came back empty: publish it all again)."""
    count = 0
    for key, _ in list(txn.cursor(db=store.state)):
        store.note(txn, STATE_REF + bytes(key))
        count += 1
    for key, _ in list(txn.cursor(db=store.supp)):
        store.note(txn, SUPP_REF + bytes(key))
        count += 1
    return count


def all_counters(store: PolicyStore, txn: Any) -> dict[bytes, Counters]:
    """This node's own counters, every key (Redis came back empty: add them again)."""
    return {bytes(k): Counters.from_dict(unpack(v)) for k, v in txn.cursor(db=store.count)}


def pending_refs(store: PolicyStore, txn: Any) -> set[bytes]:
    if store.journal is None:
        return set()
    return {bytes(k[8:]) for k, _ in txn.cursor(db=store.journal)}


# --- merging what other nodes changed ---------------------------------------------------

@dataclass(frozen=True)
class Change:
    """A shared change applied to this node: what, its new status, jobs held or released."""

    kind: str  # campaign | account | suppression
    name: str
    status: str
    jobs: int = 0


def merge_op(store: PolicyStore, records: list[Record], now_ms: int) -> Any:
    """A writer operation applying the records newer than this node's copies; a record
    with a local change not published yet waits for it (the newer of the two wins in
    Redis, and the loser comes back with the next pull)."""

    def merge(txn: Any) -> list[Change]:
        pending = pending_refs(store, txn)
        changes = []
        for record in records:
            if record.ref in pending:
                continue
            change = (merge_state(store, txn, record, now_ms) if record.table == "state"
                      else merge_suppression(store, txn, record))
            if change is not None:
                changes.append(change)
        return changes

    return merge


def merge_state(store: PolicyStore, txn: Any, record: Record, now_ms: int) -> Change | None:
    old = store.get_state(txn, record.key)
    local = float(old.get("at") or 0.0) if old is not None else None
    if not record.value or not newer(record.version, local):
        return None
    new = unpack(record.value)
    store.put_state(txn, record.key, new, note=False)
    was, status = (old or {}).get("status", ACTIVE), new.get("status", ACTIVE)
    if record.key.startswith(b"C"):
        account, campaign = split_pair(record.key)
        moved = follow_campaign(store, txn, account, campaign, was, status, now_ms)
        return Change("campaign", f"{account}/{campaign}", status, moved)
    account = record.key[1:].decode("utf-8", "replace")
    return Change("account", account, status, follow_account(store, txn, account, was,
                                                             status, now_ms))


def stopped(status: str) -> bool:
    return status in (PAUSED, DROPPED)


def follow_campaign(store: PolicyStore, txn: Any, account: str, campaign: str, was: str,
                    status: str, now_ms: int) -> int:
    """Hold this node's waiting mail of a campaign paused (or dropped) elsewhere; release
    it when resumed elsewhere. A drop elsewhere holds here: nothing is removed remotely."""
    reason = campaign_hold(account, campaign)
    if stopped(status) and not stopped(was):
        found = jobs.find_jobs(store.spool, txn, account, campaign)
        return jobs.hold(store.spool, txn, found, reason, now_ms)
    if status == ACTIVE and stopped(was):
        return jobs.release_reason(store.spool, txn, reason, now_ms)
    return 0


def follow_account(store: PolicyStore, txn: Any, account: str, was: str, status: str,
                   now_ms: int) -> int:
    reason = account_hold(account)
    if status != ACTIVE and was == ACTIVE:
        found = jobs.find_jobs(store.spool, txn, account)
        return jobs.hold(store.spool, txn, found, reason, now_ms)
    if status == ACTIVE and was != ACTIVE:
        return jobs.release_reason(store.spool, txn, reason, now_ms)
    return 0


def merge_suppression(store: PolicyStore, txn: Any, record: Record) -> Change | None:
    raw = txn.get(record.key, db=store.supp)
    if not newer(record.version, version_of(raw)):
        return None
    name = record.key.replace(b"\0", b" ").decode("utf-8", "replace")
    if record.value == TOMBSTONE:
        if raw is None:
            return None
        txn.delete(record.key, db=store.supp)
        return Change("suppression", name, "removed")
    txn.put(record.key, record.value, db=store.supp)
    return Change("suppression", name, "added")


def parse_pull(table: str, flat: list[Any]) -> tuple[list[Record], int]:
    """Records from the PULL script's reply, and the highest sequence number seen."""
    records, top = [], 0
    for i in range(0, len(flat) - 3, 4):
        key, seq, value, version = flat[i:i + 4]
        records.append(Record(table, bytes(key), bytes(value), float(version)))
        top = max(top, int(float(seq)))
    return records, top


def parse_rejected(table: str, flat: list[Any]) -> list[Record]:
    return [Record(table, bytes(flat[i]), bytes(flat[i + 1]), float(flat[i + 2]))
            for i in range(0, len(flat) - 2, 3)]


def put_args(records: list[Record]) -> list[Any]:
    args: list[Any] = []
    for r in records:
        args += [r.key, r.value, repr(r.version)]
    return args
