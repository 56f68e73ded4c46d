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
import shutil
import smtplib
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.engine_proc import EngineProcess
from bench.load import Submission, make_body, run_load
from bench.rig.sinks import SinkFaults
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
    parse_pull,
    parse_rejected,
    put_args,
    read_journal,
    shared_deltas,
)
from mta.config import ClusterConfig
from mta.http.guard_operations import GuardOperations
from mta.policy import operations
from mta.policy.guard import PolicyGuard
from mta.policy.ledger import Applied, Batch
from mta.policy.ledger import Submission as Counted
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
from tests.helpers.engine import engine_config, wait_until
from tests.helpers.http import TOKEN, call
from tests.test_policy_engine import (
    SENDER,
    events,
    finals,
    mta,
    notice_to_account,
)
from tests.test_policy_guard import Env, guard_config

# --- plain logic --------------------------------------------------------------------


def test_last_writer_wins() -> None:
    assert newer(2.0, None) and newer(2.0, 1.5)
    assert not newer(1.5, 2.0) and not newer(2.0, 2.0)  # a tie keeps what is there


def test_shared_deltas_leave_out_what_a_reservation_counted() -> None:
    batch = Batch(submissions=[Counted("tiny", "c1", 3, "2026-11", shared=True),
                               Counted("shop", "c2", 2, "2026-11")])
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


def test_shared_records_in_and_out_of_the_scripts() -> None:
    records = [Record("state", b"Cshop\0spring", b"\x81", 12.5),
               Record("supp", b"shop\0a@b.test", TOMBSTONE, 13.0)]
    assert put_args(records) == [b"Cshop\0spring", b"\x81", "12.5",
                                 b"shop\0a@b.test", b"", "13.0"]
    pulled, top = parse_pull("supp", [b"shop\0a@b.test", b"7", b"", b"13.0",
                                      b"shop\0c@d.test", b"9", b"\x81", b"14"])
    assert top == 9 and [r.version for r in pulled] == [13.0, 14.0]
    assert pulled[0].value == TOMBSTONE and pulled[1].ref == b"Sshop\0c@d.test"
    assert parse_rejected("state", [b"Ax", b"\x81", b"20"]) == [
        Record("state", b"Ax", b"\x81", 20.0)]

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
        write(spool, lambda txn: operations.add_suppression(store, txn, "shop", "y@dest.test",
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
    outbox: list[dict[str, Any]]  # what the guard recorded for the event outbox, in its txns


@asynccontextmanager
async def node(tmp: Path, name: str, redis_url: str, **policy: Any) -> AsyncIterator[Node]:
    cfg = guard_config(tmp, name, f"{name}.jsonl", **{"flush_interval": 0.05, **policy})
    cfg.cluster = ClusterConfig(redis=redis_url, node=name, timeout=0.3, retry_interval=0.2,
                                node_ttl=3.0)
    spool = Spool(cfg.spool.path, cfg.spool.map_size)
    committer = GroupCommitter(spool)
    committer.start()
    env = Node(tmp, cfg, spool, None)  # type: ignore[arg-type]
    env.outbox = []
    env.guard = PolicyGuard(cfg, spool, committer, emit=env.events.append,
                            record_events=lambda txn, events: env.outbox.extend(events))
    await env.guard.start()
    env.link = RedisLink(cfg.cluster, f"{name}/0")
    await env.link.start()
    env.sync = PolicySync(env.guard, env.link, leader=True)
    env.guard.share(env.sync)
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
    await n.guard.committer.submit(lambda txn: operations.pause_campaign(
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
        await a.guard.committer.submit(lambda txn: operations.add_suppression(
            a.guard.store, txn, "shop", "Gone@Dest.test", "manual", time.time()))
        await eventually(lambda: b.guard.check_rcpt("shop", "gone@dest.test") is not None, 1.0)
        await b.guard.committer.submit(lambda txn: operations.resume_campaign(
            b.guard.store, txn, "shop", "spring", "admin-api", time.time()))
        await b.guard.committer.submit(lambda txn: operations.remove_suppression(
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
        assert any(e is paused[0] for e in b.outbox)  # recorded in the pause's transaction
        await eventually(lambda: a.guard.check_message(mail()) is not None, 1.0)
        assert shared_counters(redis_server, campaign_key("shop", "spring")).hard == 12
        assert not a.of_type("CampaignPaused")  # learnt from b: no second notice
        row = await GuardOperations(a.guard).campaign("shop", "spring")  # the admin API's view
        assert (row["sent"], row["hard_bounces"], row["counted"]) == (120, 12, "cluster")
        assert row["status"] == "paused" and row["rates"]["hard_bounce"] == 0.1
        account = await GuardOperations(a.guard).account("shop")
        assert account["totals"]["sent"] == 120 and account["counted"] == "cluster"
        # Resumed on a: judged again on the cluster's mail sent since the resume.
        resumed = await GuardOperations(a.guard).resume_campaign("shop", "spring")
        assert resumed["guard"] and resumed["window_sent"] == 0 and not resumed["judged"]
        await eventually(lambda: b.guard.check_message(mail()) is None, 1.0)  # b knows
        bounce(a, 2000, 60, hard=6)
        await a.guard.flush()
        assert len(a.of_type("CampaignPaused")) == 0  # 60 since the resume: not judged yet
        bounce(b, 3000, 60, hard=6)
        await b.guard.flush()  # 120 since the resume, 10 %: paused again
        assert len(b.of_type("CampaignPaused")) == 2


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
        await a.guard.committer.submit(lambda txn: operations.add_suppression(
            a.guard.store, txn, "shop", "late@dest.test", "manual", time.time()))
        bounce(b, 100, 20, hard=2)
        await b.guard.flush()  # counted locally, waits for Redis
        assert not b.link.up and (b.sync.sending or b.sync.unpushed)
        assert b.guard.check_message(mail("autumn")) is None  # b cannot know yet
        row = await GuardOperations(b.guard).campaign("shop", "spring")
        assert (row["sent"], row["counted"]) == (30, "node")  # b's own, while Redis is down
        # "tiny" may send 40 this month; two workers were alive: 20 each while down.
        replies = [await b.guard.admit(mail("c", "tiny")) for _ in range(25)]
        assert replies.count(None) == 20 and "this worker's share" in str(replies[-1])
        redis_server.start()
        await eventually(lambda: b.guard.check_message(mail("autumn")) is not None, 5.0)
        await eventually(lambda: b.guard.check_rcpt("shop", "late@dest.test") is not None, 1.0)
        await eventually(lambda: not b.sync.unpushed and b.sync.sending is None, 2.0)
        totals = shared_counters(redis_server, campaign_key("shop", "spring"))
        assert (totals.sent, totals.hard) == (30, 3)  # nothing counted twice, nothing lost
        # a may never have called Redis while it was away: it learns of the restart from
        # the server's new run_id and catches up all the same.
        await eventually(lambda: b.of_type("PolicySync") and a.of_type("PolicySync"), 5.0)
        assert a.link.outages == b.link.outages == 1


@pytest.mark.asyncio
async def test_a_restarted_node_pulls_only_what_is_new(tmp_path: Path,
                                                      redis_server: Any) -> None:
    async with node(tmp_path, "a", redis_server.url) as a:
        async with node(tmp_path, "b", redis_server.url) as b:
            await pause_via_admin(a, "spring")
            await eventually(lambda: b.guard.check_message(mail()) is not None)
            seen = dict(b.sync.cursors)
        published = a.guard.counts["shared_published"]
        await pause_via_admin(a, "autumn")  # while b is stopped
        await eventually(lambda: a.guard.counts["shared_published"] > published)
        async with node(tmp_path, "b", redis_server.url) as b:
            assert b.guard.check_message(mail("autumn")) is not None  # pulled at start
            assert b.sync.cursors["state"] == seen["state"] + 1 and seen["state"] > 0


@pytest.mark.asyncio
async def test_redis_back_empty_gets_every_node_copy_again(tmp_path: Path,
                                                          redis_server: Any) -> None:
    async with node(tmp_path, "a", redis_server.url) as a, \
            node(tmp_path, "b", redis_server.url) as b:
        bounce(b, 0, 10, hard=1)
        await b.guard.flush()
        await pause_via_admin(a, "spring")
        await a.guard.committer.submit(lambda txn: operations.add_suppression(
            a.guard.store, txn, "shop", "gone@dest.test", "manual", time.time()))
        await eventually(lambda: b.guard.check_rcpt("shop", "gone@dest.test") is not None)
        redis_server.stop()
        for name in ("appendonlydir", "appendonly.aof"):  # lost: no append-only file
            shutil.rmtree(redis_server.dir / name, ignore_errors=True)
        redis_server.start()
        await eventually(lambda: shared_counters(
            redis_server, campaign_key("shop", "spring")).sent == 10)
        async with node(tmp_path, "c", redis_server.url) as c:  # learns it all from Redis
            assert c.guard.check_message(mail()) is not None
            assert c.guard.check_rcpt("shop", "gone@dest.test") is not None
        assert shared_counters(redis_server, campaign_key("shop", "spring")).sent == 10  # once


@pytest.mark.asyncio
async def test_a_purged_account_leaves_redis_too(tmp_path: Path, redis_server: Any) -> None:
    async with node(tmp_path, "a", redis_server.url, retention_days=0.0) as a:
        bounce(a, 0, 10, hard=2)  # suppressions and counters, shared
        await a.guard.flush()
        message = mail("c", "tiny")
        assert await a.guard.admit(message) is None  # another account's reservation
        client = redis.Redis.from_url(redis_server.url)
        try:
            await eventually(lambda: client.hlen("mta:policy:supp") == 2)  # published
            await a.guard.committer.submit(lambda txn: operations.delete_account(
                a.guard.store, txn, "shop", "test", time.time(), 0.0))
            assert [r.account for r in await a.guard.purge_due(settle=0.0)] == ["shop"]
            left = sorted(client.scan_iter(match="mta:policy:n:*"))
            assert left == [b"mta:policy:n:Atiny", b"mta:policy:n:Mtiny\x00"
                            + time.strftime("%Y-%m", time.gmtime()).encode()]
            assert client.hlen("mta:policy:supp") == 0
            await eventually(lambda: client.hkeys("mta:policy:state") == [b"Ashop"])  # purged
        finally:
            client.close()


# --- two engine nodes, one Redis -------------------------------------------------------

SHOP = {"name": "shop", "email": "ops@shop.test", "plan": "standard"}


def start_node(tmp: Path, name: str, dns: Any, port: int, redis_url: str,
               delivery: bool = True, account: dict[str, Any] | None = None,
               workers: int = 1, **policy: Any) -> EngineProcess:
    """An engine node in tmp/name, its own ports and spool, sharing `redis_url`."""
    config = engine_config(
        tmp / name, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": delivery, "port": port, "allow_loopback_mx": True,
                  "retry_initial": 1.0, "retry_max": 1.0, "retry_jitter": 0.0,
                  "connect_timeout": 2.0, "command_timeout": 5.0},
        smtp={"trusted_account": "shop"}, bounce={"verp_secret": "cluster-verp"},
        policy={"flush_interval": 0.05, "unsubscribe_secret": "cluster-unsub", **policy},
        http={"admin_token": TOKEN}, accounts=[account or SHOP],
        cluster={"redis": redis_url, "node": name, "timeout": 0.3, "retry_interval": 0.3,
                 "node_ttl": 3.0})
    return EngineProcess(tmp / name, config, workers=workers).start()


def load(engine: EngineProcess, campaign: str, rcpts: list[str], sessions: int = 4) -> int:
    """Submit one message per recipient; the number accepted."""
    def make(i: int) -> Submission:
        return Submission(SENDER, [rcpts[i]],
                          make_body(300, f"{campaign} {i}", SENDER, rcpts[i], campaign))

    return asyncio.run(run_load(engine.host, engine.port, make, len(rcpts),
                                sessions=sessions)).accepted


def refused(engine: EngineProcess, campaign: str, rcpt: str = "probe@dest.test") -> bool:
    """True if the node refuses a message of the campaign (or the recipient)."""
    body = make_body(300, "probe", SENDER, rcpt, campaign)
    try:
        with smtplib.SMTP(engine.host, engine.port, timeout=10) as client:
            client.sendmail(SENDER, [rcpt], body)
    except (smtplib.SMTPDataError, smtplib.SMTPRecipientsRefused):
        return True
    return False


def test_engines_pause_and_suppression_through_a_hold_on_b(
        tmp_path: Path, dns_server: Any, route: Any, redis_server: Any) -> None:
    dest = route("dest.test", "127.0.0.2")
    a = start_node(tmp_path, "a", dns_server, dest.port, redis_server.url)
    b = start_node(tmp_path, "b", dns_server, dest.port, redis_server.url, workers=2)
    try:
        assert load(b, "spring", ["user0@dest.test"]) == 1
        mta(a, "campaign", "pause", "spring", "--account", "shop", "--reason", "checking")
        start = time.monotonic()
        assert wait_until(lambda: refused(b, "spring"), timeout=5, interval=0.02)
        assert wait_until(lambda: all(refused(b, "spring") for _ in range(6)), timeout=1.0)
        took = time.monotonic() - start  # both of b's workers refuse (probes spread)
        assert took < 1.5, f"paused on b after {took:.2f} s"
        assert mta(b, "campaign", "show", "spring")["status"] == "paused"
        mta(a, "suppression", "add", "shop", "gone@dest.test")
        assert wait_until(lambda: refused(b, "", "gone@dest.test"), timeout=3, interval=0.05)
        mta(a, "campaign", "resume", "spring", "--account", "shop")
        assert wait_until(lambda: not refused(b, "spring"), timeout=3, interval=0.05)
        api = f"http://{a.config['http']['listen']}/api/v1"  # the admin API on node A
        assert call(f"{api}/campaigns/shop/autumn/pause", "POST", body={})[0] == 200
        assert call(f"{api}/suppression/shop", "POST", body={"address": "api@dest.test"})[0] == 200
        assert wait_until(lambda: refused(b, "autumn") and refused(b, "", "api@dest.test"),
                          timeout=1.5, interval=0.05)
    finally:
        a.stop()
        b.stop()
    assert "user0@dest.test" in {r for m in dest.received for r in m.rcpt_tos}


def test_engines_pause_on_the_cluster_rate_and_notify_once(
        tmp_path: Path, dns_server: Any, route: Any, redis_server: Any) -> None:
    dest = route("dest.test", "127.0.0.2", SinkFaults(rcpt_rules=[
        (r"^bad", "550 5.1.1 <bad@dest.test>: Recipient address rejected: User unknown")]))
    shop = route("shop.test", "127.0.0.9")
    nodes = [start_node(tmp_path, name, dns_server, dest.port, redis_server.url,
                        min_volume=100) for name in ("a", "b")]
    try:
        for n, engine in enumerate(nodes):  # 10 % hard bounces, 60 sent on each node
            rcpts = [f"{'bad' if i % 10 == 5 else 'user'}{n}-{i}@dest.test" for i in range(60)]
            assert load(engine, "spread", rcpts) == 60
        paths = [tmp_path / "a", tmp_path / "b"]
        assert wait_until(lambda: any(events(p, "CampaignPaused", "spread") for p in paths),
                          timeout=30)
        assert wait_until(lambda: all(refused(e, "spread") for e in nodes), timeout=3)
        assert wait_until(lambda: notice_to_account(shop, "spread"), timeout=20)
        paused = [e for p in paths for e in events(p, "CampaignPaused", "spread")]
        assert paused[0]["base"] >= 100 and paused[0]["rule"] == "hard_bounce"
        assert sum(1 for e in paused if e["notice"]) == 1  # one notice for the cluster
    finally:
        for engine in nodes:
            engine.stop()
    for engine, path in zip(nodes, paths, strict=True):  # nothing lost: final or still queued
        accepted = len(events(path, "Reception", "spread"))
        assert accepted >= 60 and finals(path, "spread") + jobs_left(engine, "spread") == accepted
    notices = [m for m in shop.received if m.rcpt_tos == ("ops@shop.test",)]
    assert len(notices) == 1


def test_engines_share_a_monthly_cap(tmp_path: Path, dns_server: Any,
                                     redis_server: Any) -> None:
    capped = {**SHOP, "subscriber_level": 1}
    nodes = [start_node(tmp_path, name, dns_server, 9, redis_server.url, delivery=False,
                        account=capped, monthly_cap_factor=50) for name in ("a", "b")]
    try:
        async def both() -> list[Any]:
            return await asyncio.gather(*(run_load(
                e.host, e.port, lambda i, n=n: Submission(
                    SENDER, [f"u{n}-{i}@dest.test"],
                    make_body(300, "cap", SENDER, f"u{n}-{i}@dest.test", "cap")),
                40, sessions=4) for n, e in enumerate(nodes)))

        results = asyncio.run(both())
        assert sum(r.accepted for r in results) == 50
        assert all(r.accepted > 0 for r in results)
        for engine in nodes:  # each node's admin API shows the cluster's figure
            shown = mta(engine, "account", "show", "shop")
            assert (shown["month_sent"], shown["counted"]) == (50, "cluster"), shown
    finally:
        for engine in nodes:
            engine.stop()


def test_engines_ride_out_a_redis_restart(tmp_path: Path, dns_server: Any, route: Any,
                                          redis_server: Any) -> None:
    dest = route("dest.test", "127.0.0.2")
    nodes = [start_node(tmp_path, name, dns_server, dest.port, redis_server.url)
             for name in ("a", "b")]
    a, b = nodes
    paths = [tmp_path / "a", tmp_path / "b"]
    try:
        for n, engine in enumerate(nodes):
            assert load(engine, "run", [f"first{n}-{i}@dest.test" for i in range(50)]) == 50
        redis_server.stop()
        mta(a, "campaign", "pause", "later", "--account", "shop")
        mta(a, "suppression", "add", "shop", "late@dest.test")
        for n, engine in enumerate(nodes):  # both keep accepting and delivering
            assert load(engine, "run", [f"second{n}-{i}@dest.test" for i in range(50)]) == 50
        assert not refused(b, "later")  # b cannot know before Redis is back
        assert wait_until(lambda: all(finals(p, "run") > 50 for p in paths), timeout=20), \
            [finals(p, "run") for p in paths]  # delivering on local limits
        redis_server.start()
        assert wait_until(lambda: refused(b, "later"), timeout=8, interval=0.1)
        assert wait_until(lambda: refused(b, "", "late@dest.test"), timeout=3)
        assert wait_until(lambda: all(events(p, "PolicySync") for p in paths), timeout=5)
        assert wait_until(lambda: shared(redis_server, "run")[0] == 200, timeout=5), \
            shared(redis_server, "run")  # what was counted during the outage caught up
        assert wait_until(lambda: all(finals(p, "run") == 100 for p in paths), timeout=20), \
            [finals(p, "run") for p in paths]  # all delivered
        assert wait_until(lambda: shared(redis_server, "run")[1] == sum(
            finals(p, "run") for p in paths), timeout=5)  # every outcome counted once
    finally:
        for engine in nodes:
            engine.stop()
    done = sum(finals(p, "run") for p in paths)
    for engine, path in zip(nodes, paths, strict=True):  # nothing lost: final or in the spool
        outcomes = len(events(path, "Delivery")) + len(events(path, "Bounce"))
        assert outcomes + jobs_left(engine) == len(events(path, "Reception"))
    delivered = Counter(r for m in dest.received if m.accepted for r in m.rcpt_tos
                        if r.startswith(("first", "second")))  # not the probes
    assert set(delivered.values()) == {1} and len(delivered) == done


def jobs_left(engine: EngineProcess, campaign: str = "") -> int:
    """Jobs in a stopped node's spool (held, queued or deferred): all of them, or those of
    one campaign (not counting, say, the DSNs of its bounces)."""
    if not campaign:
        return int(mta(engine, "queue", "stats")["jobs"])
    row = mta(engine, "campaign", "show", campaign, "--account", "shop")
    return int(row["queued"]) + int(row["deferred"]) + int(row["held"])


def shared(server: Any, campaign: str) -> tuple[int, int]:
    totals = shared_counters(server, campaign_key("shop", campaign))
    return totals.submitted, totals.sent
