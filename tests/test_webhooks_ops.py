"""The operators' side of the event outbox: dead letters and their replay (`mta webhook`,
the admin API), the outbox's limits as a log line, a metric and a dashboard panel."""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bench.engine_proc import PROJECT_ROOT
from bench.net import free_port
from bench.rig.webhook import WebhookReceiver
from tests.helpers.engine import wait_until
from tests.helpers.http import TOKEN, HttpEngine, call, start_http_engine

SECRET = "s3cret-for-the-webhook-tests"


def send(engine: HttpEngine, count: int) -> None:
    with smtplib.SMTP(engine.host, engine.port) as client:
        for n in range(count):
            client.sendmail("a@shop.test", [f"u{n}@d.test"],
                            f"From: a@shop.test\r\nTo: u{n}@d.test\r\nSubject: {n}\r\n"
                            f"X-Campaign-ID: spring\r\n\r\nhello\r\n".encode())


def mta(engine: HttpEngine, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", *args, "--config",
                           str(engine.config_path)], capture_output=True, text=True,
                          timeout=60, cwd=PROJECT_ROOT, check=check)


def status(engine: HttpEngine, *flags: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(mta(engine, "webhook", "status", "--json", *flags).stdout)
    return {row["name"]: row for row in rows}


@pytest.fixture
def refusing():
    """A receiver that answers 500 until told otherwise."""
    with WebhookReceiver(SECRET.encode(), script=[500] * 10_000) as server:
        yield server


def engine_with_sinks(tmp: Path, refusing: WebhookReceiver) -> HttpEngine:
    closed = f"http://127.0.0.1:{free_port()}/events"  # nothing listens there
    return start_http_engine(
        tmp, webhooks=[
            {"name": "app", "url": refusing.url, "secret": SECRET, "events": ["Reception"],
             "max_age": 1.0, "batch_wait": 0.1, "timeout": 2.0},
            {"name": "stuck", "url": closed, "secret": SECRET, "batch_wait": 0.1}],
        outbox={"retry_initial": 0.1, "retry_max": 0.2, "alert_depth": 2})


def test_dead_letters_are_listed_and_replayed_with_their_ids(tmp_path, refusing) -> None:
    engine = engine_with_sinks(tmp_path, refusing)
    try:
        send(engine, 5)
        assert wait_until(lambda: status(engine)["app"]["dead"] == 5, timeout=30)
        dead = json.loads(mta(engine, "webhook", "dead", "app", "--json").stdout)
        assert [d["type"] for d in dead] == ["Reception"] * 5
        assert all(d["reason"] == "HTTP 500" for d in dead)
        table = mta(engine, "webhook", "dead", "app").stdout
        assert "HTTP 500" in table and dead[0]["id"] in table
        # the admin API shows the same, and needs the token like the rest of it
        assert call(engine.url + "/api/v1/webhooks", token=None)[0] == 401
        code, listed, _ = call(engine.url + "/api/v1/webhooks/app/dead")
        assert code == 200 and [d["id"] for d in listed["dead"]] == [d["id"] for d in dead]
        assert call(engine.url + "/api/v1/webhooks/nosuch/dead")[0] == 404
        assert call(engine.url + "/api/v1/webhooks/nosuch/replay", "POST")[0] == 404
        refusing.script.clear()
        replay = json.loads(mta(engine, "webhook", "replay", "app", "--json").stdout)
        assert replay == {"sink": "app", "replayed": 5}
        assert wait_until(lambda: refusing.unique_ids() == {d["id"] for d in dead}, timeout=30)
        assert status(engine)["app"]["dead"] == 0
        assert all(r.verified for r in refusing.accepted())
        schema = json.loads((PROJECT_ROOT / "config" / "event-schema.json").read_text())
        for event in refusing.events():
            jsonschema.validate(event, schema)
        audit = (tmp_path / "audit.jsonl").read_text()
        assert "webhook.replay" in audit
        failed = mta(engine, "webhook", "replay", "nosuch", check=False)
        assert failed.returncode == 2 and "no sink named 'nosuch'" in failed.stderr
    finally:
        engine.stop()
    # with the engine stopped, the spool answers directly (offline)
    offline = status(engine)
    assert offline["stuck"]["pending"] >= 5 and "delivered" not in offline["stuck"]


def test_an_outbox_past_its_limits_is_logged_measured_and_shown(tmp_path, refusing) -> None:
    engine = engine_with_sinks(tmp_path, refusing)
    try:
        send(engine, 5)
        assert wait_until(lambda: status(engine)["stuck"]["pending"] >= 5, timeout=30)

        def metrics() -> str:
            return call(engine.url + "/metrics", token=None)[1]

        assert wait_until(lambda: "mta_outbox_over_limit 1.0" in metrics(), timeout=30)
        text = metrics()
        assert 'mta_outbox_sink_pending{sink="stuck"}' in text
        assert wait_until(lambda: "outbox over its limit" in engine.log_text(), timeout=30)
        board = call(engine.url + "/api/v1/dashboard")[1]["webhooks"]
        assert board["outbox"]["over_limit"] is True
        assert {s["name"] for s in board["sinks"]} == {"app", "stuck"}
        assert SECRET not in json.dumps(board) and SECRET not in engine.log_text()
        assert SECRET not in mta(engine, "webhook", "status").stdout
        one = json.loads(mta(engine, "webhook", "status", "stuck", "--json").stdout)
        assert [row["name"] for row in one] == ["stuck"]
        assert mta(engine, "webhook", "status", "nosuch", check=False).returncode == 2
        if shutil.which("/usr/bin/chromium") and shutil.which("/usr/bin/chromedriver"):
            dashboard_panel(engine, tmp_path)
    finally:
        engine.stop()


def dashboard_panel(engine: HttpEngine, tmp_path: Path) -> None:
    """The dashboard's panel in headless Chromium: the sinks, the alert."""
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(engine.url + "/")
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        wait.until(lambda d: d.find_element(By.ID, "webhooks-panel").is_displayed())
        wait.until(lambda d: d.find_element(By.ID, "outbox-alert").is_displayed())
        rows = {r.text.split()[0]: r.text for r in
                driver.find_elements(By.CSS_SELECTOR, "#webhooks tbody tr")}
        assert set(rows) == {"app", "stuck"}
        assert "Cannot connect" in rows["stuck"] or "Connect" in rows["stuck"]
        assert "past its limits" in driver.find_element(By.ID, "outbox-alert").text
        driver.save_screenshot(str(tmp_path / "dashboard-webhooks.png"))
    finally:
        driver.quit()


def test_without_a_sink_nothing_is_written_to_the_outbox(tmp_path) -> None:
    from bench.engine_proc import read_events
    from mta.outbox import store
    from mta.queue.spool import Spool

    engine = start_http_engine(tmp_path)
    try:
        send(engine, 3)
        assert wait_until(lambda: len(read_events(tmp_path / "events.jsonl", "Reception")) == 3,
                          timeout=30)
        assert json.loads(mta(engine, "webhook", "status", "--json").stdout) == []
        assert "mta_outbox_events" not in call(engine.url + "/metrics", token=None)[1]
    finally:
        engine.stop()
    assert not any("event_id" in e for e in read_events(tmp_path / "events.jsonl"))
    spool = Spool(tmp_path / "spool", readonly=True)
    try:
        with spool.read() as txn:
            assert store.figures(spool, txn, 0.0).depth == 0
    finally:
        spool.close()


def test_an_operators_pause_is_recorded_with_the_pause_itself(tmp_path) -> None:
    from bench.engine_proc import read_events

    with WebhookReceiver(SECRET.encode()) as receiver:
        engine = start_http_engine(tmp_path, webhooks=[
            {"name": "app", "url": receiver.url, "secret": SECRET, "batch_wait": 0.1,
             "events": ["CampaignPaused", "CampaignResumed"]}])
        try:
            send(engine, 2)
            for action in ("pause", "resume"):
                code, _, _ = call(engine.url + f"/api/v1/campaigns/default/spring/{action}",
                                  "POST", body={"reason": "test"})
                assert code == 200
            assert wait_until(lambda: len(receiver.unique_ids()) == 2, timeout=30)
        finally:
            engine.stop()
        paused, resumed = sorted(receiver.events(), key=lambda e: e["id"])
        assert (paused["type"], paused["rule"], paused["campaign"], paused["reason"]) == (
            "CampaignPaused", "operator", "spring", "test")
        assert resumed["type"] == "CampaignResumed" and resumed["campaign"] == "spring"
        # the log's lines carry the ids given in the change's own transaction
        logged = {e["event_id"] for e in read_events(tmp_path / "events.jsonl")
                  if e["type"] in ("CampaignPaused", "CampaignResumed")}
        assert logged == receiver.unique_ids()
