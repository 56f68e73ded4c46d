"""`mta campaign|hold|suppression|account` as subprocesses against a real LMDB spool,
and a running guard honouring what the CLI wrote within a second."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from bench.engine_proc import read_events
from mta.config import load_config
from mta.policy.guard import PolicyGuard
from mta.policy.model import REVIEW, Counters, Suppression
from mta.policy.store import PolicyStore, account_key, campaign_key
from mta.queue.commit import GroupCommitter
from mta.queue.scheduler import Item
from mta.queue.spool import NewMessage, Spool

PROJECT = Path(__file__).resolve().parents[1]


def setup(tmp: Path, **policy: Any) -> Path:
    config = {
        "engine": {"event_log": str(tmp / "events.jsonl"), "audit_log": str(tmp / "audit.jsonl")},
        "spool": {"path": str(tmp / "spool"), "map_size": 256 * 1024**2},
        "policy": {"cache_ttl": 0.5, **policy},
        "accounts": [{"name": "shop", "email": "ops@shop.test", "subscriber_level": 10},
                     {"name": "trial", "email": "t@trial.test", "plan": "trial"},
                     {"name": "other"}],
    }
    path = tmp / "mta.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def mta(config: Path, *args: str, check: bool = True, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "mta", *args, "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=PROJECT,
                            input=stdin)
    if check:
        assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def mta_json(config: Path, *args: str) -> Any:
    return json.loads(mta(config, *args, "--json").stdout)


def store(spool: Spool, rcpts: list[str], account: str = "shop", campaign: str = "spring",
          due_in: float = 0.0, hold: str = "") -> str:
    message = NewMessage(sender="news@shop.test", recipients=rcpts, account=account,
                         campaign=campaign, data=b"Subject: x\r\n\r\nhi\r\n", hold=hold,
                         received=time.time() + due_in)
    spool.apply([spool.store_op(message)])
    return message.id


def seed(tmp: Path) -> dict[str, str]:
    """Counters for shop/spring, two of its messages (one not due yet), one of another."""
    spool = Spool(tmp / "spool", 256 * 1024**2)
    ps = PolicyStore(spool)
    with spool.env.begin(write=True) as txn:
        ps.put_counters(txn, campaign_key("shop", "spring"),
                        Counters(submitted=300, sent=250, delivered=240, hard=10))
        ps.put_counters(txn, account_key("shop"), Counters(submitted=300, sent=250))
        ps.put_counters(txn, campaign_key("other", "spring"), Counters(sent=5, delivered=5))
    ids = {"later": store(spool, ["a@x.test", "b@y.test"], due_in=3600),
           "now": store(spool, ["c@x.test"]),
           "summer": store(spool, ["d@x.test"], campaign="summer", due_in=3600)}
    spool.close()
    return ids


def events(tmp: Path, kind: str) -> list[dict[str, Any]]:
    return read_events(tmp / "events.jsonl", kind)


def held(tmp: Path) -> dict[str, str]:
    spool = Spool(tmp / "spool", readonly=True)
    try:
        with spool.read() as txn:
            return {k.decode(): v.decode() for k, v in txn.cursor(db=spool.dbs["held"])}
    finally:
        spool.close()


def test_campaign_pause_show_resume_drop(tmp_path: Path) -> None:
    config = setup(tmp_path)
    ids = seed(tmp_path)
    ambiguous = mta(config, "campaign", "pause", "spring", check=False)
    assert ambiguous.returncode == 2 and "other, shop" in ambiguous.stderr
    assert mta(config, "campaign", "show", "nope", check=False).returncode == 2
    paused = mta_json(config, "campaign", "pause", "spring", "--account", "shop",
                      "--reason", "list looks bought")
    assert paused == {"account": "shop", "campaign": "spring", "held": 2}
    assert held(tmp_path) == {f"{ids['later']}.0": "campaign:shop/spring",
                              f"{ids['later']}.1": "campaign:shop/spring"}
    shown = mta_json(config, "campaign", "show", "spring", "--account", "shop")
    assert shown["status"] == "paused" and shown["reason"] == "list looks bought"
    assert shown["held"] == 2 and shown["queued"] == 1
    assert shown["rates"]["hard_bounce"] == pytest.approx(0.04)
    assert shown["thresholds"]["hard_bounce"] == 0.08
    listing = mta_json(config, "campaign", "list")
    assert {(r["account"], r["campaign"], r["status"]) for r in listing} == {
        ("shop", "spring", "paused"), ("shop", "summer", "active"), ("other", "spring", "active")}
    table = mta(config, "campaign", "list").stdout
    assert "paused" in table and "4%" in table
    resumed = mta_json(config, "campaign", "resume", "spring", "--account", "shop")
    assert resumed["released"] == 2 and held(tmp_path) == {}
    mta(config, "campaign", "pause", "summer")
    dropped = mta_json(config, "campaign", "drop", "summer")
    assert dropped == {"account": "shop", "campaign": "summer", "jobs": 1, "recipients": 1}
    assert [(e["recipient"], e["campaign"]) for e in events(tmp_path, "Dropped")] == [
        ("d@x.test", "summer")]
    stats = json.loads(mta(config, "queue", "stats", "--json").stdout)
    assert stats["total"] == 2 and stats["jobs"] == 3
    assert mta_json(config, "campaign", "show", "summer")["status"] == "dropped"
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [a["action"] for a in audit] == ["campaign.pause", "campaign.resume",
                                            "campaign.pause", "campaign.drop"]


def test_suppression_add_list_remove_import_export(tmp_path: Path) -> None:
    config = setup(tmp_path)
    Spool(tmp_path / "spool").close()
    added = mta_json(config, "suppression", "add", "shop", "Bob@Dest.test",
                     "carol@dest.test")
    assert added["added"] == 2
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("address,reason,campaign\ndave@dest.test,unsubscribe,spring\n"
                      "bob@dest.test,import,\nnot-an-address,import,\n\n")
    result = mta(config, "suppression", "import", "shop", str(csv_in),
                 "--json", check=False)
    assert result.returncode == 1  # one invalid row, reported
    assert json.loads(result.stdout) == {"account": "shop", "added": 1, "existing": 1,
                                         "invalid": ["not-an-address"]}
    piped = mta(config, "suppression", "import", "other", "-", "--json",
                stdin="eve@dest.test\nfrank@dest.test,complaint\n")
    assert json.loads(piped.stdout)["added"] == 2
    rows = mta_json(config, "suppression", "list", "shop")
    assert [(r["address"], r["reason"]) for r in rows] == [
        ("bob@dest.test", "manual"), ("carol@dest.test", "manual"),
        ("dave@dest.test", "unsubscribe")]
    removed = mta_json(config, "suppression", "remove", "shop", "carol@dest.test",
                       "zed@dest.test")
    assert removed["removed"] == 1 and removed["not_listed"] == ["zed@dest.test"]
    out = tmp_path / "out.csv"
    mta(config, "suppression", "export", "shop", str(out))
    exported = out.read_text().splitlines()
    assert exported[0] == "address,reason,campaign,created,detail"
    assert [line.split(",")[:3] for line in exported[1:]] == [
        ["bob@dest.test", "manual", ""], ["dave@dest.test", "unsubscribe", "spring"]]
    # The export imports back unchanged into another account.
    mta(config, "suppression", "import", "trial", str(out))
    assert [r["address"] for r in mta_json(config, "suppression", "list", "trial")
            ] == ["bob@dest.test", "dave@dest.test"]
    assert mta(config, "suppression", "export", "other").stdout.count("\n") == 3


def test_hold_list_release_reject(tmp_path: Path) -> None:
    config = setup(tmp_path)
    spool = Spool(tmp_path / "spool", 256 * 1024**2)
    first = store(spool, ["a@x.test", "b@y.test"], account="trial", campaign="", hold=REVIEW)
    second = store(spool, ["c@x.test"], account="trial", campaign="", hold=REVIEW)
    paused = store(spool, ["d@x.test"], hold="campaign:shop/spring")
    spool.close()
    listing = mta_json(config, "hold", "list", "--reason", "review")
    assert {r["id"]: sorted(r["recipients"]) for r in listing} == {
        first: ["a@x.test", "b@y.test"], second: ["c@x.test"]}
    assert {r["id"]: r["reason"] for r in mta_json(config, "hold", "list")} == {
        first: "review", second: "review", paused: "campaign:shop/spring"}  # every reason
    assert mta_json(config, "hold", "release", first) == {"id": first, "released": 2}
    assert not any(k.startswith(first) for k in held(tmp_path))
    assert mta(config, "hold", "release", paused, check=False).returncode == 2  # not for review
    rejected = mta_json(config, "hold", "reject", second)
    assert rejected == {"id": second, "jobs": 1, "recipients": 1}
    assert [e["recipient"] for e in events(tmp_path, "Rejected")] == ["c@x.test"]
    assert mta(config, "hold", "reject", second, check=False).returncode == 2
    assert set(held(tmp_path)) == {f"{paused}.0"}
    stats = json.loads(mta(config, "queue", "stats", "--json").stdout)
    assert stats["total"] == 2


def test_account_suspend_resume_delete_purge(tmp_path: Path) -> None:
    config = setup(tmp_path, retention_days=0.0)
    ids = seed(tmp_path)
    spool = Spool(tmp_path / "spool", 256 * 1024**2)
    policy_store = PolicyStore(spool)  # opens its databases: never inside a write transaction
    with spool.env.begin(write=True) as txn:
        policy_store.put_suppression(txn, "shop", Suppression("x@dest.test", "manual"))
    spool.close()
    (tmp_path / "events.jsonl").write_text(
        '{"type":"Delivery","account":"shop","recipient":"a@x.test"}\n'
        '{"type":"Delivery","account":"other","recipient":"b@x.test"}\n')
    suspended = mta_json(config, "account", "suspend", "shop", "--reason", "unpaid")
    assert suspended["held"] == 3  # the jobs not due yet; due ones are held at dispatch
    rows = {r["name"]: r for r in mta_json(config, "account", "list")}
    assert rows["shop"]["status"] == "suspended" and rows["shop"]["monthly_cap"] == 1090
    assert rows["trial"]["plan"] == "trial" and rows["trial"]["status"] == "active"
    shown = mta_json(config, "account", "show", "shop")
    assert shown["reason"] == "unpaid" and shown["suppressed"] == 1
    assert {c["campaign"] for c in shown["campaigns"]} == {"spring"}
    assert mta_json(config, "account", "resume", "shop")["released"] == 3
    deleted = mta_json(config, "account", "delete", "shop")
    assert deleted["purge_after"] <= time.time() + 1
    purged = mta_json(config, "account", "purge", "--settle", "0")
    assert len(purged) == 1 and purged[0]["account"] == "shop"
    assert purged[0]["suppressions"] == 1 and purged[0]["jobs"] == 4
    assert purged[0]["event_lines"] >= 1
    log_lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert not [e for e in log_lines if e.get("account") == "shop"]
    assert [e["type"] for e in log_lines if e.get("account") == "other"] == ["Delivery"]
    assert [e["purged_account"] for e in log_lines if e["type"] == "AccountPurged"] == ["shop"]
    assert mta_json(config, "account", "purge") == []
    assert mta_json(config, "suppression", "list", "shop") == []
    assert mta_json(config, "campaign", "list", "--account", "shop") == []
    stats = json.loads(mta(config, "queue", "stats", "--json").stdout)
    assert stats["total"] == 0 and ids  # the seeded mail went with the account


def test_hash_password_and_missing_spool(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mta", "account", "hash-password", "--stdin"],
                            input="s3cret\n", capture_output=True, text=True, timeout=60,
                            cwd=PROJECT)
    assert result.returncode == 0 and result.stdout.startswith("scrypt$")
    from mta.smtp.auth import PasswordChecker

    assert PasswordChecker({"a": result.stdout.strip()}).check("a", b"s3cret")
    config = setup(tmp_path)
    for args in (("campaign", "list"), ("hold", "list"), ("account", "suspend", "shop"),
                 ("suppression", "list", "shop")):
        missing = mta(config, *args, check=False)
        assert missing.returncode == 2 and "no spool" in missing.stderr


@pytest.mark.asyncio
async def test_a_running_guard_honours_the_cli_within_a_second(tmp_path: Path) -> None:
    config = setup(tmp_path)
    ids = seed(tmp_path)
    cfg = load_config(config)
    spool = Spool(cfg.spool.path, cfg.spool.map_size)
    committer = GroupCommitter(spool)
    committer.start()
    guard = PolicyGuard(cfg, spool, committer)
    await guard.start()
    try:
        with spool.read() as txn:
            message = spool.get_message(txn, ids["now"])
            job_id = f"{ids['now']}.0".encode()
            job = spool.get_job(txn, job_id)
            assert job is not None
            item = Item(job, message, time.time())
        new = NewMessage("n@shop.test", ["z@x.test"], b"", "shop", "spring")
        assert guard.holds.hold_reason(item) is None and guard.check_message(new) is None
        await asyncio.to_thread(mta, config, "campaign", "pause", "spring", "--account", "shop")
        decided = time.monotonic()
        while guard.holds.hold_reason(item) is None and time.monotonic() - decided < 3:
            await asyncio.sleep(0.02)
        assert time.monotonic() - decided <= 1.0
        assert guard.holds.hold_reason(item) == "campaign:shop/spring"
        reply = guard.check_message(new)
        assert reply is not None and reply.startswith("550 5.7.1 Campaign spring")
        assert "list" not in reply and "paused by an operator" in reply
        await asyncio.to_thread(mta, config, "suppression", "add", "shop",
                                "z@x.test")
        assert guard.check_rcpt("shop", "z@x.test") is not None  # read fresh, no cache
        await asyncio.to_thread(mta, config, "campaign", "resume", "spring", "--account", "shop")
        decided = time.monotonic()
        while guard.holds.hold_reason(item) is not None and time.monotonic() - decided < 3:
            await asyncio.sleep(0.02)
        assert guard.holds.hold_reason(item) is None and time.monotonic() - decided <= 1.0
    finally:
        await guard.close()
        await committer.close()
        spool.close()
