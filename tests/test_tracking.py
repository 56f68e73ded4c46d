"""The visible unsubscribe link, click and open tracking, end to end: a real engine, a
real DNS server and a recording sink on loopback, the public endpoints over HTTP.

- a campaign message with a text part and an HTML part holding three links arrives with
  each link rewritten, the pixel in place, the recipient's unsubscribe link visible in
  both parts and a DKIM signature that verifies; a pro account gets the link without the
  branding; an account with tracking off gets the link and no tracking;
- a rewritten link answers 302 to the original, an altered, foreign or made-up token
  404, the pixel a GIF; each genuine request is one event, classed human or machine.
"""

from __future__ import annotations

import email
import json
import re
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.policy import SMTP, default
from pathlib import Path
from typing import Any

import pytest

from bench.engine_proc import PROJECT_ROOT, EngineProcess, read_events
from mta.tracking.classify import Bursts, Hit, classify
from mta.tracking.hits import kept_address
from mta.tracking.tokens import CLICK, OPEN, TrackTarget, make_token, read_token
from tests.helpers.dkim import dkimpy_results, write_key
from tests.helpers.engine import engine_config, wait_until

LINKS = ["https://shop.test/a", "https://shop.test/b?x=1&y=2", "http://other.test/c"]
BROWSER = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/120.0 Safari/537.36")
GOOGLE_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"


def newsletter(recipient: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "news@shop.test"
    msg["To"] = recipient
    msg["Subject"] = "Spring"
    msg["X-Campaign-ID"] = "spring"
    msg.set_content("Hello,\nsee https://shop.test/a.\nmail: mailto:help@shop.test\n")
    anchors = "".join(f'<p><a href="{u.replace("&", "&amp;")}">link {i}</a></p>'
                      for i, u in enumerate(LINKS))
    msg.add_alternative(f'<html><body>{anchors}<a href="mailto:help@shop.test">help</a>'
                        "</body></html>\n", subtype="html")
    return msg.as_bytes(policy=SMTP)


def start(tmp: Path, dns: Any, sink: Any, key: Any, plan: str = "standard",
          tracking: bool = True) -> EngineProcess:
    dns.add_mx("dest.test", [(10, "mx.dest.test")])
    dns.add_a("mx.dest.test", "127.0.0.2")
    config = engine_config(
        tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True},
        dkim={"keys": [{"domain": "shop.test", "selector": "s1",
                        "key_file": key.config.key_file}]},
        smtp={"trusted_account": "shop"}, tracking={"scanner_window": 4.0},
        accounts=[{"name": "shop", "email": "ops@shop.test", "plan": plan,
                   "tracking": tracking}])
    config["http"]["public_url"] = f"http://{config['http']['listen']}"
    return EngineProcess(tmp, config, workers=1).start()


def send(engine: EngineProcess, sink: Any, rcpts: list[str]) -> list[bytes]:
    with smtplib.SMTP(engine.host, engine.port) as client:
        for rcpt in rcpts:
            client.sendmail("news@shop.test", [rcpt], newsletter(rcpt))
    assert wait_until(lambda: sink.accepted == len(rcpts), timeout=15)
    return [m.data for m in sorted(sink.received, key=lambda m: m.rcpt_tos)]


def bodies(received: bytes) -> tuple[str, str]:
    parsed = email.message_from_bytes(received, policy=default)
    assert parsed.get_content_type() == "multipart/alternative" and not parsed.defects
    return parsed.get_body(("plain",)).get_content(), parsed.get_body(("html",)).get_content()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def fetch(url: str, agent: str = BROWSER, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, method=method, headers={"User-Agent": agent})
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def shown(engine: EngineProcess) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "mta", "campaign", "show", "spring", "--json",
                          "--config", str(engine.config_path)], capture_output=True, text=True,
                         timeout=60, cwd=PROJECT_ROOT, check=True)
    return json.loads(run.stdout)


def events(tmp: Path, kind: str) -> list[dict[str, Any]]:
    return read_events(tmp / "events.jsonl", kind)


@pytest.mark.parametrize("plan,tracking", [("standard", True), ("pro", True),
                                           ("standard", False)])
def test_message_arrives_with_the_link_tracking_and_a_valid_signature(
        tmp_path: Path, dns_server: Any, asyncio_sink_factory: Any, plan: str,
        tracking: bool) -> None:
    key = write_key(tmp_path, "shop.test", "s1")
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    engine = start(tmp_path, dns_server, sink, key, plan, tracking)
    try:
        received = send(engine, sink, ["carol@dest.test"])[0]
    finally:
        engine.stop()
    assert dkimpy_results(received, [key.record]) == {("shop.test", "s1"): "pass"}
    head = received.split(b"\r\n\r\n")[0].decode()
    url = re.search(r"List-Unsubscribe: <(http[^>]+/unsubscribe/[^>]+)>", head).group(1)
    assert "X-MTA-Tracking" not in head
    text, html = bodies(received)
    assert f"Unsubscribe: {url}" in text
    assert f'<a href="{url}">Unsubscribe</a>' in html and html.index(url) < html.index("</body>")
    assert ("Email Marketing by" in text) is (plan != "pro")
    assert ("Email Marketing by" in html) is (plan != "pro")
    assert 'href="mailto:help@shop.test"' in html and "mailto:help@shop.test" in text
    clicks = re.findall(r'href="(http://[^"]+/c/[^"]+)"', html)
    pixels = re.findall(r'<img src="(http://[^"]+/o/[^"]+\.gif)"', html)
    if not tracking:
        assert not clicks and not pixels and "/c/" not in text
        for link in LINKS:
            assert f'href="{link.replace("&", "&amp;")}"' in html
        return
    assert len(clicks) == 4 and len(pixels) == 1  # three links and the hidden one
    for link in LINKS:
        assert link.replace("&", "&amp;") not in html
    assert "https://shop.test/a" not in text
    text_link = re.search(r"see (http://\S+/c/\S+)\.\r?\n", text)
    assert text_link, text
    text_link = text_link.group(1)
    assert text_link == clicks[0]  # the same URL, the same token in both parts


def test_redirects_pixel_events_and_classes(tmp_path: Path, dns_server: Any,
                                            asyncio_sink_factory: Any) -> None:
    key = write_key(tmp_path, "shop.test", "s1")
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    engine = start(tmp_path, dns_server, sink, key)
    try:
        scanned, person = send(engine, sink, ["a@dest.test", "b@dest.test"])
        links = {}
        for who, received in (("a", scanned), ("b", person)):
            html = bodies(received)[1]
            links[who] = (re.findall(r'href="(http://[^"]+/c/[^"]+)"', html)[:3],
                          re.search(r'<img src="([^"]+)"', html).group(1))
        # A scanner follows every link of a's message within seconds of delivery.
        for i, link in enumerate(links["a"][0]):
            status, headers, _ = fetch(link)
            assert status == 302 and headers["Location"] == LINKS[i]
        # A person clicks one link of b's message; its pixel comes from a person and a proxy.
        status, headers, _ = fetch(links["b"][0][1])
        assert status == 302 and headers["Location"] == LINKS[1]
        status, headers, gif = fetch(links["b"][1])
        assert status == 200 and headers["Content-Type"] == "image/gif" and len(gif) == 43
        assert gif.startswith(b"GIF89a")
        assert fetch(links["b"][1], GOOGLE_PROXY)[0] == 200
        assert fetch(links["b"][0][2], method="HEAD")[0] == 302
        # Altered, made up, another recipient's token: 404, no event.
        token = links["b"][0][0].rsplit("/", 1)[1]
        base = links["b"][0][0][: -len(token)]
        flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
        payload, mac = token.split(".")
        other_mac = links["a"][0][0].rsplit("/", 1)[1].split(".")[1]
        for bad in (flipped, f"{payload}.{other_mac}", "made-up-token.AAAAAAAAAAAAAAAAAAAAAA",
                    "x"):
            assert fetch(base + bad)[0] == 404
        assert fetch(links["b"][1].replace(".gif", "x.gif"))[0] == 404
        assert fetch(f"http://{engine.config['http']['listen']}/c/")[0] == 404
        assert wait_until(lambda: len(events(tmp_path, "Click")) == 5, timeout=15)
        assert wait_until(lambda: len(events(tmp_path, "Open")) == 2, timeout=5)
        # Counted in LMDB: `mta campaign show` (and the API behind it) shows them.
        assert wait_until(lambda: shown(engine)["engagement"]["clicks_total"] == 5, timeout=10)
        e = shown(engine)["engagement"]
        assert (e["unique_clicks"], e["clicks_human"], e["clicks_machine"]) == (1, 1, 4)
        assert (e["unique_opens"], e["opens_human"], e["opens_machine"]) == (1, 1, 1)
        assert e["open_rate"] == 0.5 and e["click_to_open"] == 1.0
        assert e["top_links"][0] == {"url": LINKS[1], "clicks_human": 1, "clicks_machine": 1}
        text = subprocess.run([sys.executable, "-m", "mta", "campaign", "show", "spring",
                               "--config", str(engine.config_path)], capture_output=True,
                              text=True, timeout=60, cwd=PROJECT_ROOT, check=True).stdout
        assert "opens     unique 1 (50" in text and "machine 4" in text and LINKS[1] in text
    finally:
        engine.stop()
    clicks = events(tmp_path, "Click")
    by_a = [c for c in clicks if c["recipient"] == "a@dest.test"]
    assert sorted(c["link"] for c in by_a) == sorted(LINKS)
    assert {(c["class"], c["rule"]) for c in by_a} == {("machine", "every-link-after-delivery")}
    by_b = {c["index"]: c for c in clicks if c["recipient"] == "b@dest.test"}
    assert (by_b[1]["class"], by_b[1]["rule"]) == ("human", "browser")
    assert by_b[1]["link"] == LINKS[1] and by_b[1]["user_agent"] == BROWSER
    assert by_b[1]["client"] == "127.0.0.0" and by_b[1]["campaign"] == "spring"
    assert (by_b[2]["class"], by_b[2]["rule"]) == ("machine", "head-request")
    opens = {o["user_agent"]: o for o in events(tmp_path, "Open")}
    assert (opens[BROWSER]["class"], opens[BROWSER]["rule"]) == ("human", "browser")
    assert opens[GOOGLE_PROXY]["class"] == "machine"
    assert opens[GOOGLE_PROXY]["rule"].startswith("agent:")


# --- without sockets -----------------------------------------------------------------------

def target(kind: str = CLICK, index: int = 0, url: str = "https://x.test/", links: int = 2,
           sent_at: int = 1000, recipient: str = "r@d.test") -> TrackTarget:
    return TrackTarget(kind, "shop", "spring", "M1", recipient, sent_at, links, index, url)


def test_tokens_name_their_target_and_resist_forgery() -> None:
    secret = b"k" * 32
    token = make_token(secret, target())
    assert read_token(secret, token, CLICK) == target()
    assert read_token(secret, token, OPEN) is None  # a click token is no pixel
    assert read_token(b"other" * 8, token, CLICK) is None
    assert read_token(secret, token[:-1] + ("A" if token[-1] != "A" else "B"), CLICK) is None
    other = make_token(secret, target(recipient="s@d.test"))
    assert read_token(secret, other.split(".")[0] + "." + token.split(".")[1], CLICK) is None


def test_classification_rules() -> None:
    agents = ["GoogleImageProxy"]
    bursts = Bursts(10.0)
    late = Hit(target(), "GET", BROWSER, "1.2.3.4", 1100.0)
    assert [(h.verdict, h.rule) for h in classify(late, agents, bursts)] == [("human", "browser")]
    proxy = Hit(target(OPEN, -1, ""), "GET", GOOGLE_PROXY, "", 1001.0)
    assert classify(proxy, agents, bursts)[0].rule == "agent:GoogleImageProxy"
    # Early clicks wait: every link -> machine; not every link -> human once the window closes.
    first = Hit(target(index=0), "GET", BROWSER, "", 1002.0)
    assert classify(first, agents, bursts) == []
    done = classify(Hit(target(index=1), "GET", BROWSER, "", 1002.5), agents, bursts)
    assert [(h.target.index, h.verdict) for h in done] == [(0, "machine"), (1, "machine")]
    alone = Hit(target(index=0, recipient="z@d.test"), "GET", BROWSER, "", 1003.0)
    assert classify(alone, agents, bursts) == [] and bursts.due(1005.0) == []
    assert [(h.verdict, h.rule) for h in bursts.due(1011.0)] == [("human", "browser")]
    hidden = Hit(target(index=-1, url=""), "GET", BROWSER, "", 2000.0)
    assert classify(hidden, agents, bursts)[0].rule == "hidden-link"
    assert kept_address("192.0.2.77", "truncate", b"") == "192.0.2.0"
    assert kept_address("2001:db8:1:2::5", "truncate", b"") == "2001:db8:1::"
    assert kept_address("192.0.2.77", "hash", b"k") != "192.0.2.77"
    assert kept_address("192.0.2.77", "none", b"k") == ""


def test_per_campaign_header_and_account_switch() -> None:
    import time as _time

    from mta.config import AccountConfig, Config
    from mta.queue.jobs import Job, Recipient
    from mta.queue.scheduler import Item
    from mta.tracking.rewrite import TrackingTransform

    cfg = Config()
    cfg.http.public_url = "https://mta.test"
    cfg.accounts = [AccountConfig("shop"), AccountConfig("quiet", tracking=False)]
    transform = TrackingTransform(cfg, b"k" * 32)
    original = newsletter("c@d.test")

    def run(account: str, header: str = "", campaign: str = "spring") -> bytes:
        data = original
        if header:
            data = data.replace(b"Subject:", f"X-MTA-Tracking: {header}\r\nSubject:".encode())
        job = Job(b"M1.0", "M1", "d.test", account, campaign, [Recipient("c@d.test")])
        item = Item(job, {"id": "M1", "account": account, "campaign": campaign}, _time.time())
        return transform(item, ["c@d.test"], "news@shop.test", data)[1]

    text, html = bodies(run("shop"))  # 3 links and the hidden one in HTML, 1 in text
    assert (text + html).count("https://mta.test/c/") == 5 and "https://mta.test/o/" in html
    assert run("quiet") == original  # the account has tracking off
    assert run("shop", "off") == original  # the header is removed, nothing rewritten
    opens = run("shop", "Opens")
    text, html = bodies(opens)
    assert b"X-MTA-Tracking" not in opens and "/o/" in html and "/c/" not in text + html
    text, html = bodies(run("shop", "clicks"))
    assert "/o/" not in html and "/c/" in html and "/c/" in text
    plain = run("shop", "off", campaign="")  # not campaign mail: only the header goes
    assert b"X-MTA-Tracking" not in plain and b"/c/" not in plain
    twice = run("shop", "off\r\nx-mta-tracking: clicks")  # the first counts, none is sent
    assert twice == original


def test_counters_unique_per_person_top_links_and_purge(tmp_path: Path) -> None:
    from mta.policy.retention import purge_account_records
    from mta.policy.store import PolicyStore
    from mta.queue.spool import Spool
    from mta.tracking.stats import account_engagement, apply_events, engagement

    spool = Spool(tmp_path / "spool", 64 * 1024**2)
    store = PolicyStore(spool)

    def hit(kind: str, who: str, verdict: str, link: str = "") -> dict[str, Any]:
        return {"type": kind, "account": "shop", "campaign": "spring", "recipient": who,
                "class": verdict, "link": link}

    batch = [hit("Open", "a@d", "human"), hit("Open", "a@d", "human"),
             hit("Open", "b@d", "machine"), hit("Click", "a@d", "human", LINKS[0]),
             hit("Click", "a@d", "human", LINKS[1]), hit("Click", "b@d", "machine", LINKS[1]),
             hit("Click", "c@d", "human", LINKS[1])]
    with spool.env.begin(write=True) as txn:
        apply_events(spool, txn, batch)
    with spool.env.begin() as txn:
        e = engagement(spool, txn, "shop", "spring", delivered=4)
        whole = account_engagement(spool, txn, "shop", delivered=4)
    assert (e["unique_opens"], e["opens_total"], e["opens_machine"]) == (1, 3, 1)
    assert (e["unique_clicks"], e["clicks_total"], e["clicks_human"]) == (2, 4, 3)
    assert e["open_rate"] == 0.25 and e["click_rate"] == 0.5 and e["click_to_open"] == 2.0
    assert [link["url"] for link in e["top_links"]] == [LINKS[1], LINKS[0]]
    assert e["top_links"][0] == {"url": LINKS[1], "clicks_human": 1 + 1, "clicks_machine": 1}
    assert whole["unique_clicks"] == 2
    with spool.env.begin(write=True) as txn:
        report = purge_account_records(store, txn, "shop", 0.0)
    assert report.counters >= 2 + 1 + 3  # campaign and account counters, links, who counted
    with spool.env.begin() as txn:
        gone = engagement(spool, txn, "shop", "spring", delivered=0)
        assert gone["opens_total"] == 0 and gone["top_links"] == []
        assert not list(txn.cursor(db=spool.dbs["tracking.seen"]))
    spool.close()


def test_links_in_text_are_found_as_the_pattern_finds_them() -> None:
    from mta.tracking.rewrite import _TEXT_URL, text_urls

    bodies = ["see HTTPS://a.test/x, and http://b.test/y://z.",
              "xhttp://c.test no https:// here http:/d.test hhttps://e.test/",
              "http://f.test/<tag> 'https://g.test/q?a=1' ://h.test", ""]
    for body in bodies:
        assert text_urls(body) == [m.group(0) for m in _TEXT_URL.finditer(body)]
    assert text_urls(bodies[0]) == ["HTTPS://a.test/x,", "http://b.test/y://z."]
