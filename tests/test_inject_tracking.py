"""The injection API's per-campaign tracking switch (`"tracking"` in the request).

- without sockets: the values the field takes, the header the builders write for it
  (structured and raw content), the refusals (a bad value, the header given twice, the
  switch turned off on the server);
- a real engine: a campaign injected with `"tracking": false` arrives with no rewritten
  link and no pixel but with its unsubscribe link in both parts; the same request
  without the field arrives tracked; the switch header never reaches the recipient.
"""

from __future__ import annotations

import email
import json
import re
import urllib.error
import urllib.request
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from bench.engine_proc import EngineProcess
from bench.net import free_port, wait_for_port
from mta.address import Address
from mta.inject.auth import api_key_hash, new_api_key
from mta.inject.build import Settings, make_builder
from mta.inject.request import BadRequest, Limits, Recipient, parse_request
from tests.helpers.engine import engine_config, wait_until

KEY = new_api_key()
LIMITS = Limits(max_recipients=100, max_message_size=100_000)
SETTINGS = Settings("X-Campaign-ID", "mta.test", 100_000, 1_000_000, "X-MTA-Tracking")
LINK = "https://shop.test/offer"
RAW = ("From: news@shop.test\nTo: {{ email }}\nSubject: Hi\n"
       "Content-Type: text/html; charset=utf-8\n\n<p><a href=\"" + LINK + "\">offer</a></p>\n")


def body(campaign: str = "spring", **extra: Any) -> dict[str, Any]:
    return {"envelope_sender": "bounce@shop.test", "campaign": campaign,
            "recipients": [{"email": "ann@dest.test", "name": "Ann"}],
            "content": {"from": {"email": "news@shop.test"}, "subject": "Spring",
                        "text_body": f"Hello {{{{ name }}}},\nsee {LINK}\n",
                        "html_body": f'<p>Hello {{{{ name }}}}, <a href="{LINK}">offer</a></p>\n'},
            **extra}


def parsed(data: dict[str, Any]) -> Any:
    return parse_request(json.dumps(data).encode(), LIMITS)


def built(data: dict[str, Any], settings: Settings = SETTINGS) -> bytes:
    builder = make_builder(parsed(data), settings, new_id=lambda: "M1")
    return builder.build(Recipient("ann@dest.test", "Ann"), Address("ann", "dest.test"))


def head(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


# --- without sockets -----------------------------------------------------------------------

@pytest.mark.parametrize("value,switch", [(False, "off"), (True, "on"), ("off", "off"),
                                          ("Opens", "opens"), ("clicks", "clicks"),
                                          (None, None)])
def test_the_field_and_the_header_it_becomes(value: Any, switch: str | None) -> None:
    data = body(tracking=value) if value is not None else body()
    assert parsed(data).tracking == switch
    fields = head(built(data))
    if switch is None:
        assert b"X-MTA-Tracking" not in fields
    else:
        assert f"X-MTA-Tracking: {switch}\r\n".encode() in fields
    raw = built({**data, "content": RAW})
    assert raw.startswith(b"X-Campaign-ID: spring\r\n")
    assert (f"X-MTA-Tracking: {switch}\r\n".encode() in head(raw)) is (switch is not None)


@pytest.mark.parametrize("data,message", [
    (body(tracking="sometimes"), "tracking: give true, false"),
    (body(tracking=0), "tracking: must be true or false or a string"),
    ({**body(tracking=False), "content": {**body()["content"],
                                          "headers": {"x-mta-tracking": "opens"}}},
     "tracking: the content has a X-MTA-Tracking header too"),
    ({**body(tracking="opens"), "content": "X-MTA-Tracking: off\n" + RAW},
     "tracking: the content has a X-MTA-Tracking header too"),
])
def test_bad_values_and_a_second_switch_are_refused(data: dict[str, Any], message: str
                                                    ) -> None:
    with pytest.raises(BadRequest) as caught:
        built(data)
    assert caught.value.status == 400 and message in caught.value.message


def test_refused_when_the_server_has_no_switch_header() -> None:
    no_header = Settings("X-Campaign-ID", "mta.test", 100_000, 1_000_000, "")
    with pytest.raises(BadRequest, match=r"\[tracking\] header is empty"):
        built(body(tracking=False), no_header)
    assert b"X-MTA-Tracking" not in built(body(), no_header)  # without the field: fine


# --- a real engine ---------------------------------------------------------------------------

def start(tmp: Path, dns: Any, sink_port: int) -> tuple[EngineProcess, str]:
    port = free_port()
    config = engine_config(
        tmp, inject={"listen": f"127.0.0.1:{port}"}, smtp={"trusted_account": "shop"},
        dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink_port, "allow_loopback_mx": True},
        accounts=[{"name": "shop", "email": "ops@shop.test",
                   "api_key_hashes": [api_key_hash(KEY)]}])
    config["http"]["public_url"] = f"http://{config['http']['listen']}"
    engine = EngineProcess(tmp, config, workers=1).start()
    wait_for_port("127.0.0.1", port, 10)
    return engine, f"http://127.0.0.1:{port}/api/inject/v1"


def inject(url: str, data: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def parts(message: bytes) -> tuple[str, str]:
    parsed = email.message_from_bytes(message, policy=default)
    return (parsed.get_body(("plain",)).get_content(),
            parsed.get_body(("html",)).get_content())


def test_a_campaign_injected_with_tracking_off_keeps_its_links_and_its_unsubscribe_link(
        tmp_path: Path, dns_server: Any, route: Any) -> None:
    dest = route("dest.test", "127.0.0.2")
    engine, url = start(tmp_path, dns_server, dest.port)
    try:
        assert inject(url, body("quiet", tracking="sometimes"))[0] == 400
        status, reply = inject(url, body("quiet", tracking=False))
        assert (status, reply["success_count"]) == (200, 1), reply
        status, reply = inject(url, body("loud"))
        assert (status, reply["success_count"]) == (200, 1), reply
        assert wait_until(lambda: len(dest.received) == 2, timeout=20)
    finally:
        engine.stop()
    by_campaign = {re.search(rb"X-Campaign-ID: (\w+)", m.data).group(1): m.data
                   for m in dest.received}
    base = f"http://{engine.config['http']['listen']}"
    for campaign, message in by_campaign.items():
        assert b"X-MTA-Tracking" not in head(message)  # taken out before sending
        unsubscribe = re.search(rb"List-Unsubscribe: <([^>]+)>", message).group(1).decode()
        text, html = parts(message)
        assert f"Unsubscribe: {unsubscribe}" in text, campaign
        assert f'<a href="{unsubscribe}">Unsubscribe</a>' in html, campaign
    text, html = parts(by_campaign[b"quiet"])
    assert f'href="{LINK}"' in html and LINK in text
    assert f"{base}/c/" not in text + html and f"{base}/o/" not in html and "<img" not in html
    text, html = parts(by_campaign[b"loud"])  # the same request without the field: tracked
    assert LINK not in text + html
    assert f'href="{base}/c/' in html and f"{base}/c/" in text and f'<img src="{base}/o/' in html
