"""`mta queue|campaign|hold|suppression|account|throttle` through a running engine's admin
API, and on the spool when the engine is stopped (or with --offline): the same JSON."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from bench.net import free_port
from mta.audit import read_audit
from mta.smtp.auth import hash_password
from tests.helpers.http import HttpEngine, start_http_engine
from tests.test_http_api import message

PROJECT = Path(__file__).resolve().parents[1]
ALICE = "alice-token-abcdefghijklmnop"
READS = [
    ("queue", "stats"), ("queue", "list"), ("campaign", "list"),
    ("campaign", "show", "spring"), ("campaign", "list", "--account", "shop"),
    ("hold", "list"), ("hold", "list", "--reason", "review"), ("suppression", "list", "shop"),
    ("account", "list"), ("account", "show", "shop"), ("throttle", "status"),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpEngine]:
    tmp = tmp_path_factory.mktemp("cli-api")
    e = start_http_engine(
        tmp, workers=1, http={"operator_tokens": {"alice": ALICE}},
        accounts=[{"name": "shop", "password_hash": hash_password("pw"), "email": "o@shop.test",
                   "plan": "trial", "subscriber_level": 500}])
    with smtplib.SMTP(e.host, e.port) as client:  # unauthenticated: account "default"
        for n, campaign in enumerate(["spring"] * 3 + ["autumn"] * 2):
            client.sendmail("a@shop.test", [f"u{n}@dest.test"], message(n, campaign))
    with smtplib.SMTP(e.host, e.port) as client:  # a trial account's mail: held for review
        client.login("shop", "pw")
        for n in (10, 11, 12):
            client.sendmail("a@shop.test", [f"u{n}@dest.test", f"v{n}@dest.test"],
                            message(n, "winter"))
    yield e
    e.stop()


def mta(e: HttpEngine, *args: str, config: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MTA_ADMIN_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "mta", *args, "--config", str(config or e.config_path)],
        capture_output=True, text=True, timeout=60, cwd=PROJECT, env=env)
    assert "Traceback" not in result.stderr
    return result


def mta_json(e: HttpEngine, *args: str, config: Path | None = None) -> Any:
    result = mta(e, *args, "--json", config=config)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return steady(json.loads(result.stdout))


def steady(data: Any) -> Any:
    """Without what changes by itself (the age of throttle snapshots)."""
    if isinstance(data, list):
        return [steady(x) for x in data]
    if isinstance(data, dict):
        return {k: steady(v) for k, v in data.items() if k not in ("age", "stale")}
    return data


def audit(e: HttpEngine, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(e.config["engine"]["audit_log"], limit=100_000)
            if r["type"] == kind]


def api_paths(e: HttpEngine) -> list[str]:
    return [r["path"].partition("?")[0] for r in audit(e, "access") if r["identity"] == "admin"]


def held_ids(e: HttpEngine) -> list[str]:
    return [r["id"] for r in mta_json(e, "hold", "list", "--offline")]


def test_actions_go_through_the_api(engine: HttpEngine) -> None:
    e = engine
    paused = mta_json(e, "campaign", "pause", "spring", "--reason", "bought list")
    assert paused == {"account": "default", "campaign": "spring", "held": 0}  # due: held later
    assert mta_json(e, "campaign", "show", "spring")["status"] == "paused"
    resumed = mta_json(e, "campaign", "resume", "spring")
    assert resumed["released"] == 0 and resumed["was"] == "paused"
    assert mta_json(e, "campaign", "drop", "autumn") == {
        "account": "default", "campaign": "autumn", "jobs": 2, "recipients": 2}
    added = mta(e, "suppression", "add", "shop", "X@Dest.test", "not-an-address",
                "--json")
    assert added.returncode == 1 and json.loads(added.stdout) == {
        "account": "shop", "added": 1, "existing": 0, "invalid": ["not-an-address"]}
    assert mta_json(e, "suppression", "remove", "shop", "x@dest.test",
                    "zed@dest.test") == {"account": "shop", "removed": 1,
                                         "not_listed": ["zed@dest.test"]}
    first, second, _ = held_ids(e)
    assert mta_json(e, "hold", "release", first) == {"id": first, "released": 1}
    assert mta_json(e, "hold", "reject", second) == {"id": second, "jobs": 1, "recipients": 2}
    assert mta_json(e, "account", "suspend", "shop", "--reason", "unpaid") == {
        "account": "shop", "held": 0}
    assert mta_json(e, "account", "resume", "shop")["was"] == "suspended"
    actions = [(r["action"], r["object"], r["identity"], r["client"])
               for r in audit(e, "action")]
    for action, obj in [("campaign.pause", "default/spring"), ("campaign.resume",
                        "default/spring"), ("campaign.drop", "default/autumn"),
                        ("suppression.add", "shop/X@Dest.test"), ("held.release", f"{first}.0"),
                        ("held.reject", f"{second}.0"), ("account.suspend", "shop"),
                        ("account.resume", "shop")]:
        assert (action, obj, "admin", "127.0.0.1") in actions, action
    left = held_ids(e)
    assert len(left) == 1 and first not in left and second not in left


def test_errors_are_one_line(engine: HttpEngine) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    for args in [("queue", "stats", "--url", closed), ("queue", "show", "NOPE"),
                 ("hold", "list", "--token", "wrong-token"),
                 ("campaign", "pause", "nope", "--url", closed, "--token", "t"),
                 ("queue", "stats", "--offline", "--url", engine.url)]:
        result = mta(engine, *args)
        assert result.returncode == 2 and result.stdout == "", args
        assert len(result.stderr.splitlines()) == 1, (args, result.stderr)
    assert "cannot reach the engine" in mta(engine, "queue", "stats", "--url", closed).stderr
    assert "HTTP 401" in mta(engine, "hold", "list", "--token", "wrong-token").stderr
    assert "HTTP 404" in mta(engine, "queue", "show", "NOPE").stderr
    for args in (("suppression", "list", "nobody"), ("account", "show", "nobody"),
                 ("campaign", "list", "--account", "nobody")):  # through the API, as offline
        assert mta(engine, *args).stderr == "mta: HTTP 404: no account 'nobody'\n", args


def test_reads_agree_on_both_paths_and_fall_back_when_stopped(
        engine: HttpEngine, tmp_path: Path) -> None:
    e = engine
    before = len(api_paths(e))
    online = {args: mta_json(e, *args) for args in READS}
    used = set(api_paths(e)[before:])
    assert {"/api/v1/queue", "/api/v1/messages", "/api/v1/campaigns", "/api/v1/held",
            "/api/v1/suppression/shop", "/api/v1/accounts/shop", "/api/v1/throttle"} <= used
    assert online[("hold", "list")] and online[("account", "show", "shop")]["campaigns"]
    some = online[("queue", "list")][0]["id"]
    online["show"] = mta_json(e, "queue", "show", some)
    assert mta_json(e, "queue", "show", some, "--url", e.url, "--token", ALICE) == online["show"]
    assert any(r["identity"] == "alice" for r in audit(e, "access"))

    before = len(api_paths(e))
    for args in READS:  # --offline: the spool, not the API, the same JSON
        assert mta_json(e, *args, "--offline") == online[args], args
    no_token = tmp_path / "no-token.toml"
    no_token.write_text(tomli_w.dumps(e.config | {"http": e.config["http"] | {
        "admin_token": "", "operator_tokens": {}}}))
    assert mta_json(e, "hold", "list", config=no_token) == online[("hold", "list")]
    assert len(api_paths(e)) == before  # neither asked the API

    e.stop()  # connection refused: the spool directly, silently
    for args in READS:
        assert mta_json(e, *args) == online[args], args
    assert mta_json(e, "queue", "show", some) == online["show"]
    gone = mta(e, "queue", "stats", "--url", e.url)
    assert gone.returncode == 2 and "cannot reach the engine" in gone.stderr
