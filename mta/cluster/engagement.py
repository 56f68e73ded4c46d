"""Opens and clicks counted across nodes: the engagement counters in Redis.

Each node serves the tracking endpoints and counts what it served in its own LMDB
(mta.tracking.stats). `EngagementSync` (the tracker's `SharedEngagement`, wired by the
engine in the worker that serves HTTP) adds the same counts to the cluster's copy:

- in the transaction that counts a batch on this node the batch is also journaled in
  LMDB (`tracking.share`); the sync adds each journaled batch to Redis with one script
  call that is done once per batch id (a retry after a timeout, or after a restart of
  this worker, adds nothing twice) and then removes it from the journal;
- the unique counts are decided in Redis: a person's first counted open (or click) of a
  campaign sets `eng:s:<o|c>\\0<account>\\0<campaign>\\0<recipient>` (SET NX, kept
  `SEEN_TTL`), and only the call that sets it adds to `unique_opens` (`unique_clicks`),
  so a person who opens on node A and again on node B counts once, exactly;
- counters are hashes `eng:n:C<account>\\0<campaign>` and `eng:n:A<account>`, the links
  of a campaign one hash `eng:l:<account>\\0<campaign>` (fields ``h``/``m`` + URL).

While Redis is unreachable the batches wait in the journal (they survive a restart) and
go out when it answers again. If Redis came back empty (a new `eng:epoch`), every node
adds its whole copy again: the totals per class, the links, and its recorded persons
(SET NX again, so unique counts stay unique). The admin views read the cluster's
figures here; while Redis cannot say, they show the node's own (`counted: "node"`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from mta.cluster.link import DOWN, RedisLink, stop_task
from mta.cluster.policy import glob_escape
from mta.queue.spool import Spool, pack, unpack
from mta.tracking.shared import Figures, LinkRows
from mta.tracking.stats import FIELDS, Deltas, clean_name, deltas_of, link_row, local_copy, ranked

log = logging.getLogger("mta.cluster.engagement")

JOURNAL_DB = "tracking.share"
EPOCH_META = b"engagement_epoch"
DONE_TTL = 7 * 86400  # seconds a batch id added is remembered (its retries add nothing)
SEEN_TTL = 365 * 86400  # a person counts once as unique within a year of the first count
INTERVAL = 0.25  # seconds between rounds (journal left over, epoch, purged accounts)
EPOCH_EVERY = 8  # rounds between checks that Redis still has the shared counters
JOURNAL_BATCH = 200  # journaled batches read at once
CHUNK = 2000  # operations per script call when a node adds its whole copy

# KEYS[1]: the batch id's done key; the others: counters, link hashes, persons.
# ARGV: done TTL, persons' TTL, then operations: "i" key field n (HINCRBY), "u" person
# field key key (the person new: HINCRBY field 1 on both keys). Nothing if done before;
# returns the number of persons counted as new (-1: the batch was added already).
ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local seen_ttl = tonumber(ARGV[2])
local new = 0
local i = 3
while i <= #ARGV do
  if ARGV[i] == 'i' then
    redis.call('HINCRBY', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], tonumber(ARGV[i + 3]))
    i = i + 4
  else
    if redis.call('SET', KEYS[tonumber(ARGV[i + 1])], '1', 'NX', 'EX', seen_ttl) then
      redis.call('HINCRBY', KEYS[tonumber(ARGV[i + 3])], ARGV[i + 2], 1)
      redis.call('HINCRBY', KEYS[tonumber(ARGV[i + 4])], ARGV[i + 2], 1)
      new = new + 1
    end
    i = i + 5
  end
end
redis.call('SET', KEYS[1], '1', 'EX', tonumber(ARGV[1]))
return new
"""


def compact(events: list[dict[str, Any]]) -> list[list[str]]:
    """What the counters need of decided events (the journal keeps only that)."""
    return [[str(e["type"]), str(e["class"]), str(e.get("account", "")),
             str(e.get("campaign", "")), str(e.get("recipient", "")), str(e.get("link") or "")]
            for e in events]


def expand(rows: list[list[str]]) -> list[dict[str, Any]]:
    return [{"type": t, "class": c, "account": a, "campaign": n, "recipient": r, "link": k}
            for t, c, a, n, r, k in rows]


def link_hash(link_key: bytes) -> tuple[bytes, bytes]:
    """A local link key (L<account>\\0<campaign>\\0<url>): the campaign's pair, the URL."""
    account, campaign, url = link_key[1:].split(b"\0", 2)
    return account + b"\0" + campaign, url


class Script:
    """One call's keys and arguments, built from deltas (plain logic, tested alone)."""

    def __init__(self, done: bytes, key: Callable[[str, bytes], bytes]) -> None:
        self.key = key  # (kind, local key) -> Redis key
        self.keys: list[bytes] = [done]
        self.index: dict[bytes, int] = {}
        self.args: list[Any] = [DONE_TTL, SEEN_TTL]

    def _ref(self, key: bytes) -> int:
        if key not in self.index:
            self.keys.append(key)
            self.index[key] = len(self.keys)  # Lua's KEYS start at 1
        return self.index[key]

    def add(self, deltas: Deltas) -> Script:
        for local, counts in deltas.counts.items():
            for name, n in sorted(counts.items()):
                if n:
                    self.args += ["i", self._ref(self.key("n", local)), name, n]
        for local, (human, machine) in deltas.links.items():
            pair, url = link_hash(local)
            for tag, n in ((b"h", human), (b"m", machine)):
                if n:
                    self.args += ["i", self._ref(self.key("l", pair)), tag + url, n]
        for mark in deltas.marks:
            self.args += ["u", self._ref(self.key("s", mark.seen)), mark.field,
                          self._ref(self.key("n", mark.keys[0])),
                          self._ref(self.key("n", mark.keys[1]))]
        return self


def chunks(deltas: Deltas, size: int = CHUNK) -> list[Deltas]:
    """A large copy cut into script calls of about `size` operations."""
    out = [Deltas(counts=dict(deltas.counts), links=dict(deltas.links))]
    marks = deltas.marks
    for start in range(0, len(marks), size):
        if start:
            out.append(Deltas())
        out[-1].marks = marks[start:start + size]
    return out


def parse_figures(found: dict[bytes, bytes]) -> Figures:
    values = {k.decode("utf-8", "replace"): int(v) for k, v in found.items()}
    return {name: values.get(name, 0) for name in FIELDS}


def parse_links(found: dict[bytes, bytes]) -> LinkRows:
    counts: dict[bytes, list[int]] = {}
    for field, value in found.items():
        pair = counts.setdefault(field[1:], [0, 0])
        pair[0 if field[:1] == b"h" else 1] += int(value)
    return ranked([link_row(url, h, m) for url, (h, m) in counts.items()])


class EngagementSync:
    def __init__(self, link: RedisLink, spool: Spool,
                 submit: Callable[[Callable[[Any], Any]], Any]) -> None:
        self.link = link
        self.spool = spool
        self.submit = submit  # the worker's group committer
        self.journal = spool.open_db(JOURNAL_DB)
        self.node = link.member.rpartition("/")[0] or link.member
        self._add = link.redis.register_script(ADD)
        self._lock = asyncio.Lock()  # one sharing at a time
        self.forgetting: set[str] = set()  # purged accounts still to remove from Redis
        self.rounds = 0
        self.counts = {"batches": 0, "persons": 0, "republished": 0}
        self._task: asyncio.Task[None] | None = None

    def rkey(self, kind: str, local: bytes) -> bytes:
        return self.link.key("eng", kind).encode() + b":" + local

    # --- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        self.link.on_up.append(self.catch_up)
        if self.link.up:
            await self.catch_up()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        await stop_task(self._task)
        await self.share()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                await self.sync()
            except Exception:
                log.exception("engagement sync failed")

    async def sync(self) -> None:
        if not self.link.up:
            return
        self.rounds += 1
        if self.rounds % EPOCH_EVERY == 0:
            await self._check_epoch()  # emptied without a restart (FLUSHALL)
        await self.share()
        if self.forgetting:
            await self._forget()

    async def catch_up(self) -> None:
        """Redis (back) up: its copy still there, else ours again; then the journal."""
        try:
            republished = await self._check_epoch()
            left = self._journal_size()
            await self.share()
        except Exception:
            log.exception("engagement catch-up failed; retried with the next rounds")
            return
        if self.link.outages or republished:
            log.warning("engagement: Redis reachable again; %d batches counted meanwhile "
                        "added, %d records of this node's copy added again", left,
                        republished)

    # --- this node's batches --------------------------------------------------------------

    def keep(self, txn: Any, events: list[dict[str, Any]]) -> None:
        key = time.time_ns().to_bytes(8, "big") + os.urandom(4)
        txn.put(key, pack(compact(events)), db=self.journal)

    def _journal_size(self) -> int:
        with self.spool.env.begin(db=self.journal) as txn:
            return int(txn.stat(self.journal)["entries"])

    def _read_journal(self) -> list[tuple[bytes, list[dict[str, Any]]]]:
        with self.spool.env.begin(db=self.journal) as txn, txn.cursor() as cursor:
            out = []
            for key, value in cursor:
                out.append((bytes(key), expand(unpack(value))))
                if len(out) >= JOURNAL_BATCH:
                    break
            return out

    async def share(self) -> None:
        """Add the journaled batches to Redis, oldest first, until none is left or
        Redis does not answer (they wait in the journal)."""
        if not self.link.up:
            return
        async with self._lock:
            while True:
                batches = self._read_journal()
                added: list[bytes] = []
                for key, events in batches:
                    script = Script(self.rkey("done", f"{self.node}:{key.hex()}".encode()),
                                    self.rkey).add(deltas_of(events))
                    new = await self.link.call(lambda s=script: self._add(keys=s.keys,
                                                                          args=s.args))
                    if new is DOWN:
                        break
                    added.append(key)
                    self.counts["batches"] += 1
                    self.counts["persons"] += max(0, int(new))
                if added:
                    await self.submit(lambda txn, keys=added: self._unjournal(txn, keys))
                if len(added) < len(batches) or len(batches) < JOURNAL_BATCH:
                    return

    def _unjournal(self, txn: Any, keys: list[bytes]) -> None:
        for key in keys:
            txn.delete(key, db=self.journal)

    # --- Redis emptied: this node's whole copy again ---------------------------------------

    async def _check_epoch(self) -> int:
        """A new epoch in Redis (new, restarted empty, flushed): add this node's whole
        copy and drop the journal it covers; the number of records added."""
        redis, key = self.link.redis, self.link.key("eng", "epoch")
        async with self._lock:
            await self.link.call(lambda: redis.set(key, os.urandom(8).hex(), nx=True))
            epoch = await self.link.call(lambda: redis.get(key))
            if epoch is DOWN or epoch is None:
                return 0
            meta = self.spool.dbs["meta"]
            with self.spool.env.begin() as txn:
                seen = txn.get(EPOCH_META, db=meta)
                if seen is not None and bytes(seen) == epoch:
                    return 0
                copy, records = local_copy(self.spool, txn)
                covered = [bytes(k) for k, _ in txn.cursor(db=self.journal)]
            for i, part in enumerate(chunks(copy)):
                done = self.rkey("done", f"{self.node}:epoch:{epoch.hex()}:{i}".encode())
                script = Script(done, self.rkey).add(part)
                if await self.link.call(lambda s=script: self._add(
                        keys=s.keys, args=s.args)) is DOWN:
                    return 0

            def settle(txn: Any) -> None:
                self._unjournal(txn, covered)
                txn.put(EPOCH_META, epoch, db=meta)

            await self.submit(settle)
        self.counts["republished"] += records
        if seen is not None:
            log.warning("engagement: Redis lost the shared counters; added this node's "
                        "copy again (%d records)", records)
        return records if seen is not None else 0

    # --- the admin views ----------------------------------------------------------------------

    async def campaign_figures(self, pairs: list[tuple[str, str]]
                               ) -> list[tuple[Figures, LinkRows]] | None:
        names = [clean_name(a) + b"\0" + clean_name(c) for a, c in pairs]

        async def read() -> list[Any]:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self.rkey("n", b"C" + name))
                    pipe.hgetall(self.rkey("l", name))
                return list(await pipe.execute())

        if not names:
            return []
        reply = await self.link.call(read)
        if reply is DOWN:
            return None
        return [(parse_figures(reply[i]), parse_links(reply[i + 1]))
                for i in range(0, len(reply), 2)]

    async def account_figures(self, accounts: list[str]) -> list[Figures] | None:
        async def read() -> list[Any]:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                for account in accounts:
                    pipe.hgetall(self.rkey("n", b"A" + clean_name(account)))
                return list(await pipe.execute())

        if not accounts:
            return []
        reply = await self.link.call(read)
        return None if reply is DOWN else [parse_figures(found) for found in reply]

    # --- retention ------------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        """A purged account's engagement records leave Redis too (next rounds)."""
        if event.get("type") == "AccountPurged" and event.get("purged_account"):
            self.forgetting.add(str(event["purged_account"]))

    async def _forget(self) -> None:
        for account in sorted(self.forgetting):
            try:
                removed = await self._forget_account(clean_name(account))
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("engagement: %s not removed from Redis yet (%s)", account,
                            exc.__class__.__name__)
                return
            self.forgetting.discard(account)
            log.info("engagement: purged account %s removed from Redis (%d keys)", account,
                     removed)

    async def _forget_account(self, name: bytes) -> int:
        redis = self.link.redis
        keys = [self.rkey("n", b"A" + name)]
        for kind, start in (("n", b"C" + name + b"\0"), ("l", name + b"\0"),
                            ("s", b"o\0" + name + b"\0"), ("s", b"c\0" + name + b"\0")):
            match = glob_escape(self.rkey(kind, start)) + b"*"
            keys += [key async for key in redis.scan_iter(match=match, count=1000)]
        removed = 0
        for i in range(0, len(keys), 1000):
            removed += int(await redis.delete(*keys[i:i + 1000]))
        return removed
