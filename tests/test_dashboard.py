"""The dashboard in headless Chromium (Selenium, the system chromium + chromedriver)."""

from __future__ import annotations

import re
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.policy.model import Counters
from mta.policy.store import PolicyStore, campaign_key
from mta.queue.spool import Spool
from tests.helpers.http import TOKEN, HttpEngine, call, start_http_engine

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (scripts/system-packages.sh)")
selenium = pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 20  # seconds, for the page to show what is expected


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1400,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def send(engine: HttpEngine, campaign: str, count: int, start: int = 0) -> None:
    with smtplib.SMTP(engine.host, engine.port) as client:
        for n in range(start, start + count):
            rcpt = f"u{n}@d{n % 3}.test"
            client.sendmail("a@shop.test", [rcpt],
                            f"From: a@shop.test\r\nTo: {rcpt}\r\nSubject: {n}\r\n"
                            f"X-Campaign-ID: {campaign}\r\n\r\nhello\r\n".encode())


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def number(driver: webdriver.Chrome, element_id: str) -> int:
    return int(text(driver, element_id).replace(",", ""))


def test_dashboard_shows_the_api_figures_and_resumes_a_paused_campaign_once_confirmed(
        tmp_path: Path, browser: webdriver.Chrome) -> None:
    engine = start_http_engine(tmp_path / "engine", workers=2)
    try:
        send(engine, "spring", 4)
        send(engine, "summer", 3, start=100)
        call(engine.url + "/api/v1/campaigns/default/summer/pause", "POST",
             body={"reason": "test"})
        browser.get(engine.url + "/")
        wait = WebDriverWait(browser, WAIT)
        wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        wait.until(lambda d: d.find_element(By.ID, "board").is_displayed()
                   and text(d, "received-total") == "7")

        assert not browser.find_element(By.ID, "login").is_displayed()
        api = call(engine.url + "/api/v1/dashboard")[1]
        assert number(browser, "received-total") == api["totals"]["received"] == 7
        assert number(browser, "queue-total") == api["queue"]["total"] == 7
        by_state = api["queue"]["by_state"]
        assert number(browser, "queue-held") == by_state.get("held", 0)
        assert number(browser, "queue-queued") == by_state.get("queued", 0)
        assert by_state.get("held", 0) + by_state.get("queued", 0) == 7
        assert number(browser, "queue-recipients") == api["queue"]["recipients"] == 7
        destinations = [row.text.split()[0] for row in
                        browser.find_elements(By.CSS_SELECTOR, "#destinations tbody tr")]
        assert destinations == [d["destination"] for d in api["destinations"]]
        spring = browser.find_element(By.CSS_SELECTOR, '#campaigns tr[data-campaign="default/spring"]')
        assert len(spring.find_elements(By.CSS_SELECTOR, "line.threshold")) == 3
        assert "8.00 %" in spring.text  # the hard-bounce threshold drawn and labelled
        assert sessionStorage_token(browser) == TOKEN

        send(engine, "spring", 2, start=200)  # the page refreshes by itself
        wait.until(lambda d: text(d, "received-total") == "9")

        paused_row = '#paused tr[data-campaign="default/summer"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, paused_row))
        browser.save_screenshot(str(tmp_path / "dashboard-paused.png"))
        # Resume and Drop ask first; Cancel changes nothing.
        for action in ("drop", "resume"):
            browser.find_element(By.CSS_SELECTOR, f"{paused_row} button.{action}").click()
            wait.until(lambda d: d.find_element(By.ID, "confirm").is_displayed())
            question = text(browser, "confirm-text")
            assert question.startswith(f"{action.title()} default/summer?"), question
            browser.find_element(By.ID, "confirm-cancel").click()
            wait.until(lambda d: not d.find_element(By.ID, "confirm").is_displayed())
        summer = call(engine.url + "/api/v1/campaigns/default/summer")[1]
        assert summer["paused"] and summer["held"] + summer["queued"] == 3
        browser.find_element(By.CSS_SELECTOR, f"{paused_row} button.resume").click()
        wait.until(lambda d: d.find_element(By.ID, "confirm").is_displayed())
        assert "judging it on the mail sent from now on" in text(browser, "confirm-text")
        browser.find_element(By.ID, "confirm-ok").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, paused_row))
        summer = call(engine.url + "/api/v1/campaigns/default/summer")[1]
        assert not summer["paused"] and summer["held"] == 0 and summer["queued"] == 3
        wait.until(lambda d: text(d, "queue-held") == "0")
        assert browser.find_element(By.ID, "no-paused").is_displayed()
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        engine.stop()


def sessionStorage_token(driver: webdriver.Chrome) -> str:  # noqa: N802
    return driver.execute_script("return sessionStorage.getItem('mta-admin-token');")


def log_in(driver: webdriver.Chrome, engine: HttpEngine) -> WebDriverWait:
    driver.get(engine.url + "/")
    wait = WebDriverWait(driver, WAIT)
    wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    return wait


def chart(driver: webdriver.Chrome, element_id: str) -> dict[str, str]:
    return driver.execute_script(
        f"return Object.assign({{}}, document.getElementById('{element_id}').dataset);")


def test_the_throughput_chart_comes_from_the_engine_and_survives_a_reload(
        tmp_path: Path, browser: webdriver.Chrome) -> None:
    engine = start_http_engine(tmp_path / "engine", workers=2)
    try:
        send(engine, "spring", 5)
        wait = log_in(browser, engine)
        wait.until(lambda d: chart(d, "chart-hour").get("received") == "5")
        browser.refresh()  # the page starts over; the history is the engine's
        wait.until(lambda d: d.execute_script("return document.body.dataset.updated"))
        hour = chart(browser, "chart-hour")
        assert hour["received"] == "5" and hour["delivered"] == hour["deferred"] == "0"
        ticks = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#chart-hour text.tick")]
        assert len(ticks) >= 5 and all(re.fullmatch(r"\d\d:\d\d", t) for t in ticks), ticks
        values = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#chart-hour text.value")]
        assert values[0] == "0.0/s" and all(v.endswith("/s") for v in values)  # from zero
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-day text.tick")
        assert text(browser, "chart-now").startswith("now (last 10 s): received ")
        assert text(browser, "received-rate") != "–"  # current values at once
        browser.save_screenshot(str(tmp_path / "dashboard-chart.png"))
    finally:
        engine.stop()


def test_rates_below_the_minimum_volume_are_drawn_as_not_judged_yet(
        tmp_path: Path, browser: webdriver.Chrome) -> None:
    spool = Spool(tmp_path / "engine" / "spool")
    store = PolicyStore(spool)
    with spool.env.begin(write=True) as txn:  # 10 % hard bounces: 10 sent, then 300
        store.put_counters(txn, campaign_key("default", "young"), Counters(sent=10, hard=1))
        store.put_counters(txn, campaign_key("default", "grown"),
                           Counters(sent=300, delivered=270, hard=30))
    spool.close()
    engine = start_http_engine(tmp_path / "engine")
    try:
        wait = log_in(browser, engine)
        young = '#campaigns tr[data-campaign="default/young"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, young))
        cells = browser.find_elements(By.CSS_SELECTOR, f"{young} td.rate")
        assert [c.get_attribute("data-judged") for c in cells] == ["no"] * 3
        assert cells[0].text == "10.00 % / 8.00 %"
        assert browser.find_element(By.CSS_SELECTOR, f"{young} td.state-ok").text == (
            "sending · judged after 200 sent")
        assert not browser.find_elements(By.CSS_SELECTOR, f"{young} rect.over")
        assert browser.find_elements(By.CSS_SELECTOR, f"{young} rect.pending")
        grown = '#campaigns tr[data-campaign="default/grown"]'
        assert browser.find_element(By.CSS_SELECTOR, f"{grown} td.rate").get_attribute(
            "data-judged") == "yes"
        assert browser.find_elements(By.CSS_SELECTOR, f"{grown} rect.over")  # judged: red
        browser.find_element(By.ID, "campaigns").screenshot(str(tmp_path / "campaigns.png"))
    finally:
        engine.stop()


def test_admin_api_off_and_engine_unreachable_read_differently(
        tmp_path: Path, browser: webdriver.Chrome) -> None:
    engine = start_http_engine(tmp_path / "engine", token="")
    try:
        wait = log_in(browser, engine)
        wait.until(lambda d: "admin API off" in text(d, "status"))
        assert "unreachable" not in text(browser, "status")
    finally:
        engine.stop()
    wait.until(lambda d: text(d, "status").startswith("engine unreachable"))


def test_campaign_page_shows_opens_clicks_and_top_links(tmp_path: Path,
                                                        browser: webdriver.Chrome) -> None:
    from mta.tracking.stats import apply_events

    spool = Spool(tmp_path / "engine" / "spool")
    store = PolicyStore(spool)
    link = "https://shop.test/<b>sale</b>"  # shown as text, never as markup
    events = [{"type": t, "account": "default", "campaign": "spring", "recipient": r,
               "class": c, "link": link if t == "Click" else ""}
              for t, r, c in (("Open", "a@d", "human"), ("Open", "b@d", "machine"),
                              ("Click", "a@d", "human"), ("Click", "b@d", "machine"))]
    with spool.env.begin(write=True) as txn:
        store.put_counters(txn, campaign_key("default", "spring"),
                           Counters(sent=4, delivered=4))
        apply_events(spool, txn, events)
    spool.close()
    engine = start_http_engine(tmp_path / "engine")
    try:
        wait = log_in(browser, engine)
        row = '#campaigns tr[data-campaign="default/spring"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
        cells = browser.find_elements(By.CSS_SELECTOR, f"{row} td")
        assert cells[-2].text == "1 · 25.00 %" and cells[-1].text == "1 · 25.00 %"
        browser.find_element(By.CSS_SELECTOR, f"{row} button.link").click()
        wait.until(lambda d: d.find_element(By.ID, "campaign-page").is_displayed())
        figures = text(browser, "campaign-figures")
        assert "unique opens (people) 1 25.00 %" in figures
        assert "clicks: human / machine 1 / 1" in figures
        links = browser.find_elements(By.CSS_SELECTOR, "#campaign-links tbody tr")
        assert [r.text for r in links] == [f"{link} 1 1"]
        assert not browser.find_elements(By.CSS_SELECTOR, "#campaign-links b")
        browser.find_element(By.ID, "campaign-close").click()
        wait.until(lambda d: not d.find_element(By.ID, "campaign-page").is_displayed())
    finally:
        engine.stop()
