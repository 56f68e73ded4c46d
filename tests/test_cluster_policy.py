"""The policy guard on several nodes sharing Redis ([cluster] redis).

- plain logic without sockets: last-writer-wins, the deltas shared, a worker's share of
  a limit while Redis is down, merging remote states into a real LMDB spool (holds and
  releases follow), the journal of local changes;
- two guards on two spools in one process, a real redis-server: pauses, suppressions,
  cluster-wide rates, a monthly cap, Redis stopped and started again;
- two real engine nodes (different ports and spools, same Redis) with delivery to a
  loopback sink: a pause and a suppression made through node A's CLI hold on node B;
  Redis stopped mid-run: both keep accepting and delivering, changes made meanwhile
  reach the other node, counters catch up, nothing is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from mta.cluster.link import RedisLink
from mta.cluster.policy import PolicySync
from mta.cluster.policy_state import (
    TOMBSTONE,
    LocalShare,
    Record,
    add_args,
    merge_op,
    newer,
    parse_hash,
    read_journal,
    shared_deltas,
)
from mta.config import ClusterConfig
from mta.policy import admin
from mta.policy.guard import PolicyGuard
from mta.policy.ledger import Applied, Batch, Submission
from mta.policy.model import (
    PAUSED,
    CampaignState,
    Counters,
    Suppression,
    campaign_hold,
)
from mta.policy.store import PolicyStore, account_key, campaign_key, month_key, supp_key
from mta.queue.commit import GroupCommitter
from mta.queue.spool import NewMessage, Spool, pack
from tests.test_policy_guard import Env, guard_config

# --- plain logic --------------------------------------------------------------------


def test_last_writer_wins() -> None:
    assert newer(2.0, None) and newer(2.0, 1.5)
    assert not newer(1.5, 2.0) and not newer(2.0, 2.0)  # a tie keeps what is there


def test_shared_deltas_leave_out_what_a_reservation_counted() -> None:
    batch = Batch(submissions=[Submission("tiny", "c1", 3, "2026-11", shared=True),
                               Submission("shop", "c2", 2, "2026-11")])
    applied = Applied(deltas={
        account_key("tiny"): Counters(submitted=3), month_key("tiny", "2026-11"):
        Counters(submitted=3), campaign_key("tiny", "c1"): Counters(submitted=3),
        account_key("shop"): Counters(submitted=2, hard=1)})
    deltas = shared_deltas(batch, applied)
    assert set(deltas) == {campaign_key("tiny", "c1"), account_key("shop")}
    assert deltas[account_key("shop")] == Counters(submitted=2, hard=1)
    assert applied.deltas[account_key("tiny")].submitted == 3  # the batch's own untouched


def test_counter_script_arguments_and_replies() -> None:
    deltas = {b"A1": Counters(sent=2, hard=1), b"C1": Counters(submitted=-4)}
    assert add_args(60, deltas) == [60, 2, "sent", 2, "hard", 1, 1, "submitted", -4]
    assert parse_hash([b"sent", b"7", b"hard", b"2"]) == Counters(sent=7, hard=2)


def test_a_worker_share_of_what_is_left_while_redis_is_down() -> None:
    limits = (None, 500)
    share = LocalShare.split(limits, (0, 300), workers=4)  # 200 left, 4 workers: 50 each
    assert share.month_left == 50 and share.trial_left is None
    assert share.view(limits) == (0, 450)  # 450 + 50 reaches the cap: the share's end
    share.used = 30
    assert share.view(limits) == (0, 480)
    trial = LocalShare.split((100, None), (97, 0), workers=2)
    assert trial.trial_left == 1 and trial.view((100, None)) == (99, 0)
    assert LocalShare.split((None, 10), (0, 20), workers=1).month_left == 0


def spool_env(tmp: Path) -> tuple[Spool, PolicyStore]:
    spool = Spool(tmp / "spool", 64 * 1024**2)
    return spool, PolicyStore(spool, journal=True)


def store_mail(spool: Spool, campaign: str, due_in: float = 0.0) -> NewMessage:
    message = NewMessage(sender="news@shop.test", recipients=["a@dest.test"], account="shop",
                         campaign=campaign, data=b"Subject: x\r\n\r\nhi\r\n",
                         received=time.time() + due_in)
    spool.apply([spool.store_op(message)])
    return message


def held(spool: Spool) -> list[str]:
    with spool.read() as txn:
        return [bytes(v).decode() for _, v in txn.cursor(db=spool.dbs["held"])]


def write(spool: Spool, fn: Any) -> Any:
    with spool.env.begin(write=True) as txn:
        return fn(txn)


def state_record(status: str, at: float) -> Record:
    return Record("state", campaign_key("shop", "spring"),
                  pack(CampaignState(status=status, by="cli:op", at=at).as_dict()), at)


def test_a_remote_pause_holds_waiting_mail_and_a_resume_releases_it(tmp_path: Path) -> None:
    spool, store = spool_env(tmp_path)
    try:
        store_mail(spool, "spring", due_in=600)  # deferred: held at once
        changes = write(spool, merge_op(store, [state_record(PAUSED, 100.0)], 1000))
        assert [(c.kind, c.status, c.jobs) for c in changes] == [("campaign", "paused", 1)]
        assert held(spool) == [campaign_hold("shop", "spring")]
        assert write(spool, merge_op(store, [state_record("active", 99.0)], 1000)) == []
        changes = write(spool, merge_op(store, [state_record("active", 101.0)], 2000))
        assert [(c.status, c.jobs) for c in changes] == [("active", 1)] and held(spool) == []
        with spool.read() as txn:  # merged copies are not journaled again
            assert read_journal(store, txn, 100).records == []
    finally:
        spool.close()


def test_suppressions_merge_and_a_local_change_waits_for_its_turn(tmp_path: Path) -> None:
    spool, store = spool_env(tmp_path)
    try:
        key = supp_key("shop", "x@dest.test")
        entry = pack(Suppression("x@dest.test", "manual", at=10.0).as_dict())
        assert write(spool, merge_op(store, [Record("supp", key, entry, 10.0)], 0))
        with spool.read() as txn:
            assert store.get_suppression(txn, "shop", "x@dest.test") is not None
        assert write(spool, merge_op(store, [Record("supp", key, TOMBSTONE, 11.0)], 0))
        with spool.read() as txn:
            assert store.get_suppression(txn, "shop", "x@dest.test") is None
        write(spool, lambda txn: admin.add_suppression(store, txn, "shop", "y@dest.test",
                                                       "manual", 50.0))
        other = Record("supp", supp_key("shop", "y@dest.test"), TOMBSTONE, 60.0)
        assert write(spool, merge_op(store, [other], 0)) == []  # ours is published first
        with spool.read() as txn:
            out = read_journal(store, txn, 100)
        assert [(r.table, r.key, r.version) for r in out.records] == [
            ("supp", supp_key("shop", "y@dest.test"), 50.0)]
    finally:
        spool.close()


# --- two guards, one Redis ------------------------------------------------------------


class Node(Env):
    sync: PolicySync
    link: RedisLink


@asynccontextmanager
async def node(tmp: Path, name: str, redis_url: str, **policy: Any) -> AsyncIterator[Node]:
    cfg = guard_config(tmp, name, f"{name}.jsonl", **{"flush_interval": 0.05, **policy})
    cfg.cluster = ClusterConfig(redis=redis_url, node=name, timeout=0.3, retry_interval=0.2,
                                node_ttl=3.0)
    spool = Spool(cfg.spool.path, cfg.spool.map_size)
    committer = GroupCommitter(spool)
    committer.start()
    env = Node(tmp, cfg, spool, None)  # type: ignore[arg-type]
    env.guard = PolicyGuard(cfg, spool, committer, emit=env.events.append)
    await env.guard.start()
    env.link = RedisLink(cfg.cluster, f"{name}/0")
    await env.link.start()
    env.sync = PolicySync(env.guard, env.link, leader=True)
    await env.sync.start()
    try:
        yield env
    finally:
        await env.sync.close()
        await env.guard.close()
        await env.link.close()
        await committer.close()
        spool.close()


async def eventually(predicate: Any, timeout: float = 5.0) -> float:
    """Seconds until predicate() holds (fails the test after `timeout`)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "not within the timeout"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def mail(campaign: str = "spring", account: str = "shop", rcpts: int = 1) -> NewMessage:
    return NewMessage("news@shop.test", [f"r{i}@dest.test" for i in range(rcpts)], b"",
                      account, campaign)


async def pause_via_admin(n: Node, campaign: str, now: float | None = None) -> None:
    await n.guard.committer.submit(lambda txn: admin.pause_campaign(
        n.guard.store, txn, "shop", campaign, "cli:op", "stop", now or time.time()))


@pytest.mark.asyncio
async def test_pause_and_suppression_on_a_hold_on_b(tmp_path: Path, redis_server: Any) -> None:
    async with node(tmp_path, "a", redis_server.url) as a, \
            node(tmp_path, "b", redis_server.url) as b:
        assert b.guard.check_message(mail()) is None
        await pause_via_admin(a, "spring")
        took = await eventually(lambda: b.guard.check_message(mail()) is not None)
        assert took < 1.0, f"{took:.2f} s"
        assert "5.7.1 Campaign spring of account shop is paused: stop" in str(
            b.guard.check_message(mail()))
        await a.guard.committer.submit(lambda txn: admin.add_suppression(
            a.guard.store, txn, "shop", "Gone@Dest.test", "manual", time.time()))
        await eventually(lambda: b.guard.check_rcpt("shop", "gone@dest.test") is not None, 1.0)
        await b.guard.committer.submit(lambda txn: admin.resume_campaign(
            b.guard.store, txn, "shop", "spring", "admin-api", time.time()))
        await b.guard.committer.submit(lambda txn: admin.remove_suppression(
            b.guard.store, txn, "shop", "gone@dest.test"))
        await eventually(lambda: a.guard.check_message(mail()) is None, 1.0)
        await eventually(lambda: a.guard.check_rcpt("shop", "gone@dest.test") is None, 1.0)


def shared_counters(server: Any, key: bytes) -> Counters:
    client = redis.Redis.from_url(server.url)
    try:
        return parse_hash([x for kv in client.hgetall(b"mta:policy:n:" + key).items()
                           for x in kv])
    finally:
        client.close()


def bounce(n: Node, start: int, count: int, hard: int) -> None:
    """`count` outcomes of campaign spring, the first `hard` of them hard bounces."""
    for i in range(start, start + count):
        kind = "Bounce" if i - start < hard else "Delivery"
        n.guard.on_event({"type": kind, "id": "M", "account": "shop", "campaign": "spring",
                          "attempt": 1, "recipient": f"u{i}@dest.test", "code": 550 if
                          kind == "Bounce" else 250, "status": "5.1.1", "reply": "unknown"})


@pytest.mark.asyncio
async def test_rates_are_judged_on_the_cluster_totals(tmp_path: Path,
                                                      redis_server: Any) -> None:
    async with node(tmp_path, "a", redis_server.url, min_volume=100) as a, \
            node(tmp_path, "b", redis_server.url, min_volume=100) as b:
        bounce(a, 0, 60, hard=6)  # 10 % of 60: below the minimum volume alone
        await a.guard.flush()
        bounce(b, 1000, 60, hard=6)
        await b.guard.flush()  # 12 of 120 together
        paused = b.of_type("CampaignPaused")
        assert len(paused) == 1 and paused[0]["base"] == 120 and paused[0]["count"] == 12
        assert paused[0]["notice"]  # b paused first: it sends the account's notice
        await eventually(lambda: a.guard.check_message(mail()) is not None, 1.0)
        assert shared_counters(redis_server, campaign_key("shop", "spring")).hard == 12
        assert not a.of_type("CampaignPaused")  # learnt from b: no second notice


@pytest.mark.asyncio
async def test_a_monthly_cap_holds_across_nodes(tmp_path: Path, redis_server: Any) -> None:
    # "tiny": subscriber level 1, monthly_cap_factor 30: 30 e-mails a month in all.
    async with node(tmp_path, "a", redis_server.url, monthly_cap_factor=30) as a, \
            node(tmp_path, "b", redis_server.url, monthly_cap_factor=30) as b:
        async def submit(n: Node, count: int) -> int:
            accepted = 0
            for _ in range(count):
                message = mail("c", "tiny", rcpts=2)
                if await n.guard.admit(message) is None:
                    n.guard.on_event({"type": "Reception", "id": message.id, "account": "tiny",
                                      "campaign": "c", "recipients": 2})
                    accepted += 2
            return accepted

        got = await asyncio.gather(submit(a, 10), submit(b, 10))
        assert sum(got) == 30 and min(got) > 0
        reply = await b.guard.admit(mail("c", "tiny"))
        assert reply is not None and reply.startswith("452 4.7.1 Monthly limit reached")
        await a.guard.flush()
        await b.guard.flush()
        month = time.strftime("%Y-%m", time.gmtime())
        with a.spool.read() as txn:
            own = a.guard.store.get_counters(txn, month_key("tiny", month)).submitted
        assert own == got[0]  # each node counts its own in LMDB


@pytest.mark.asyncio
async def test_redis_stopped_and_started_again(tmp_path: Path, redis_server: Any) -> None:
    async with node(tmp_path, "a", redis_server.url, monthly_cap_factor=40) as a, \
            node(tmp_path, "b", redis_server.url, monthly_cap_factor=40) as b:
        bounce(b, 0, 10, hard=1)
        await b.guard.flush()
        redis_server.stop()
        await pause_via_admin(a, "autumn")
        await a.guard.committer.submit(lambda txn: admin.add_suppression(
            a.guard.store, txn, "shop", "late@dest.test", "manual", time.time()))
        bounce(b, 100, 20, hard=2)
        await b.guard.flush()  # counted locally, waits for Redis
        assert not b.link.up and (b.sync.sending or b.sync.unpushed)
        assert b.guard.check_message(mail("autumn")) is None  # b cannot know yet
        # "tiny" may send 40 this month; two workers were alive: 20 each while down.
        replies = [await b.guard.admit(mail("c", "tiny")) for _ in range(25)]
        assert replies.count(None) == 20 and "this worker's share" in str(replies[-1])
        redis_server.start()
        await eventually(lambda: b.guard.check_message(mail("autumn")) is not None, 5.0)
        await eventually(lambda: b.guard.check_rcpt("shop", "late@dest.test") is not None, 1.0)
        await eventually(lambda: not b.sync.unpushed and b.sync.sending is None, 2.0)
        totals = shared_counters(redis_server, campaign_key("shop", "spring"))
        assert (totals.sent, totals.hard) == (30, 3)  # nothing counted twice, nothing lost
        assert b.of_type("PolicySync") and a.of_type("PolicySync")
