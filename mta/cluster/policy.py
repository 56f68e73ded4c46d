"""The policy guard on several nodes: pauses, suppressions, counters and limits in Redis.

Each node's LMDB stays its own authoritative copy (it outlives any Redis outage), and
the guard keeps reading it: intake checks and delivery holds cost no Redis round trip.
`PolicySync` (one per worker, wired by `share_policy`) keeps the copies in step:

- local changes (operator actions from the CLI or the admin API, automatic pauses,
  new suppressions) are journaled in LMDB (`policy.journal`); the node's first worker
  publishes them (newest version wins, `policy_state.PUT`) and pulls what other nodes
  changed every `interval` (<= 0.25 s), merging it into LMDB with the same rule: a
  campaign paused on node A is held and refused on node B within a second;
- each worker adds its counted deltas to the cluster totals (once per batch id) and
  judges the campaigns it counted for on those totals; the first node to pause a
  campaign sends the account's notice (a claim in Redis), the others just pause it;
- trial and monthly limits are reserved in Redis with a check-and-increment, so two
  nodes can never both pass a cap.

While Redis is unreachable everything known locally is enforced, counts wait in
memory, and each worker may use its share of what an account has left (what was left
divided by the workers alive on all nodes). When Redis is back, the worker catches up
(counts, then journal, then pull) and says so in its log and a `PolicySync` event. If
Redis came back empty (no append-only file), every node publishes its whole copy and
its own counters again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from mta.cluster.link import DOWN, RedisLink, stop_task
from mta.cluster.policy_state import (
    ADD,
    PULL,
    PUT,
    RESERVE,
    TABLES,
    Change,
    LocalShare,
    Record,
    add_args,
    all_counters,
    clear_journal,
    journal_everything,
    merge_deltas,
    merge_op,
    parse_hash,
    parse_pull,
    parse_rejected,
    plus,
    put_args,
    read_journal,
    shared_deltas,
)
from mta.policy.admission import RESERVATION_GRACE
from mta.policy.guard import PolicyGuard
from mta.policy.ledger import Applied, Batch, Pause
from mta.policy.model import ACTIVE, Counters, month_of
from mta.policy.rates import find_breach
from mta.policy.store import account_key, campaign_key, clean_name, month_key
from mta.queue.spool import pack, unpack

log = logging.getLogger("mta.cluster.policy")

DONE_TTL = 86400  # seconds a counted batch id is remembered (a retry adds it once)
CLAIM_TTL = 86400
JOURNAL_BATCH = 500
PULL_BATCH = 1000
EPOCH_META, CURSORS_META = b"cluster_epoch", b"cluster_cursors"
EPOCH_EVERY = 8  # sync rounds between checks that Redis still has the shared state
LOCAL_NOTE = " (shared limits unreachable: this worker's share)"


def glob_escape(key: bytes) -> bytes:
    """A key prefix as a literal in a Redis MATCH pattern."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", key)


@dataclass
class Reservation:
    account: str
    month: str
    count: int
    expires: float  # monotonic; not stored by then: the submission failed, give it back


class PolicySync:
    """The policy guard's `SharedPolicy` (mta.policy.shared) over Redis."""

    judges = True  # campaigns are judged here, on the cluster's totals

    def __init__(self, guard: PolicyGuard, link: RedisLink, leader: bool) -> None:
        self.guard = guard
        self.store = guard.store
        self.link = link
        self.leader = leader  # publishes the node's journal and merges the others' changes
        redis = link.redis
        self._put, self._pull_script = redis.register_script(PUT), redis.register_script(PULL)
        self._add, self._reserve = redis.register_script(ADD), redis.register_script(RESERVE)
        self.unpushed: dict[bytes, Counters] = {}
        self.sending: tuple[str, dict[bytes, Counters]] | None = None
        self.known: dict[bytes, Counters] = {}  # cluster totals as last seen
        self.reservations: dict[str, Reservation] = {}
        self.refunds: list[Reservation] = []
        self.shares: dict[tuple[str, str], LocalShare] = {}
        self.forgetting: set[str] = set()  # purged accounts still to remove from Redis
        self.cursors = dict.fromkeys(TABLES, 0)
        self.interval = min(0.25, guard.pc.cache_ttl / 2)
        self.counts = guard.counts  # in the guard's metrics (mta_policy_actions_total)
        self.rounds = 0
        self._lock = asyncio.Lock()  # counts being added
        self._leading = asyncio.Lock()  # the epoch, the journal and the pulls (one at a time)
        self._task: asyncio.Task[None] | None = None

    # --- keys -----------------------------------------------------------------------

    def rkey(self, *parts: str) -> str:
        return self.link.key("policy", *parts)

    def counter_key(self, key: bytes) -> bytes:
        return self.rkey("n").encode() + b":" + key

    def table_keys(self, table: str) -> list[str]:
        return [self.rkey(table), self.rkey(table, "ver"), self.rkey(table, "log"),
                self.rkey("seq")]

    # --- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        self.store.keep_journal()
        if self.leader:
            self._load_cursors()
        self.link.on_up.append(self.catch_up)
        self.link.on_down.append(self.went_down)
        if self.link.up:
            await self.catch_up()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        await stop_task(self._task)
        if self.leader and self.link.up:
            async with self._leading:
                await self._publish()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sync()
            except Exception:
                log.exception("policy sync failed")

    async def sync(self) -> None:
        """One round: counts left over, expired reservations, the journal, others' changes."""
        self._expire()
        if not self.link.up:
            return
        async with self._lock:
            await self._push_counters()
        await self._refund()
        if self.forgetting:
            await self._forget()
        if self.leader:
            self.rounds += 1
            async with self._leading:
                if self.rounds % EPOCH_EVERY == 0:
                    await self._check_epoch()  # emptied without a restart (FLUSHALL)
                await self._publish()
                await self._pull()

    def went_down(self) -> None:
        self.shares.clear()
        log.warning("policy: Redis unreachable; enforcing this node's copy of pauses and "
                    "suppressions, counting locally, trial and monthly limits within this "
                    "worker's share")

    async def catch_up(self) -> None:
        """Redis is (back) up: counts, then (first worker) epoch, journal, others' changes."""
        try:
            await self._catch_up()
        except Exception:
            log.exception("policy catch-up failed; retried with the next sync")

    async def _catch_up(self) -> None:
        self.shares.clear()
        async with self._leading:
            republished = await self._check_epoch() if self.leader else 0
            async with self._lock:
                keys = len(self.unpushed) + (len(self.sending[1]) if self.sending else 0)
                if await self._push_counters() is DOWN:
                    return
            published = await self._publish() if self.leader else 0
            merged = await self._pull() if self.leader else 0
        report = {"counters": keys, "published": published, "merged": merged,
                  "republished": republished}
        self.counts["shared_catch_ups"] += 1
        if self.link.outages or republished:
            log.warning("policy: Redis reachable again; caught up: %d counter keys added, "
                        "%d local changes published (%d republished), %d changes merged",
                        keys, published, republished, merged)
            self.guard.emit({"type": "PolicySync", "node": self.link.member, **report})

    # --- counters and pauses ------------------------------------------------------------

    async def counted(self, batch: Batch, applied: Applied) -> None:
        """A batch was counted locally: add it to the cluster totals, judge on those."""
        deltas = shared_deltas(batch, applied)
        totals: Any = {}
        if deltas:
            async with self._lock:
                merge_deltas(self.unpushed, deltas)
                totals = await self._push_counters()
        if applied.touched:
            for pause, event in await self._judge(applied.touched, totals):
                applied.pauses.append(pause)
                applied.events.append(event)

    async def _push_counters(self) -> Any:
        """Add what is pending to Redis: the totals of the keys added to, or DOWN."""
        if self.sending is None and self.unpushed:
            self.sending, self.unpushed = (uuid.uuid4().hex, self.unpushed), {}
        if self.sending is None:
            return {}
        batch_id, deltas = self.sending
        keys = list(deltas)
        redis_keys = [self.rkey("done", batch_id).encode(), *map(self.counter_key, keys)]
        reply = await self.link.call(lambda: self._add(keys=redis_keys,
                                                       args=add_args(DONE_TTL, deltas)))
        if reply is DOWN:
            return DOWN
        self.sending = None
        totals = {key: parse_hash(flat) for key, flat in zip(keys, reply, strict=True)}
        self.known.update(totals)
        self.counts["shared_counts"] += 1
        return totals

    def _fallback(self, key: bytes) -> Counters | None:
        """Redis unreachable: the last known totals plus what waits to be added."""
        if key not in self.known:
            return None  # judged on this node's own counters
        return plus(self.known[key], self.unpushed.get(key),
                    self.sending[1].get(key) if self.sending else None)

    async def _judge(self, touched: list[tuple[str, str]], totals: Any
                     ) -> list[tuple[Pause, dict[str, Any]]]:
        """The pauses the cluster's totals call for, each with its CampaignPaused event,
        recorded for the event outbox in the transaction of the pause."""
        pauses = []
        now = self.guard.clock()
        for account, campaign in touched:
            key = campaign_key(account, campaign)
            counters = totals.get(key) if totals is not DOWN else None
            counters = counters or self._fallback(key)
            since = self._breach_since(account, campaign, counters)
            if since is None:
                continue
            notify = await self._claim(key, since)
            judged = await self.guard.committer.submit(
                lambda txn, a=account, c=campaign, n=counters, y=notify:
                self._pause(txn, a, c, now, n, y))
            if judged is not None:
                pauses.append(judged)
        return pauses

    def _pause(self, txn: Any, account: str, campaign: str, now: float, counters: Counters,
               notify: bool) -> tuple[Pause, dict[str, Any]] | None:
        pause = self.guard.ledger.judge_with(txn, account, campaign, now, counters, notify)
        if pause is None:
            return None
        counting = self.guard.counting
        event = counting.pause_event(pause)
        if counting.record_events is not None:
            counting.record_events(txn, [event])
        return pause, event

    def _breach_since(self, account: str, campaign: str,
                      counters: Counters | None) -> float | None:
        """The version of the campaign's active state if `counters` cross a threshold."""
        with self.store.read() as txn:
            state = self.store.get_campaign(txn, account, campaign)
            if counters is None:
                counters = self.store.get_counters(txn, campaign_key(account, campaign))
        if state.status != ACTIVE or not state.guarded:
            return None
        base = Counters.from_dict(state.baseline)
        return state.at if find_breach(counters.minus(base), self.guard.thresholds) else None

    async def _claim(self, key: bytes, since: float) -> bool:
        """True for the one node that pauses first (it sends the notice); True when
        Redis cannot say."""
        claim = self.rkey("claim").encode() + b":" + key + b":" + repr(since).encode()
        won = await self.link.call(lambda: self.link.redis.set(
            claim, self.link.member, nx=True, ex=CLAIM_TTL))
        return won is DOWN or bool(won)

    async def shared_totals(self, keys: list[bytes]) -> dict[bytes, Counters] | None:
        """The cluster's counters of `keys` (admin views), or None if Redis cannot say."""
        async def read() -> list[Any]:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(self.counter_key(key))
                return await pipe.execute()

        reply = await self.link.call(read)
        if reply is DOWN:
            return None
        return {key: parse_hash([x for pair in found.items() for x in pair])
                for key, found in zip(keys, reply, strict=True)}

    # --- retention ------------------------------------------------------------------------

    async def forget_account(self, account: str) -> None:
        """A purged account's counters and suppressions leave Redis too (retried with
        the next sync rounds while Redis is unreachable)."""
        self.forgetting.add(account)
        if self.leader and self.link.up:
            async with self._leading:
                await self._publish()  # no removal of its entries published after this
        await self._forget()

    async def _forget(self) -> None:
        for account in sorted(self.forgetting):
            try:
                removed = await self._forget_account(clean_name(account))
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("policy: %s not removed from Redis yet (%s)", account,
                            exc.__class__.__name__)
                return
            self.forgetting.discard(account)
            log.info("policy: purged account %s removed from Redis (%d records)", account,
                     removed)

    async def _forget_account(self, name: bytes) -> int:
        redis = self.link.redis
        keys = [self.counter_key(b"A" + name)]
        for kind in (b"C", b"M"):
            match = glob_escape(self.counter_key(kind + name + b"\0")) + b"*"
            keys += [key async for key in redis.scan_iter(match=match, count=1000)]
        removed = int(await redis.delete(*keys))
        for table, start in (("state", b"C" + name + b"\0"), ("supp", name + b"\0")):
            data, versions, changes, _ = self.table_keys(table)
            match = glob_escape(start) + b"*"
            fields = [f async for f, _ in redis.hscan_iter(data, match=match, count=1000)]
            for i in range(0, len(fields), 1000):
                chunk = fields[i:i + 1000]
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.hdel(data, *chunk).hdel(versions, *chunk).zrem(changes, *chunk)
                    await pipe.execute()
            removed += len(fields)
        return removed

    # --- trial and monthly limits -------------------------------------------------------

    async def reserve(self, message_id: str, account: str, count: int) -> str | None:
        """Count `count` e-mails against the account's cluster-wide limits, or refuse."""
        limits = self.guard.limits(account)
        month = month_of(self.guard.clock())
        akey, mkey = account_key(account), month_key(account, month)
        trial, cap = (-1 if x is None else x for x in limits)
        reply = await self.link.call(lambda: self._reserve(
            keys=[self.counter_key(akey), self.counter_key(mkey)], args=[count, trial, cap]))
        if reply is DOWN:
            return self._local_reserve(account, month, count, limits)
        ok, total, monthly = (int(x) for x in reply)
        self._know(akey, total + ok * count)
        self._know(mkey, monthly + ok * count)
        if ok:
            expires = (time.monotonic() + self.guard.cfg.smtp.commit_timeout
                       + RESERVATION_GRACE)
            self.reservations[message_id] = Reservation(account, month, count, expires)
            return None
        return self.guard.limit_reply(account, count, total, monthly, month) or (
            f"452 4.7.1 Sending limit reached for account {account}")

    def _know(self, key: bytes, submitted: int) -> None:
        self.known.setdefault(key, Counters()).submitted = submitted

    def _local_reserve(self, account: str, month: str, count: int,
                       limits: tuple[int | None, int | None]) -> str | None:
        share = self.shares.get((account, month))
        if share is None:
            total, monthly = self.guard.usage(account, month)  # counts this message too
            known = self.known_usage(account, month, total - count, monthly - count)
            share = LocalShare.split(limits, known, self.link.live_workers)
            self.shares[(account, month)] = share
        total, monthly = share.view(limits)
        refusal = self.guard.limit_reply(account, count, total, monthly, month, LOCAL_NOTE)
        if refusal is None:
            share.used += count
            self.counts["local_share_admitted"] += 1
        return refusal

    def known_usage(self, account: str, month: str, total: int,
                    monthly: int) -> tuple[int, int]:
        """This node's figures, raised to the cluster's where those are known."""
        a, m = self.known.get(account_key(account)), self.known.get(month_key(account, month))
        return max(total, a.submitted if a else 0), max(monthly, m.submitted if m else 0)

    def consumed(self, message_id: str) -> bool:
        """The message was stored: True if a Redis reservation counted it already."""
        return self.reservations.pop(message_id, None) is not None

    def _expire(self) -> None:
        now = time.monotonic()
        for message_id in [m for m, r in self.reservations.items() if r.expires < now]:
            self.refunds.append(self.reservations.pop(message_id))

    async def _refund(self) -> None:
        """Give back what was reserved for submissions that were not stored."""
        if not self.refunds:
            return
        refunds, self.refunds = self.refunds, []
        deltas: dict[bytes, Counters] = {}
        for r in refunds:
            for key in (account_key(r.account), month_key(r.account, r.month)):
                merge_deltas(deltas, {key: Counters(submitted=-r.count)})
        async with self._lock:
            merge_deltas(self.unpushed, deltas)
            await self._push_counters()

    # --- shared states and suppressions ----------------------------------------------------

    async def _publish(self) -> int:
        """Publish the journal (changes made on this node); the number of records."""
        published = 0
        while True:
            with self.store.read() as txn:
                out = read_journal(self.store, txn, JOURNAL_BATCH)
            if not out.journal_keys:
                return published
            rejected: list[Record] = []
            for table in TABLES:
                records = [r for r in out.records if r.table == table]
                if not records:
                    continue
                reply = await self.link.call(lambda t=table, r=records: self._put(
                    keys=self.table_keys(t), args=put_args(r)))
                if reply is DOWN:
                    return published
                rejected += parse_rejected(table, reply)
            await self.guard.committer.submit(
                lambda txn, k=out.journal_keys: clear_journal(self.store, txn, k))
            await self._merge(rejected)  # newer elsewhere: theirs wins here too
            published += len(out.records)
            self.counts["shared_published"] += len(out.records)
            if len(out.journal_keys) < JOURNAL_BATCH:
                return published

    async def _pull(self) -> int:
        """Merge what changed in Redis since the last pull; the number of changes."""
        records: list[Record] = []
        cursors = dict(self.cursors)
        for table in TABLES:
            while True:
                reply = await self.link.call(lambda t=table: self._pull_script(
                    keys=self.table_keys(t)[:3], args=[cursors[t], PULL_BATCH]))
                if reply is DOWN:
                    break
                got, top = parse_pull(table, reply)
                records += got
                cursors[table] = max(cursors[table], top)
                if len(got) < PULL_BATCH:
                    break
        changes = await self._merge(records)
        if cursors != self.cursors:
            await self._save_cursors(cursors)
        return len(changes)

    async def _save_cursors(self, cursors: dict[str, int]) -> None:
        """Where the pulls stand, kept in LMDB: a restart pulls only what is new."""
        self.cursors = cursors
        await self.guard.committer.submit(
            lambda txn: txn.put(CURSORS_META, pack(cursors), db=self.store.meta))

    def _load_cursors(self) -> None:
        with self.store.read() as txn:
            raw = txn.get(CURSORS_META, db=self.store.meta)
        if raw:
            self.cursors.update(unpack(raw))

    async def _merge(self, records: list[Record]) -> list[Change]:
        if not records:
            return []
        now_ms = int(self.guard.clock() * 1000)
        changes: list[Change] = await self.guard.committer.submit(
            merge_op(self.store, records, now_ms))
        if changes:
            self.guard.refresh()
            self.counts["shared_merged"] += len(changes)
            for change in changes[:20]:
                log.info("policy: %s %s %s on another node (%d jobs here follow)",
                         change.kind, change.name, change.status, change.jobs)
        return changes

    async def _check_epoch(self) -> int:
        """Redis new or emptied since this node last saw it: publish everything again
        (states, suppressions, this node's counters); the number of records journaled."""
        redis, key = self.link.redis, self.rkey("epoch")
        await self.link.call(lambda: redis.set(key, uuid.uuid4().hex, nx=True))
        epoch = await self.link.call(lambda: redis.get(key))
        if epoch is DOWN or epoch is None:
            return 0
        with self.store.read() as txn:
            seen = txn.get(EPOCH_META, db=self.store.meta)
            if seen is not None and bytes(seen) == epoch:
                return 0
            counters = all_counters(self.store, txn)
        count = await self.guard.committer.submit(
            lambda txn: journal_everything(self.store, txn))
        async with self._lock:
            self.unpushed, self.sending = counters, None  # this node's counts, all of them
            if await self._push_counters() is DOWN:
                return 0
        await self._save_cursors(dict.fromkeys(TABLES, 0))  # the numbering starts again
        await self.guard.committer.submit(
            lambda txn: txn.put(EPOCH_META, epoch, db=self.store.meta))
        if seen is not None:
            log.warning("policy: Redis lost the shared state; publishing this node's copy "
                        "again (%d records, %d counter keys)", count, len(counters))
        return count if seen is not None else 0

