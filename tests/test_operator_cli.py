"""The `mta` commands as an operator meets them: where the config is found, one rule for
relative paths, one syntax and one wording per condition, resumes that keep the guard on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from bench.engine_proc import PROJECT_ROOT
from bench.net import free_port
from mta.policy.model import PAUSED, CampaignState, Counters
from mta.policy.store import PolicyStore, campaign_key
from mta.queue.jobs import message_jobs
from mta.queue.outcome import RcptResult, apply_attempt
from mta.queue.spool import NewMessage, Spool

ACCOUNTS = [{"name": "shop", "email": "ops@shop.test"}]


def run(*args: str, cwd: Path = PROJECT_ROOT, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True,
                            text=True, cwd=cwd, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), **(env or {})))
    assert "Traceback" not in result.stderr, result.stderr
    return result


def as_json(*args: str, **kw: Any) -> Any:
    result = run(*args, "--json", **kw)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_config(directory: Path, **sections: Any) -> Path:
    """A config with relative paths only: they are relative to this file's directory."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"engine": {"event_log": "events.jsonl", "audit_log": "audit.jsonl"},
              "spool": {"path": "spool", "map_size": 256 * 1024**2},
              "http": {"enabled": False}, "accounts": ACCOUNTS, **sections}
    path = directory / "mta.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def spool_with(path: Path, *messages: NewMessage) -> list[str]:
    spool = Spool(path, 256 * 1024**2)
    try:
        spool.apply([spool.store_op(m) for m in messages])
        return [m.id for m in messages]
    finally:
        spool.close()


def message(campaign: str = "spring", rcpts: tuple[str, ...] = ("a@dest.test",)) -> NewMessage:
    return NewMessage("news@shop.test", list(rcpts), b"Subject: x\r\n\r\nhi\r\n", "shop",
                      campaign, received=time.time())


# --- where the config is, and what its relative paths mean ------------------------------------

def test_mta_config_and_the_search_order_with_paths_relative_to_the_config(
        tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    config = write_config(conf, throttle={"shaping_file": "shaping.toml"})
    shutil.copy(PROJECT_ROOT / "config" / "shaping.toml", conf / "shaping.toml")
    [queued] = spool_with(conf / "spool", message())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"MTA_CONFIG": str(config)}
    listed = as_json("queue", "list", cwd=elsewhere, env=env)
    assert [m["id"] for m in listed] == [queued]  # conf/spool, not elsewhere/spool
    checked = run("throttle", "check", cwd=elsewhere, env=env)
    assert checked.returncode == 0, checked.stderr  # conf/shaping.toml, as `mta serve` finds it
    assert not (elsewhere / "spool").exists()
    # No --config and no MTA_CONFIG: ./config/mta.toml of the current directory.
    project = tmp_path / "project"
    write_config(project / "config")
    spool_with(project / "config" / "spool", message(), message())
    assert as_json("queue", "stats", cwd=project)["total"] == 2
    assert as_json("queue", "stats", "--config", str(config), cwd=project)["total"] == 1
    if not Path("/etc/mta/mta.toml").exists():
        nothing = run("queue", "stats", cwd=elsewhere)
        assert nothing.returncode == 2 and nothing.stderr.splitlines() == [
            "mta: config error: no config file: pass --config, set MTA_CONFIG, or create "
            "config/mta.toml or /etc/mta/mta.toml"]


def test_the_shipped_config_says_the_rule_and_keeps_var_in_the_project() -> None:
    from mta.config import load_config

    text = (PROJECT_ROOT / "config" / "mta.toml").read_text()
    assert "relative to the directory of the config file" in text
    cfg = load_config(PROJECT_ROOT / "config" / "mta.toml")
    assert cfg.spool.path == str(PROJECT_ROOT / "var" / "spool")
    assert cfg.throttle.shaping_file == str(PROJECT_ROOT / "config" / "shaping.toml")


# --- one syntax, one wording ----------------------------------------------------------------

def test_suppression_takes_the_account_as_the_readme_writes_it(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    spool_with(tmp_path / "spool")
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "mta suppression list|add|remove|import|export ACCOUNT" in readme
    added = as_json("suppression", "add", "shop", "Bob@Dest.test", "--config", str(config))
    assert added["added"] == 1
    rows = as_json("suppression", "list", "shop", "--config", str(config))
    assert [r["address"] for r in rows] == ["bob@dest.test"]
    exported = run("suppression", "export", "shop", "--config", str(config))
    assert exported.stdout.splitlines()[1].startswith("bob@dest.test,")


@pytest.mark.parametrize("args", [
    ("suppression", "list", "nobody"), ("suppression", "add", "nobody", "x@dest.test"),
    ("suppression", "export", "nobody"), ("account", "show", "nobody"),
    ("account", "suspend", "nobody"), ("campaign", "list", "--account", "nobody"),
    ("hold", "list", "--account", "nobody")])
def test_an_unknown_account_is_the_same_error_everywhere(tmp_path: Path,
                                                         args: tuple[str, ...]) -> None:
    config = write_config(tmp_path)
    spool_with(tmp_path / "spool", message())
    result = run(*args, "--config", str(config))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == ["mta: no account 'nobody'"]


def test_connection_refused_reads_the_same_from_queue_and_admin() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    queue = run("queue", "stats", "--url", url, "--token", "t")
    admin = run("admin", "queue", "--url", url, "--token", "t")
    assert queue.returncode == admin.returncode == 2
    assert queue.stderr == admin.stderr == (
        f"mta: cannot reach the engine at {url}: connection refused\n")


# --- what the commands show ------------------------------------------------------------------

def test_hold_list_shows_every_held_job_with_its_reason(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    review, paused = spool_with(tmp_path / "spool",
                                NewMessage("a@shop.test", ["x@dest.test"], b"\r\n", "shop", "",
                                           hold="review"),
                                NewMessage("a@shop.test", ["y@dest.test"], b"\r\n", "shop",
                                           "spring", hold="campaign:shop/spring"))
    listed = {r["id"]: r["reason"] for r in as_json("hold", "list", "--config", str(config))}
    assert listed == {review: "review", paused: "campaign:shop/spring"}
    only = as_json("hold", "list", "--reason", "campaign:shop/spring", "--config", str(config))
    assert [r["id"] for r in only] == [paused]
    table = run("hold", "list", "--config", str(config)).stdout
    assert "campaign:shop/spring" in table and "review" in table


def test_queue_show_gives_the_whole_reply_and_the_state_queue_stats_counts(
        tmp_path: Path) -> None:
    config = write_config(tmp_path)
    [mid] = spool_with(tmp_path / "spool", message(rcpts=("a@dest.test", "b@dest.test")))
    reply = ("4.7.28 Our system has detected an unusual rate of unsolicited mail originating "
             "from your IP address; to protect our users, please try again later.")
    spool = Spool(tmp_path / "spool", 256 * 1024**2)
    with spool.env.begin(write=True) as txn:
        [job] = message_jobs(spool, txn, mid)
        before, now_ms = job.next_ms, int(time.time() * 1000)
        attempt = apply_attempt(job, [RcptResult("a@dest.test", 451, reply),
                                      RcptResult("b@dest.test", 250, "2.0.0 ok")],
                                now_ms, now_ms, 86400.0, (300.0, 3600.0, 0.0))
        job.next_ms = attempt.next_attempt_ms or now_ms
        spool.save_attempt(txn, job, before)
    spool.close()
    assert as_json("queue", "stats", "--config", str(config))["by_state"] == {"deferred": 1}
    shown = run("queue", "show", mid, "--config", str(config)).stdout
    [line_a] = [line for line in shown.splitlines() if line.startswith("a@dest.test")]
    [line_b] = [line for line in shown.splitlines() if line.startswith("b@dest.test")]
    assert line_a.split()[1] == "deferred" and line_a.endswith(reply)
    assert line_b.split()[1] == "delivered"


# --- resumes keep the guard on; --no-guard is explicit and visible --------------------------

def paused_campaign(tmp_path: Path) -> Path:
    config = write_config(tmp_path)
    spool = Spool(tmp_path / "spool", 256 * 1024**2)
    store = PolicyStore(spool)
    with spool.env.begin(write=True) as txn:
        store.put_counters(txn, campaign_key("shop", "spring"), Counters(sent=300, hard=30))
        store.put_campaign(txn, "shop", "spring", CampaignState(
            status=PAUSED, rule="hard_bounce", reason="hard bounce rate 10%", by="policy"))
    spool.close()
    return config


def test_a_resume_keeps_the_guard_judging_a_fresh_window(tmp_path: Path) -> None:
    config = paused_campaign(tmp_path)
    resumed = as_json("campaign", "resume", "spring", "--config", str(config))
    assert resumed["guard"] is True and resumed["was"] == "paused"
    [row] = as_json("campaign", "list", "--config", str(config))
    assert (row["status"], row["guard"], row["judged"], row["window_sent"]) == (
        "active", True, False, 0)
    table = run("campaign", "list", "--config", str(config)).stdout
    assert "judged after 200 sent (0 so far)" in table
    assert "guard     judged after 200 sent (0 so far)" in run(
        "campaign", "show", "spring", "--config", str(config)).stdout


def test_no_guard_needs_a_reason_and_shows_in_listings_and_the_audit_log(
        tmp_path: Path) -> None:
    config = paused_campaign(tmp_path)
    empty = run("campaign", "resume", "spring", "--no-guard", " ", "--config", str(config))
    assert empty.returncode == 2 and "--no-guard needs the reason" in empty.stderr
    resumed = as_json("campaign", "resume", "spring", "--no-guard", "list re-verified by hand",
                      "--config", str(config))
    assert resumed["guard"] is False
    [row] = as_json("campaign", "list", "--config", str(config))
    assert (row["guard"], row["no_guard"]) == (False, "list re-verified by hand")
    for args in (("campaign", "list"), ("campaign", "show", "spring"),
                 ("account", "show", "shop")):
        assert "off: list re-verified by hand" in run(*args, "--config", str(config)).stdout
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    [record] = [r for r in audit if r.get("action") == "campaign.resume"]
    assert record["object"] == "shop/spring" and record["no_guard"] == "list re-verified by hand"
