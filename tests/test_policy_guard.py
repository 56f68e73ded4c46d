"""The policy guard in a worker, on a real LMDB spool with the real group committer:
counting, pausing, notices, holds, suppression, caps, unsubscribes, transforms, purge."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mta.address import Address
from mta.bounce import BounceResult
from mta.config import (
    AccountConfig,
    BounceConfig,
    Config,
    DeliveryConfig,
    EngineConfig,
    HttpConfig,
    PolicyConfig,
    SpoolConfig,
)
from mta.delivery.deliverer import envelopes
from mta.policy import operations
from mta.policy.guard import InvalidUnsubscribe, PolicyGuard
from mta.policy.model import REVIEW, campaign_hold
from mta.policy.store import campaign_key
from mta.policy.tokens import make_token
from mta.queue.commit import GroupCommitter
from mta.queue.jobs import HoldResult, Job, Recipient, message_jobs
from mta.queue.scheduler import Item, Scheduler
from mta.queue.spool import NewMessage, Spool

ACCOUNTS = [
    AccountConfig(name="shop", email="ops@shop.test", plan="standard", subscriber_level=100),
    AccountConfig(name="tiny", email="tiny@shop.test", plan="standard", subscriber_level=1),
    AccountConfig(name="trial", email="t@trial.test", plan="trial"),
    AccountConfig(name="vip", email="vip@vip.test", plan="pro"),
]


@dataclass
class Env:
    tmp: Path
    cfg: Config
    spool: Spool
    guard: PolicyGuard
    events: list[dict[str, Any]] = field(default_factory=list)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def store(self, rcpts: list[str], account: str = "shop", campaign: str = "spring",
              due_in: float = 0.0, hold: str = "") -> NewMessage:
        message = NewMessage(sender="news@shop.test", recipients=rcpts, account=account,
                             campaign=campaign, data=b"Subject: x\r\n\r\nhi\r\n", hold=hold,
                             received=time.time() + due_in)
        assert self.spool.apply([self.spool.store_op(message)]) == [message.id]
        return message

    def items(self, message_id: str) -> list[Item]:
        with self.spool.read() as txn:
            message = self.spool.get_message(txn, message_id)
            assert message is not None
            return [Item(job, message, time.time())
                    for job in message_jobs(self.spool, txn, message_id)]

    async def hold(self, item: Item, reason: str) -> bool:
        """The scheduler's hold, with the guard as its hold check: True if held."""
        scheduler = Scheduler(self.spool, self.guard.committer, DeliveryConfig(), 0, 1,
                              on_outcome=lambda item, outcome: None,
                              build_dsn=lambda message, failed, expired: None,
                              hold_check=self.guard.holds)
        return await scheduler.hold(item, reason) == HoldResult.HELD

    def held(self) -> dict[bytes, str]:
        with self.spool.read() as txn:
            return {bytes(k): bytes(v).decode() for k, v in
                    txn.cursor(db=self.spool.dbs["held"])}

    def outcome(self, kind: str, rcpt: str, campaign: str = "spring", account: str = "shop",
                code: int = 250, status: str = "2.0.0", reply: str = "ok") -> None:
        self.guard.on_event({"type": kind, "id": "M", "account": account, "campaign": campaign,
                             "domain": rcpt.split("@")[1], "attempt": 1, "recipient": rcpt,
                             "mx": "mx", "code": code, "status": status, "reply": reply})

    def deliveries(self, n: int, start: int = 0, campaign: str = "spring") -> None:
        for i in range(start, start + n):
            self.outcome("Delivery", f"user{i}@dest.test", campaign)

    def hard_bounces(self, n: int, start: int = 0, campaign: str = "spring") -> None:
        for i in range(start, start + n):
            self.outcome("Bounce", f"gone{i}@dest.test", campaign, code=550, status="5.1.1",
                         reply="5.1.1 <gone@dest.test>: Recipient address rejected: User unknown")

    def counters(self, account: str = "shop", campaign: str = "spring") -> dict[str, int]:
        with self.spool.read() as txn:
            return self.guard.store.get_counters(txn, campaign_key(account, campaign)).as_dict()


def guard_config(tmp: Path, name: str = "spool", log: str = "events.jsonl",
                 **policy: Any) -> Config:
    return Config(engine=EngineConfig(event_log=str(tmp / log), hostname="mta.test"),
                  spool=SpoolConfig(path=str(tmp / name), map_size=256 * 1024**2),
                  http=HttpConfig(public_url="https://mta.test"),
                  bounce=BounceConfig(domain="bounces.mta.test"),
                  policy=PolicyConfig(**policy), accounts=list(ACCOUNTS))


@asynccontextmanager
async def guard_env(tmp: Path, **policy: Any) -> AsyncIterator[Env]:
    cfg = guard_config(tmp, **policy)
    spool = Spool(cfg.spool.path, cfg.spool.map_size)
    committer = GroupCommitter(spool)
    committer.start()
    env = Env(tmp, cfg, spool, None)  # type: ignore[arg-type]
    env.guard = PolicyGuard(cfg, spool, committer, emit=env.events.append)
    await env.guard.start()
    try:
        yield env
    finally:
        await env.guard.close()
        await committer.close()
        spool.close()


# --- rates and pauses ------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_hard_bounces_pause_after_the_minimum_volume_with_notice(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        env.deliveries(180)
        env.hard_bounces(19)  # 199 sent, 9.5 %: below the minimum volume
        await g.flush()
        assert env.counters()["sent"] == 199 and env.counters()["hard"] == 19
        assert not env.of_type("CampaignPaused")
        assert g.check_message(NewMessage("a@shop.test", ["x@y.test"], b"", "shop",
                                          "spring")) is None
        env.hard_bounces(1, start=19)  # 200 sent, 10 %
        await g.flush()
        paused = env.of_type("CampaignPaused")
        assert len(paused) == 1 and paused[0]["rule"] == "hard_bounce"
        assert paused[0]["rate"] == 10.0 and paused[0]["threshold"] == 8.0
        assert g.metrics()["pauses"] == 1
        reply = g.check_message(NewMessage("a@shop.test", ["x@y.test"], b"", "shop", "spring"))
        assert reply is not None and reply.startswith("550 5.7.1 Campaign spring of account shop")
        assert "10%" in reply and "threshold of 8%" in reply
        other = NewMessage("a@shop.test", ["x@y.test"], b"", "shop", "summer")
        assert g.check_message(other) is None  # other campaigns go on
        with env.spool.read() as txn:
            notice = env.spool.get_message(txn, paused[0]["notice"])
        assert notice is not None
        assert notice["rcpts"] == ["ops@shop.test"] and notice["from"] == ""
        assert notice["campaign"] == "" and notice["account"] == "" and notice["notice"]
        assert b"Campaign spring paused" in notice["data"]
        assert b"10% (20 of 200 sent)" in notice["data"]
        # The bounced addresses are on the account's suppression list.
        refusal = g.check_rcpt("shop", "Gone3@dest.test")
        assert refusal is not None and refusal.startswith("550 5.7.1 <gone3@dest.test>")
        assert "hard bounce" in refusal and "shop" in refusal
        assert g.check_rcpt("shop", "user3@dest.test") is None
        assert g.check_rcpt("other", "gone3@dest.test") is None  # lists are per account


@pytest.mark.asyncio
async def test_pause_holds_waiting_jobs_and_due_ones_at_dispatch(tmp_path: Path) -> None:
    async with guard_env(tmp_path, min_volume=10) as env:
        g = env.guard
        later = env.store(["a@later.test", "b@other.test"], due_in=3600)
        now = env.store(["c@now.test"])
        summer = env.store(["d@now.test"], campaign="summer", due_in=3600)
        env.hard_bounces(10)
        await g.flush()
        reason = campaign_hold("shop", "spring")
        held = env.held()
        assert sorted(held) == sorted(i.job_id for i in env.items(later.id))
        assert set(held.values()) == {reason}
        item = env.items(now.id)[0]
        assert item.job_id not in held and g.holds.hold_reason(item) == reason
        assert await env.hold(item, reason) and env.held()[item.job_id] == reason
        assert not await env.hold(item, reason)  # already held
        assert g.holds.hold_reason(env.items(summer.id)[0]) is None
        notice = env.of_type("CampaignPaused")[0]["notice"]
        assert g.holds.hold_reason(env.items(notice)[0]) is None  # the notice is never held


@pytest.mark.asyncio
async def test_resume_releases_held_mail_and_the_guard_judges_a_fresh_window(
        tmp_path: Path) -> None:
    async with guard_env(tmp_path, min_volume=10) as env:
        g = env.guard
        later = env.store(["a@later.test"], due_in=3600)
        env.hard_bounces(10)
        await g.flush()
        assert env.held()
        result = await g.committer.submit(lambda txn: operations.resume_campaign(
            g.store, txn, "shop", "spring", "test", time.time()))
        g.refresh()
        assert result["released"] == 1 and result["guard"] and not env.held()
        with env.spool.read() as txn:
            job = env.spool.get_job(txn, env.items(later.id)[0].job_id)
        assert job is not None and job.next_ms <= int(time.time() * 1000) and not job.held
        assert g.check_message(NewMessage("a@shop.test", ["x@y.test"], b"", "shop",
                                          "spring")) is None
        # It keeps bouncing: below min_volume more sent, not judged yet ...
        env.hard_bounces(9, start=10)
        await g.flush()
        assert len(env.of_type("CampaignPaused")) == 1
        with env.spool.read() as txn:
            row = operations.show_campaign(g.store, txn, "shop", "spring", g.thresholds)
        assert (row["guard"], row["judged"], row["window_sent"]) == (True, False, 9)
        # ... and paused again once min_volume more were sent.
        env.hard_bounces(1, start=19)
        await g.flush()
        assert len(env.of_type("CampaignPaused")) == 2


@pytest.mark.asyncio
async def test_a_resume_with_no_guard_keeps_it_sending_and_says_so(tmp_path: Path) -> None:
    async with guard_env(tmp_path, min_volume=10) as env:
        g = env.guard
        env.hard_bounces(10)
        await g.flush()
        await g.committer.submit(lambda txn: operations.resume_campaign(
            g.store, txn, "shop", "spring", "test", time.time(), no_guard="list re-verified"))
        env.hard_bounces(30, start=10)
        await g.flush()
        assert len(env.of_type("CampaignPaused")) == 1
        with env.spool.read() as txn:
            [row] = operations.list_campaigns(g.store, txn, g.thresholds)
        assert (row["status"], row["guard"], row["no_guard"]) == (
            "active", False, "list re-verified")


@pytest.mark.asyncio
async def test_soft_bounces_and_deferrals_do_not_pause(tmp_path: Path) -> None:
    async with guard_env(tmp_path, min_volume=10) as env:
        for i in range(30):
            env.outcome("Bounce", f"full{i}@dest.test", code=552, status="5.2.2",
                        reply="5.2.2 Mailbox full")
            env.outcome("TransientFailure", f"later{i}@dest.test", code=451, status="4.3.0")
        await env.guard.flush()
        counters = env.counters()
        assert counters["soft"] == 30 and counters["hard"] == 0 and counters["sent"] == 30
        assert not env.of_type("CampaignPaused")
        assert env.guard.check_rcpt("shop", "full1@dest.test") is None


@pytest.mark.asyncio
async def test_complaints_pause_above_half_a_percent(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        env.deliveries(1000)
        await g.flush()
        for i in range(6):
            kind = g.record_bounce(BounceResult(kind="complaint", reason="feedback",
                                                recipient=f"user{i}@dest.test",
                                                feedback_type="abuse"), campaign="spring")
            assert kind == "complaint"
        g.record_event("complaint", "shop", "spring", "user0@dest.test")  # the same again
        await g.flush()
        assert env.counters()["complaints"] == 6
        paused = env.of_type("CampaignPaused")
        assert len(paused) == 1 and paused[0]["rule"] == "complaint"
        assert paused[0]["rate"] == 0.6 and paused[0]["threshold"] == 0.5
        reply = g.check_rcpt("shop", "user2@dest.test")
        assert reply is not None and "complaint" in reply


@pytest.mark.asyncio
async def test_unsubscribes_suppress_count_once_and_pause(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        env.deliveries(1000)
        await g.flush()
        for i in range(10):
            result = await g.unsubscribe(g.token_for("shop", "spring", f"user{i}@dest.test"))
            assert result.counted and result.recipient == f"user{i}@dest.test"
        again = await g.unsubscribe(g.token_for("shop", "spring", "user0@dest.test"))
        assert not again.counted
        assert env.counters()["unsubscribes"] == 10 and not env.of_type("CampaignPaused")
        reply = g.check_rcpt("shop", "USER3@dest.test")
        assert reply is not None and "unsubscribed" in reply
        token = g.token_for("shop", "spring", "user10@dest.test")
        by_mail = await g.unsubscribes.unsubscribe_mail(f"unsubscribe {token}",
                                                        "unsubscribe@bounces.mta.test")
        assert by_mail.counted and by_mail.recipient == "user10@dest.test"
        paused = env.of_type("CampaignPaused")
        assert len(paused) == 1 and paused[0]["rule"] == "unsubscribe"
        assert paused[0]["rate"] == 1.1
        assert len(env.of_type("Unsubscribe")) == 12


@pytest.mark.asyncio
async def test_forged_or_altered_tokens_are_refused(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        good = g.token_for("shop", "spring", "bob@dest.test")
        forged = make_token(b"not the engine's key", "shop", "spring", "bob@dest.test")
        altered = good[:5] + ("A" if good[5] != "A" else "B") + good[6:]
        for token in (forged, altered, "", "garbage", good + "x"):
            with pytest.raises(InvalidUnsubscribe):
                await g.unsubscribe(token)
        with pytest.raises(InvalidUnsubscribe):
            await g.unsubscribes.unsubscribe_mail("please unsubscribe me",
                                                  "unsubscribe@bounces.mta.test")
        assert g.check_rcpt("shop", "bob@dest.test") is None
        assert env.counters()["unsubscribes"] == 0 and g.metrics()["forged_tokens"] == 6


@pytest.mark.asyncio
async def test_unsubscribe_key_is_shared_through_the_spool(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        token = env.guard.token_for("shop", "spring", "bob@dest.test")
    async with guard_env(tmp_path) as env:  # a restart (or another worker) reads the same key
        assert (await env.guard.unsubscribe(token)).counted


# --- trial and monthly limits ---------------------------------------------------------------

def reception(env: Env, account: str, count: int, message: NewMessage | None = None) -> None:
    env.guard.on_event({"type": "Reception", "id": message.id if message else "X",
                        "account": account, "campaign": "", "recipients": count,
                        "time": time.time()})


@pytest.mark.asyncio
async def test_trial_mail_is_held_for_review_and_capped_at_100(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        sender = Address("a", "trial.test")
        first = NewMessage("a@trial.test", [f"r{i}@dest.test" for i in range(60)], b"", "trial")
        assert g.check_message(first) is None and first.hold == REVIEW
        second = NewMessage("a@trial.test", [f"s{i}@dest.test" for i in range(41)], b"", "trial")
        reply = g.check_message(second)  # 60 reserved + 41 > 100, before any commit
        assert reply is not None and reply.startswith("550 5.7.1 Trial account trial")
        assert "100" in reply
        reception(env, "trial", 60, first)
        await g.flush()
        third = NewMessage("a@trial.test", [f"t{i}@dest.test" for i in range(40)], b"", "trial")
        assert g.check_message(third) is None and third.hold == REVIEW
        reception(env, "trial", 40, third)
        await g.flush()
        assert g.usage("trial", time.strftime("%Y-%m", time.gmtime()))[0] == 100
        reply = g.check_mail("trial", sender)
        assert reply is not None and reply.startswith("550 5.7.1") and "100" in reply
        standard = NewMessage("a@shop.test", ["x@dest.test"], b"", "shop")
        assert g.check_message(standard) is None and standard.hold == ""


@pytest.mark.asyncio
async def test_monthly_cap_is_109_times_the_subscriber_level(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        sender = Address("a", "shop.test")
        reception(env, "tiny", 100)
        await g.flush()
        too_many = NewMessage("a@shop.test", [f"r{i}@dest.test" for i in range(10)], b"", "tiny")
        reply = g.check_message(too_many)
        assert reply is not None and reply.startswith("452 4.7.1 Monthly limit reached")
        assert "109" in reply and "subscriber level 1" in reply
        assert g.check_mail("tiny", sender) is None  # 100 of 109: room for one
        reception(env, "tiny", 9)
        reply = g.check_mail("tiny", sender)  # counted before it is written
        assert reply is not None and reply.startswith("452 4.7.1")
        assert g.check_mail("shop", sender) is None  # another account's cap
        assert g.check_mail("default", sender) is None  # not configured: no cap


# --- accounts ----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_suspended_account_is_refused_and_held(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        waiting = env.store(["a@later.test"], due_in=3600)
        due = env.store(["b@now.test"])
        result = await g.committer.submit(lambda txn: operations.suspend_account(
            g.store, txn, "shop", "test", "unpaid", time.time()))
        assert result["held"] == 1
        g.refresh()
        reply = g.check_mail("shop", Address("a", "shop.test"))
        assert reply == "550 5.7.1 Account shop is suspended: unpaid"
        assert g.holds.hold_reason(env.items(due.id)[0]) == "account:shop"
        assert env.held() == {env.items(waiting.id)[0].job_id: "account:shop"}
        await g.committer.submit(lambda txn: operations.resume_account(
            g.store, txn, "shop", "test", time.time()))
        g.refresh()
        assert g.check_mail("shop", Address("a", "shop.test")) is None and not env.held()


# --- transforms -----------------------------------------------------------------------------------

def item_for(account: str, campaign: str, rcpts: list[str], **extra: Any) -> Item:
    message = {"id": "M1", "from": "news@shop.test", "account": account, "campaign": campaign,
               "data": b"From: news@shop.test\r\nSubject: hi\r\n\r\nhello\r\n", **extra}
    job = Job(b"M1.0", "M1", "dest.test", account, campaign, [Recipient(r) for r in rcpts])
    return Item(job, message, time.time())


@pytest.mark.asyncio
async def test_transform_adds_footer_and_list_unsubscribe(tmp_path: Path) -> None:
    async with guard_env(tmp_path, footer_text="Email Marketing by Test") as env:
        g = env.guard
        item = item_for("shop", "spring", ["bob@dest.test"])
        sender, data = g.transform(item, ["bob@dest.test"], "news@shop.test",
                                   item.message["data"])
        assert sender == "news@shop.test"
        token = g.token_for("shop", "spring", "bob@dest.test")
        # The branding, then the visible link with the same token as List-Unsubscribe.
        assert data.endswith(b"hello\r\n\r\nEmail Marketing by Test\r\n"
                             + f"Unsubscribe: https://mta.test/unsubscribe/{token}\r\n".encode())
        assert f"<https://mta.test/unsubscribe/{token}>".encode() in data
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in data
        assert (await g.unsubscribe(token)).recipient == "bob@dest.test"
        # A pro account: no footer; mail without a campaign: no List-Unsubscribe.
        _, pro = g.transform(item_for("vip", "launch", ["a@d.test"]), ["a@d.test"],
                             "n@vip.test", item.message["data"])
        assert b"Email Marketing" not in pro and b"List-Unsubscribe:" in pro
        vip_token = g.token_for("vip", "launch", "a@d.test")
        assert pro.endswith(f"Unsubscribe: https://mta.test/unsubscribe/{vip_token}\r\n".encode())
        # A placeholder in the content takes the link where the customer put it.
        placed = item_for("vip", "launch", ["a@d.test"])
        body = b"From: n@vip.test\r\n\r\nhello\r\nLeave: {{unsubscribe_url}}\r\n"
        _, out = g.transform(placed, ["a@d.test"], "n@vip.test", body)
        assert out.endswith(f"Leave: https://mta.test/unsubscribe/{vip_token}\r\n".encode())
        assert b"{{unsubscribe_url}}" not in out and out.count(vip_token.encode()) == 3
        _, plain = g.transform(item_for("vip", "", ["a@d.test"]), ["a@d.test"],
                               "n@vip.test", item.message["data"])
        assert plain == item.message["data"]
        # Notices and DSNs are the engine's own mail: left alone.
        for extra in ({"notice": "CampaignPaused"}, {"dsn_for": "X"}):
            own = item_for("shop", "spring", ["a@d.test"], **extra)
            assert g.transform(own, ["a@d.test"], "", own.message["data"])[1] == (
                own.message["data"])
        # Each recipient of a job with several gets a copy with a link of its own.
        several = item_for("shop", "spring", ["a@d.test", "b@d.test"])
        assert envelopes(several) == [["a@d.test"], ["b@d.test"]]
        _, for_b = g.transform(several, ["b@d.test"], "news@shop.test", item.message["data"])
        assert g.token_for("shop", "spring", "b@d.test") in for_b.decode()


# --- retention ------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_deleted_account_is_purged_after_its_retention(tmp_path: Path) -> None:
    async with guard_env(tmp_path, retention_days=0.0) as env:
        g = env.guard
        log = tmp_path / "events.jsonl"
        lines = [{"type": "Delivery", "account": "shop", "recipient": "a@dest.test"},
                 {"type": "Delivery", "account": "tiny", "recipient": "b@dest.test"},
                 {"type": "Reception", "account": "shop", "recipients": 1}]
        log.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
        rotated = tmp_path / "events.jsonl.1"
        rotated.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[1]) + "\n")
        env.hard_bounces(3)
        env.deliveries(2, campaign="other")
        await g.flush()
        kept = env.store(["x@dest.test"], account="tiny", due_in=3600)
        gone = env.store(["y@dest.test"], due_in=3600)
        with g.store.spool.env.begin(write=True) as txn:  # feedback counted about both
            for message in (kept, gone):
                assert g.store.first_feedback(txn, message.id, "r@dest.test", "hard", 0.0)
        await g.committer.submit(lambda txn: operations.delete_account(
            g.store, txn, "shop", "test", time.time(), 0.0))
        g.refresh()
        assert g.check_mail("shop", Address("a", "shop.test")) is not None
        reports = await g.purge_due(settle=0.0)
        assert [r.account for r in reports] == ["shop"]
        report = reports[0]
        assert report.suppressions == 3 and report.jobs == 1 and report.event_lines == 3
        assert report.counters >= 3  # two campaigns and the account
        assert g.check_rcpt("shop", "gone0@dest.test") is None
        assert env.counters() == env.counters("nobody")  # all zero
        assert [json.loads(x)["account"] for x in log.read_text().splitlines()[:1]] == ["tiny"]
        assert log.read_text().splitlines()[1] == "not json"
        assert "shop" not in rotated.read_text() and "tiny" in rotated.read_text()
        assert env.items(kept.id)  # another account's mail stays
        assert report.sent_records == 1  # who its mail went to, and feedback about it
        with g.store.spool.env.begin(write=True) as txn:
            assert g.store.spool.sent_origin(txn, gone.id) is None
            assert g.store.spool.sent_origin(txn, kept.id) is not None
            assert g.store.first_feedback(txn, gone.id, "r@dest.test", "hard", 0.0)
            assert not g.store.first_feedback(txn, kept.id, "r@dest.test", "hard", 0.0)
        assert await g.purge_due(settle=0.0) == []  # once only
        assert g.check_mail("shop", Address("a", "shop.test")) is not None


@pytest.mark.asyncio
async def test_counting_survives_many_events_in_few_commits(tmp_path: Path) -> None:
    async with guard_env(tmp_path, flush_interval=0.05) as env:
        commits = env.guard.committer.commits
        env.deliveries(500)
        env.hard_bounces(5)
        for _ in range(100):
            if env.counters()["sent"] == 505:
                break
            await asyncio.sleep(0.05)
        assert env.counters()["sent"] == 505 and env.counters()["delivered"] == 500
        assert env.guard.committer.commits - commits <= 3


# --- the inbound path --------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_inbound_reports_feed_counters_and_suppression(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        env.deliveries(10)
        await g.flush()
        base = {"source": "async", "id": "M", "campaign": "spring", "status": "5.1.1"}
        g.on_event({"type": "Bounce", "kind": "hard", "reason": "userunknown", "account": "shop",
                    "recipient": "user1@dest.test", **base})
        g.on_event({"type": "Bounce", "kind": "soft", "reason": "mailboxfull", "account": "shop",
                    "recipient": "user2@dest.test", **base})
        # An ARF report whose account the inbound path could not tell: found by campaign.
        g.on_event({"type": "Complaint", "kind": "complaint", "account": "",
                    "recipient": "user3@dest.test", **base})
        g.on_event({"type": "Unsubscribe", "kind": "complaint", "account": "shop",
                    "feedback_type": "opt-out", "recipient": "user4@dest.test", **base})
        g.on_event({"type": "Unsubscribe", "account": "shop", "campaign": "spring",
                    "recipient": "user5@dest.test", "via": "one-click"})  # our own: ignored
        g.on_event({"type": "AutoReply", "account": "shop", "recipient": "user6@dest.test",
                    **base})
        await g.flush()
        counters = env.counters()
        assert counters == {"submitted": 0, "sent": 10, "delivered": 10, "hard": 1, "soft": 1,
                            "complaints": 1, "unsubscribes": 1}
        for rcpt, word in (("user1", "hard bounce"), ("user3", "complaint"),
                           ("user4", "unsubscribed")):
            reply = g.check_rcpt("shop", f"{rcpt}@dest.test")
            assert reply is not None and word in reply
        for rcpt in ("user2", "user5", "user6"):
            assert g.check_rcpt("shop", f"{rcpt}@dest.test") is None


@pytest.mark.asyncio
async def test_unsubscribe_mailbox_acts_only_for_the_token_s_recipient(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        token = g.token_for("shop", "spring", "bob@dest.test")
        # From: names someone else: anyone can write it, so it is never who unsubscribes.
        mail = (f"From: Eve <Eve@Dest.test>\r\nTo: unsubscribe@bounces.mta.test\r\n"
                f"Subject: unsubscribe {token}\r\n\r\n\r\n").encode()
        code, text = await g.unsubscribe_mailbox("unsubscribe@bounces.mta.test", mail)
        assert code == 250 and "bob@dest.test unsubscribed" in text
        assert g.check_rcpt("shop", "bob@dest.test") is not None
        assert g.check_rcpt("shop", "eve@dest.test") is None
        forged = mail.replace(token[-4:].encode(), b"AAAA" if token[-4:] != "AAAA" else b"BBBB")
        code, text = await g.unsubscribe_mailbox("unsubscribe@bounces.mta.test", forged)
        assert code == 250 and "ignored" in text
        assert env.counters()["unsubscribes"] == 1


@pytest.mark.asyncio
async def test_a_lifted_pause_is_not_applied_from_a_stale_cache(tmp_path: Path) -> None:
    async with guard_env(tmp_path, cache_ttl=1.0) as env:
        g = env.guard
        message = env.store(["a@now.test"])
        await g.committer.submit(lambda txn: operations.pause_campaign(
            g.store, txn, "shop", "spring", "test", "", time.time()))
        g.refresh()
        item = env.items(message.id)[0]
        reason = g.holds.hold_reason(item)
        assert reason == "campaign:shop/spring"
        # Another process resumes; this worker's copy still says paused.
        await g.committer.submit(lambda txn: operations.resume_campaign(
            g.store, txn, "shop", "spring", "other", time.time()))
        assert g.holds.hold_reason(item) == reason
        assert not await env.hold(item, reason)
        assert env.held() == {} and g.holds.hold_reason(item) is None


# --- the admin API's port ------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_guard_admin_serves_the_admin_api_port(tmp_path: Path) -> None:
    from mta.http.guard_operations import GuardOperations
    from mta.http.operations import InvalidToken, NotFound, PolicyOperations

    async with guard_env(tmp_path) as env:
        g = env.guard
        port = GuardOperations(g)
        assert isinstance(port, PolicyOperations)
        assert port.thresholds() == {"hard_bounce": 0.08, "complaint": 0.005,
                                     "unsubscribe": 0.01, "min_volume": 200}
        later = env.store(["a@later.test"], due_in=3600)
        env.deliveries(4)
        env.hard_bounces(1)
        await g.flush()
        row = await port.campaign("shop", "spring")
        assert (row["sent"], row["delivered"], row["hard_bounces"], row["queued"]) == (5, 4, 1, 1)
        assert row["rates"]["hard_bounce"] == pytest.approx(0.2) and not row["paused"]
        with pytest.raises(NotFound):
            await port.campaign("shop", "nothing")
        paused = await port.pause_campaign("shop", "spring", "checking the list")
        assert paused["paused"] and paused["held"] == 1 and paused["reason"] == "checking the list"
        assert g.holds.hold_reason(env.items(later.id)[0]) == "campaign:shop/spring"  # at once
        assert [r["campaign"] for r in await port.campaigns()] == ["spring"]
        held = await port.held(10)
        assert [h["job"] for h in held] == [f"{later.id}.0"]
        assert (await port.resume_campaign("shop", "spring"))["held"] == 0
        assert (await port.drop_campaign("shop", "spring"))["dropped"] == 1
        assert [e["recipient"] for e in env.of_type("Dropped")] == ["a@later.test"]
        review = env.store(["r@dest.test"], account="trial", hold=REVIEW)
        assert (await port.release_held(f"{review.id}.0"))["released"]
        with pytest.raises(NotFound):
            await port.reject_held(f"{review.id}.0")
        assert (await port.suppress("shop", "X@Dest.test", ""))["added"]
        assert [r["address"] for r in await port.suppressions("shop", 10)] == [
            "gone0@dest.test", "x@dest.test"]
        assert (await port.unsuppress("shop", "x@dest.test"))["removed"]
        with pytest.raises(NotFound):
            await port.unsuppress("shop", "x@dest.test")
        suspended = await port.suspend_account("shop", "unpaid")
        assert suspended["suspended"] and suspended["reason"] == "unpaid"
        assert g.check_mail("shop", Address("a", "shop.test")) is not None
        assert not (await port.resume_account("shop"))["suspended"]
        names = [a["name"] for a in await port.accounts()]
        assert names == ["shop", "tiny", "trial", "vip"]
        with pytest.raises(NotFound):
            await port.account("nobody")
        token = g.token_for("shop", "spring", "bob@dest.test")
        assert (await port.unsubscribe(token))["recipient"] == "bob@dest.test"
        with pytest.raises(InvalidToken):
            await port.unsubscribe(token[:-2] + ("yy" if token.endswith("xx") else "xx"))
