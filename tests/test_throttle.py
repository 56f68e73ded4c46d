"""Traffic shaping and adaptive throttling: plain objects, simulated time, no sockets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from mta.config import ConfigError
from mta.throttle import (
    CAMPAIGN_SUSPENDED,
    CONNECTION_FAILED,
    DEFER,
    FAIL,
    OK,
    SLOW_DOWN,
    SUSPENDED,
    WAIT_FOR_CLOSE,
    Gcra,
    Signal,
    Throttle,
    classify,
    load_shaping,
    parse_duration,
    parse_rate,
    parse_shaping,
    worker_share,
)

REPO = Path(__file__).resolve().parent.parent
GMAIL_MX = ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"]


def shaping(**sections: Any):
    """A shaping file from Python dicts, validated like the real one."""
    raw: dict[str, Any] = {"default": {"max_connections": 10, "message_rate": "100/s"}}
    raw.update(sections)
    return parse_shaping(raw, "test.toml")


def make(events: list[dict[str, Any]] | None = None, workers: int = 1, worker: int = 0,
         **sections: Any) -> Throttle:
    return Throttle(shaping(**sections), worker=worker, workers=workers,
                    on_event=events.append if events is not None else None,
                    clock=lambda: pytest.fail("the tests pass `now` explicitly"))


def count_sends(t: Throttle, dest, start: float, seconds: float) -> int:
    """Messages try_send allows in [start, start + seconds) to a sender that always has
    one ready and comes back exactly when told to."""
    sent, now = 0, start
    for _ in range(1_000_000):
        if now >= start + seconds - 1e-9:
            return sent
        wait = t.try_send(dest, now)
        if wait == 0.0:
            sent += 1
        now += wait
    raise AssertionError("never reached the end")


# --- units and GCRA -------------------------------------------------------------------


def test_rates_and_durations_parse() -> None:
    assert parse_rate("100/s").per_second == 100
    assert parse_rate("3000/h").per_second == pytest.approx(3000 / 3600)
    assert parse_rate("50/m").per_second == pytest.approx(50 / 60)
    assert parse_rate("5/10m").per_second == pytest.approx(5 / 600)
    assert parse_duration("30m") == 1800
    assert parse_duration("500ms") == 0.5
    assert parse_duration(90) == 90
    for bad in ("100", "100/x", "0/s", "fast"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_gcra_is_exact_over_time() -> None:
    gcra = Gcra(10.0, burst=1)
    allowed = [t / 1000 for t in range(10_000) if gcra.acquire(t / 1000) == 0.0]
    assert len(allowed) == 100  # 10/s for 10 s
    gaps = [b - a for a, b in zip(allowed, allowed[1:], strict=False)]
    assert min(gaps) == pytest.approx(0.1, abs=1e-9)


def test_gcra_burst_then_pace() -> None:
    gcra = Gcra(10.0, burst=5)
    assert [gcra.acquire(0.0) for _ in range(5)] == [0.0] * 5
    assert gcra.acquire(0.0) == pytest.approx(0.1)  # the 6th waits one interval
    assert gcra.wait(0.1) == 0.0


def test_gcra_slow_rate_from_shaping_syntax() -> None:
    gcra = Gcra(parse_rate("3000/h").per_second)
    asks = (i / 10 for i in range(36_000))  # every 0.1 s for an hour
    assert sum(1 for now in asks if gcra.acquire(now) == 0.0) == 3000


# --- limits ----------------------------------------------------------------------------


def test_message_rate_of_a_domain() -> None:
    t = make(domain={"slow.test": {"message_rate": "20/s", "message_burst": 1}})
    dest = t.destination("slow.test", ["mx.slow.test"])
    assert count_sends(t, dest, 0.0, 5.0) == 100


def test_max_connections_and_close() -> None:
    t = make(default={"max_connections": 3, "connection_rate": "unlimited"})
    dest = t.destination("a.test", ["mx.a.test"])
    assert [t.try_connect(dest, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert t.try_connect(dest, 0.0) == WAIT_FOR_CLOSE
    t.connection_closed(dest, 0.1)
    assert t.try_connect(dest, 0.2) == 0.0
    assert t.try_connect(dest, 0.2) == WAIT_FOR_CLOSE


def test_connection_rate() -> None:
    t = make(default={"max_connections": 100, "connection_rate": "2/s"})
    dest = t.destination("a.test", [])
    assert t.try_connect(dest, 0.0) == 0.0
    wait = t.try_connect(dest, 0.0)
    assert wait == pytest.approx(0.5)
    assert t.try_connect(dest, wait) == 0.0


def test_provider_groups_domains_by_mx_suffix() -> None:
    t = make(provider={"gmail": {"mx_suffixes": [".google.com"], "max_connections": 2}})
    a = t.destination("a.test", ["aspmx.l.google.com."])
    b = t.destination("b.test", ["ALT1.ASPMX.L.GOOGLE.COM"])
    other = t.destination("c.test", ["mx.c.test"])
    assert a.provider == b.provider == "gmail" and other.provider is None
    assert t.try_connect(a, 0.0) == 0.0
    assert t.try_connect(b, 0.0) == 0.0
    assert t.try_connect(a, 0.0) == WAIT_FOR_CLOSE  # the provider's budget is shared
    assert t.try_connect(b, 0.0) == WAIT_FOR_CLOSE
    assert t.try_connect(other, 0.0) == 0.0  # default limits, its own budget


def test_domain_override_under_a_provider_adds_a_limit() -> None:
    t = make(provider={"gmail": {"mx_suffixes": [".google.com"], "max_connections": 20}},
             domain={"small.test": {"max_connections": 1}})
    dest = t.destination("small.test", GMAIL_MX)
    assert [s.key for s in dest.scopes] == ["provider:gmail", "domain:small.test"]
    assert t.try_connect(dest, 0.0) == 0.0
    assert t.try_connect(dest, 0.0) == WAIT_FOR_CLOSE


def test_provider_share_per_worker() -> None:
    assert [worker_share(10, w, 3) for w in range(3)] == [4, 3, 3]
    assert [worker_share(2, w, 4) for w in range(4)] == [1, 1, 1, 1]  # at least 1 each
    limits = {"mx_suffixes": [".google.com"], "max_connections": 10, "message_rate": "90/s",
              "message_burst": 1}
    totals = []
    for worker in range(3):
        t = make(workers=3, worker=worker, provider={"gmail": limits})
        dest = t.destination("gmail.com", GMAIL_MX)
        totals.append((t.max_connections(dest), count_sends(t, dest, 0.0, 2.0)))
    assert [c for c, _ in totals] == [4, 3, 3]
    assert sum(s for _, s in totals) == 180  # 90/s engine-wide over 2 s


def test_domains_without_mx_match_provider_by_name() -> None:
    t = Throttle(load_shaping(REPO / "config/shaping.toml"))
    assert t.destination("gmail.com", []).provider == "gmail"
    assert t.destination("hotmail.com", ["hotmail-com.olc.protection.outlook.com"]
                         ).provider == "outlook"
    assert t.destination("corp.test", ["corp-test.mail.protection.outlook.com"]
                         ).provider == "office365"
    assert t.destination("x.test", ["mx1.mail.icloud.com"]).provider == "apple"
    assert t.destination("x.test", ["mta7.am0.yahoodns.net"]).provider == "yahoo"


# --- classification ---------------------------------------------------------------------


@pytest.mark.parametrize(("code", "enhanced", "text", "signal"), [
    (250, "2.0.0", "OK", Signal.OK),
    (421, "4.7.28", "[1.2.3.4] Our system has detected an unusual rate of unsolicited mail",
     Signal.SLOW_DOWN),
    (421, "4.7.0", "Try again later, closing connection.", Signal.SLOW_DOWN),
    (421, "4.7.0", "[TS01] Messages from 1.2.3.4 temporarily deferred", Signal.SLOW_DOWN),
    (451, "4.7.650", "The mail server [1.2.3.4] has been temporarily rate limited due to IP "
     "reputation. (S775)", Signal.SLOW_DOWN),
    (451, "4.7.500", "Server busy. Please try again later from [1.2.3.4]. (S3150)",
     Signal.SLOW_DOWN),
    (421, None, "Too many concurrent connections from your IP", Signal.SLOW_CONNECTIONS),
    (CONNECTION_FAILED, None, "Connection refused", Signal.SLOW_CONNECTIONS),
    (452, "4.2.2", "The email account that you tried to reach is over quota", Signal.NEUTRAL),
    (450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that "
     "prevents additional messages from being delivered", Signal.NEUTRAL),
    (450, "4.2.0", "<a@b.test>: Recipient address rejected: Greylisted", Signal.NEUTRAL),
    (451, "4.7.1", "Please try again later", Signal.NEUTRAL),
    (451, "4.3.0", "Temporary lookup failure", Signal.NEUTRAL),
    (550, "5.1.1", "User unknown", Signal.PERMANENT),
])
def test_classify(code: int, enhanced: str | None, text: str, signal: Signal) -> None:
    assert classify(code, enhanced, text) is signal


def test_classify_at_connect_is_about_connections() -> None:
    assert classify(421, "4.7.0", "Try again later, rate limited", connecting=True
                    ) is Signal.SLOW_CONNECTIONS


# --- adaptation -------------------------------------------------------------------------


def slow_down(t: Throttle, dest, now: float, **kw: Any):
    return t.record(dest, 421, "4.7.0", "Try again later, rate limited", now, **kw)


def test_aimd_cut_on_421_then_recovery_to_the_ceiling() -> None:
    events: list[dict[str, Any]] = []
    t = make(events)
    dest = t.destination("a.test", [])
    decision = slow_down(t, dest, 10.0)
    assert decision.action == SLOW_DOWN and decision.retry_at == pytest.approx(11.0)
    assert t.snapshot(10.0)[0]["rate"] == pytest.approx(70.0)
    assert t.max_connections(dest) == 7
    assert {e["change"] for e in events} == {"rate", "connections"}
    assert events[0]["type"] == "ThrottleChange" and "421" in events[0]["reason"]
    slow_down(t, dest, 11.0)  # within the holdoff: the same episode
    assert t.snapshot(11.0)[0]["rate"] == pytest.approx(70.0)
    now, rates = 12.0, []
    for _ in range(200):  # a long run of successes, 10 per second
        now += 0.1
        assert t.record(dest, 250, "2.0.0", "Ok", now).action == OK
        rates.append(t.snapshot(now)[0]["rate"])
    assert rates == sorted(rates)  # step by step, never down
    assert rates[-1] == pytest.approx(100.0)  # back at the ceiling, not above
    assert t.max_connections(dest) == 10
    assert t.snapshot(now)[0]["state"] == "normal"


def test_cuts_stop_at_the_floor() -> None:
    t = make(adapt={"min_message_rate": "10/s", "min_connections": 2})
    dest = t.destination("a.test", [])
    for i in range(40):
        slow_down(t, dest, i * 3.0)
    row = t.snapshot(120.0)[0]
    assert row["rate"] == pytest.approx(10.0)
    assert row["max_connections"] == 2


def test_cut_uses_the_measured_pace_when_lower() -> None:
    t = make()
    dest = t.destination("a.test", [])
    for i in range(40):  # the receiver took 20/s although 100/s was allowed
        t.record(dest, 250, None, "Ok", i / 20)
    slow_down(t, dest, 2.0)
    assert t.snapshot(2.0)[0]["rate"] == pytest.approx(0.7 * 20, rel=0.1)


def test_greylisting_and_mailbox_full_do_not_slow_down() -> None:
    events: list[dict[str, Any]] = []
    t = make(events)
    dest = t.destination("a.test", [])
    replies = [(450, "4.2.0", "Greylisted, see http://postgrey.schweikert.ch/"),
               (451, "4.7.1", "Please try again later"),
               (452, "4.2.2", "Mailbox full"),
               (550, "5.1.1", "User unknown")]
    decisions = [t.record(dest, c, e, text, 1.0) for c, e, text in replies]
    assert [d.action for d in decisions] == [DEFER, DEFER, DEFER, FAIL]
    assert all(d.retry_at is None for d in decisions)  # the usual retry schedule
    assert events == []
    assert t.snapshot(1.0)[0]["rate"] == 100.0
    assert t.max_connections(dest) == 10


def test_refused_connections_cut_connections_only() -> None:
    t = make()
    dest = t.destination("a.test", [])
    d = t.record(dest, CONNECTION_FAILED, None, "Connection refused", 1.0)
    assert d.action == SLOW_DOWN
    assert t.max_connections(dest) == 7
    assert t.snapshot(1.0)[0]["rate"] == 100.0
    for i in range(1, 30):  # an MX that is down: once at the floor, the usual retries
        d = t.record(dest, CONNECTION_FAILED, None, "Connection refused", 1.0 + 3 * i)
    assert t.max_connections(dest) == 1
    assert d.action == DEFER and "unreachable" in d.reason


def test_refused_connection_backs_off_new_connections() -> None:
    t = make(default={"max_connections": 10, "connection_rate": "unlimited"})
    dest = t.destination("a.test", [])
    for _ in range(5):  # five connections opened at once, all refused
        assert t.try_connect(dest, 0.0) == 0.0
    for _ in range(5):
        t.record(dest, 421, "4.7.0", "Try again later", 0.1, connecting=True)
        t.connection_closed(dest, 0.1)
    assert t.try_connect(dest, 0.1) == pytest.approx(1.0)  # one event: retry_delay
    assert t.try_connect(dest, 1.1) == 0.0
    t.record(dest, CONNECTION_FAILED, None, "Connection reset", 1.2)
    t.connection_closed(dest, 1.2)
    assert t.try_connect(dest, 1.2) == pytest.approx(2.0)  # refused again: doubled
    t.record(dest, 250, None, "Ok", 3.3)
    t.record(dest, CONNECTION_FAILED, None, "Connection reset", 3.4)
    assert t.try_connect(dest, 3.4) == pytest.approx(1.0)  # a success in between: reset


def test_unlimited_rate_is_cut_from_the_measured_pace() -> None:
    t = make(default={"message_rate": "unlimited"})
    dest = t.destination("a.test", [])
    for i in range(100):
        t.record(dest, 250, None, "Ok", i / 50)  # 50/s
    slow_down(t, dest, 2.0)
    rate = t.snapshot(2.0)[0]["rate"]
    assert rate == pytest.approx(35.0, rel=0.1)
    assert t.try_send(dest, 2.0) == 0.0


# --- rules ---------------------------------------------------------------------------------


SUSPEND_RULE = {"name": "ts04", "regex": r"\[TSS?04\]", "action": "suspend", "duration": "30m"}


def test_suspend_rule_suspends_that_destination_only_and_lifts() -> None:
    events: list[dict[str, Any]] = []
    t = make(events, rule=[SUSPEND_RULE])
    hit, other = t.destination("a.test", []), t.destination("b.test", [])
    decision = t.record(hit, 421, "4.7.0", "[TSS04] Messages temporarily deferred", 100.0)
    assert decision.action == SUSPENDED
    assert decision.until == decision.retry_at == pytest.approx(1900.0)
    assert t.try_send(hit, 100.0) == pytest.approx(1800.0)
    assert t.try_connect(hit, 1000.0) == pytest.approx(900.0)
    assert t.suspension(hit, 1000.0) == ("destination", 1900.0)
    assert t.try_send(other, 1000.0) == 0.0  # other destinations keep flowing
    assert t.try_connect(other, 1000.0) == 0.0
    assert t.snapshot(1000.0)[0]["state"] == "suspended"
    assert t.try_send(hit, 1900.0) == 0.0  # lifted by itself
    assert t.suspension(hit, 1900.0) is None
    assert [e["change"] for e in events if "suspend" in e["change"]] == [
        "suspend", "suspend_lifted"]


def test_throttle_rule_lowers_the_rate_for_its_duration() -> None:
    events: list[dict[str, Any]] = []
    rule = {"name": "slow", "regex": "S3150", "action": "throttle", "rate": "2/s",
            "max_connections": 1, "duration": "10m"}
    t = make(events, rule=[rule], default={"message_rate": "100/s", "message_burst": 1})
    dest = t.destination("a.test", [])
    t.record(dest, 451, "4.7.500", "Server busy. (S3150)", 0.0)
    assert count_sends(t, dest, 1.0, 10.0) == 20  # 2/s
    assert t.max_connections(dest) == 1
    assert t.snapshot(20.0)[0]["state"] == "throttled"
    adapted = t.snapshot(601.0)[0]["rate"]
    assert adapted == pytest.approx(70.0)  # lifted: the adapted rate (S3150 also cut it)
    assert count_sends(t, dest, 601.0, 1.0) == pytest.approx(adapted, abs=1)
    assert "throttle_lifted" in [e["change"] for e in events]


def test_rule_with_count_within_period() -> None:
    rule = {**SUSPEND_RULE, "trigger": {"count": 3, "within": "1m"}}
    t = make(rule=[rule])
    dest = t.destination("a.test", [])
    reply = (421, "4.7.0", "[TS04] deferred")
    for now in (0.0, 50.0, 100.0, 150.0):  # never 3 within a minute
        t.record(dest, *reply, now)
    assert t.suspension(dest, 150.0) is None
    for now in (200.0, 220.0):
        t.record(dest, *reply, now)
    assert t.suspension(dest, 220.0) is None
    assert t.record(dest, *reply, 240.0).action == SUSPENDED


def test_provider_rule_ignores_other_destinations() -> None:
    rule = {**SUSPEND_RULE, "provider": "yahoo"}
    t = make(rule=[rule], provider={"yahoo": {"mx_suffixes": [".yahoodns.net"]}})
    elsewhere = t.destination("a.test", ["mx.a.test"])
    assert t.record(elsewhere, 421, "4.7.0", "[TS04]", 0.0).action == SLOW_DOWN
    assert t.suspension(elsewhere, 0.0) is None
    yahoo = t.destination("yahoo.com", ["mta5.am0.yahoodns.net"])
    assert t.record(yahoo, 421, "4.7.0", "[TS04]", 0.0).action == SUSPENDED


def test_campaign_and_account_suspension() -> None:
    rules = [{"name": "content", "regex": "nature of the content", "action": "suspend_campaign",
              "duration": "1h"},
             {"name": "auth", "regex": r"5\.7\.26", "action": "suspend_account",
              "duration": "1h"}]
    t = make(rule=rules)
    dest, other = t.destination("a.test", []), t.destination("b.test", [])
    d = t.record(dest, 421, "4.7.0", "suspicious due to the nature of the content", 0.0,
                 campaign="spring", account="acme")
    assert d.action == CAMPAIGN_SUSPENDED and d.retry_at == pytest.approx(3600.0)
    assert t.try_send(dest, 10.0, campaign="spring", account="acme") == pytest.approx(3590.0)
    assert t.try_send(dest, 10.0, campaign="summer", account="acme") == 0.0
    assert t.try_send(other, 10.0, campaign="spring", account="acme") == 0.0
    assert t.suspension(dest, 10.0, campaign="spring") == ("campaign", 3600.0)
    d = t.record(dest, 550, "5.7.26", "unauthenticated", 20.0, campaign="x", account="acme")
    assert d.action == "account_suspended" and d.retry_at is None  # a 5xx bounces as usual
    assert t.try_send(dest, 30.0, campaign="summer", account="acme") == pytest.approx(3590.0)
    assert t.try_send(dest, 30.0, campaign="summer", account="other") == 0.0
    assert t.try_send(dest, 3620.0, campaign="spring", account="acme") == 0.0


def test_shipped_rules_match_the_known_replies() -> None:
    t = Throttle(load_shaping(REPO / "config/shaping.toml"))
    cases = [
        ("gmail.com", GMAIL_MX, 421, "4.7.28", "[1.2.3.4] Our system has detected an unusual "
         "rate of unsolicited mail originating from your IP address.", "throttled"),
        ("yahoo.com", ["mta6.am0.yahoodns.net"], 421, "4.7.0",
         "[TSS04] Messages from 1.2.3.4 temporarily deferred due to unexpected volume or user "
         "complaints", "suspended"),
        ("yahoo.com", ["mta6.am0.yahoodns.net"], 421, "4.7.0", "[TS03] All messages from "
         "1.2.3.4 will be permanently deferred", "suspended"),
        ("hotmail.com", ["hotmail-com.olc.protection.outlook.com"], 451, "4.7.500",
         "Server busy. Please try again later from [1.2.3.4]. (S3150)", "throttled"),
        ("corp.test", ["corp-test.mail.protection.outlook.com"], 451, "4.7.650",
         "The mail server [1.2.3.4] has been temporarily rate limited due to IP reputation.",
         "throttled"),
    ]
    for i, (domain, mx, code, enhanced, text, state) in enumerate(cases):
        t = Throttle(t.shaping)
        dest = t.destination(domain, mx)
        t.record(dest, code, enhanced, text, float(i))
        assert t.snapshot(float(i))[0]["state"] == state, text
    t = Throttle(t.shaping)
    dest = t.destination("x.test", ["mx.x.test"])
    for now in (0.0, 1.0, 2.0):
        t.record(dest, 421, None, "Too many concurrent connections", now)
    assert t.max_connections(dest) == 2 and t.snapshot(3.0)[0]["state"] == "throttled"


# --- visibility ---------------------------------------------------------------------------


def test_snapshot_rows_say_what_and_why() -> None:
    t = make(provider={"gmail": {"mx_suffixes": [".google.com"], "max_connections": 8,
                                 "message_rate": "40/s"}}, workers=2)
    gmail = t.destination("gmail.com", GMAIL_MX)
    quiet = t.destination("quiet.test", [])
    t.try_connect(gmail, 0.0)
    t.try_connect(quiet, 0.0)
    t.record(gmail, 421, "4.7.28", "unusual rate", 1.0)
    rows = {r["destination"]: r for r in t.snapshot(2.0)}
    row = rows["gmail"]
    assert row["kind"] == "provider" and row["state"] == "adapted"
    assert row["rate_ceiling"] == pytest.approx(20.0)  # its share of 40/s over 2 workers
    assert row["rate"] == pytest.approx(14.0)
    assert (row["connections"], row["max_connections"], row["max_connections_ceiling"]) == (
        1, 2, 4)
    assert "4.7.28" in row["reason"] and row["changed"] == 1.0
    assert rows["quiet.test"]["state"] == "normal"


def test_idle_scopes_are_forgotten() -> None:
    t = make()
    for i in range(50):
        t.try_send(t.destination(f"d{i}.test", []), 0.0)
    assert len(t.snapshot(1.0)) == 50
    assert t.snapshot(400.0) == []
    assert t._scopes == {}


# --- the shaping file -----------------------------------------------------------------------


def test_shipped_shaping_file_loads() -> None:
    s = load_shaping(REPO / "config/shaping.toml")
    names = {p.name for p in s.providers}
    assert {"gmail", "outlook", "office365", "yahoo", "apple", "united_internet", "mailru",
            "yandex"} <= names
    assert s.adapt.decrease == 0.7
    assert load_shaping("").providers == ()


@pytest.mark.parametrize(("raw", "named"), [
    ({"provider": {"gmail": {"mx_suffixes": [".google.com"], "max_conections": 5}}},
     "'max_conections' in [provider.gmail]"),
    ({"default": {"message_rate": "100/x"}}, "[default] message_rate"),
    ({"domain": {"a.test": {"max_connections": 0}}}, '[domain."a.test"] max_connections'),
    ({"provider": {"p": {"max_connections": 5}}}, "[provider.p] mx_suffixes"),
    ({"rule": [{"regex": "x", "action": "explode", "duration": "1m"}]}, "#1 action"),
    ({"rule": [{"regex": "(", "action": "suspend", "duration": "1m"}]}, "#1 regex"),
    ({"rule": [{"regex": "x", "action": "suspend"}]}, "missing required key 'duration'"),
    ({"rule": [{"regex": "x", "action": "throttle", "duration": "1m"}]}, "#1 rate"),
    ({"rule": [{"regex": "x", "action": "suspend", "duration": "1m",
                "trigger": {"count": 2, "whithin": "1m"}}]}, "'whithin'"),
    ({"rule": [{"regex": "x", "action": "suspend", "duration": "soon"}]}, "#1 duration"),
    ({"rule": [{"name": "r", "regex": "x", "action": "suspend", "duration": "1m",
                "provider": "nope"}]}, "#1 (r) provider"),
    ({"adapt": {"decrease": 1.5}}, "[adapt] decrease"),
    ({"providers": {}}, "unknown section [providers]"),
])
def test_shaping_errors_name_the_key(raw: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_shaping(raw, "shaping.toml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("shaping.toml: ")
    assert named in message


def test_shaping_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_shaping(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[default\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_shaping(bad)


def test_wait_for_close_is_infinite() -> None:
    assert math.isinf(WAIT_FOR_CLOSE)
