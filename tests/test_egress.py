"""Sending identities (mta.egress): sources, pools, the choice of a source per message.

Pure parts first (smooth weighted round robin, the pool of a message, the chooser with a
fake gate and clock, the config checks), then real engines on loopback: a sink records
the peer address and the EHLO name of each message it receives.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from bench.engine_proc import PROJECT_ROOT, EngineProcess, read_events
from bench.load import Logins, Submission, make_body, run_load
from mta.config import (
    SHIPPED_SHAPING,
    AccountConfig,
    Config,
    ConfigError,
    EgressConfig,
    EgressPoolConfig,
    EgressPoolMember,
    EgressSourceConfig,
    load_config,
)
from mta.egress.chooser import Egress, Verdict
from mta.egress.pools import SmoothWeighted, Sources, check_pool_field, pool_for
from mta.queue.spool import Spool
from mta.smtp.auth import hash_password
from mta.throttle.shaping import Limits, load_shaping
from mta.throttle.throttle import Destination, ScopeSpec, Throttle
from tests.helpers.delivery import RecordingScheduler
from tests.helpers.engine import engine_config, wait_until
from tests.helpers.http import TOKEN, call

SENDER = "news@shop.test"


# --- pure: the rotation and the pool of a message ---------------------------------------


def test_smooth_weighted_round_robin_3_to_1_is_nginx_sequence() -> None:
    rotation = SmoothWeighted([("a", 3), ("b", 1)])
    picks = [rotation.pick() for _ in range(8)]
    assert picks == ["a", "a", "b", "a", "a", "a", "b", "a"]
    assert Counter(rotation.pick() for _ in range(400)) == {"a": 300, "b": 100}


def test_smooth_weighted_skips_ineligible_members_without_a_burst_after() -> None:
    rotation = SmoothWeighted([("a", 1), ("b", 1), ("c", 2)])
    assert {rotation.pick({"a", "b"}) for _ in range(10)} == {"a", "b"}
    assert rotation.pick(set()) is None
    after = Counter(rotation.pick() for _ in range(400))
    assert after == {"a": 100, "b": 100, "c": 200}  # c does not catch up with a burst


def egress_cfg(**accounts: dict[str, Any]) -> Config:
    sources = [EgressSourceConfig(n, f"127.0.0.{i + 2}", f"{n}.test")
               for i, n in enumerate(["s1", "s2", "s3", "s4"])]
    pools = [EgressPoolConfig(p, [EgressPoolMember(s, 1)])
             for p, s in [("shared", "s1"), ("promo", "s2"), ("trial", "s3"), ("vip", "s4")]]
    return Config(egress=EgressConfig(sources, pools, default_pool="shared", trial_pool="trial"),
                  accounts=[AccountConfig(name, **kw) for name, kw in accounts.items()])


def test_pool_of_a_message_account_campaign_header_and_trial() -> None:
    cfg = egress_cfg(shop={"pools": ["promo"]}, vip={"pool": "vip"}, new={"plan": "trial"},
                     newvip={"plan": "trial", "pool": "vip"})
    eg = cfg.egress
    assert pool_for(eg, cfg.account("shop")) == "shared"  # default pool
    assert pool_for(eg, cfg.account("shop"), "promo") == "promo"  # allowed: honoured
    assert pool_for(eg, cfg.account("shop"), "vip") == "shared"  # not allowed: ignored
    assert pool_for(eg, cfg.account("vip")) == "vip"
    assert pool_for(eg, cfg.account("vip"), "promo") == "vip"
    assert pool_for(eg, cfg.account("new")) == "trial"  # trial accounts: the trial pool
    assert pool_for(eg, cfg.account("new"), "shared") == "trial"
    assert pool_for(eg, cfg.account("newvip")) == "vip"  # a pool of its own wins
    assert pool_for(eg, None) == "shared"
    assert pool_for(EgressConfig(), None) == ""  # no pools: today's single source


def test_pool_field_syntax_is_checked_at_intake() -> None:
    assert check_pool_field([], "X-MTA-Pool") == ("", None)
    assert check_pool_field([" promo "], "X-MTA-Pool") == ("promo", None)
    assert "appears 2 times" in (check_pool_field(["a", "b"], "X-MTA-Pool")[1] or "")
    assert (check_pool_field(["no pool!"], "X-MTA-Pool")[1] or "").startswith("550 5.6.0")


# --- pure: the chooser with a fake gate and clock --------------------------------------


class FakeGate:
    def __init__(self, caps: dict[tuple[str, str], int], retry: float | None = None) -> None:
        self.caps = caps  # (source, provider) -> messages it may still carry
        self.retry = retry

    async def admit(self, source: str, provider: str) -> bool:
        left = self.caps.get((source, provider))
        if left is None:
            return True
        if left <= 0:
            return False
        self.caps[(source, provider)] = left - 1
        return True

    def established(self, source: str) -> bool:
        return not any(s == source for s, _ in self.caps)

    def retry_at(self, source: str, provider: str) -> float | None:
        return self.retry

    def status(self) -> dict[str, Any]:
        return {}


class Rule:
    def __init__(self, action: str) -> None:
        self.action = action


class Rules:
    def __init__(self, rules: dict[str, Rule]) -> None:
        self.rules = rules

    def source_rules(self) -> dict[str, Rule]:
        return self.rules


def two_source_cfg(run_length: int = 1) -> Config:
    """a and b, 3:1, in pool p; runs of one message (each pick is the rotation's)."""
    return Config(egress=EgressConfig(
        [EgressSourceConfig("a", "127.0.0.2", "a.test"),
         EgressSourceConfig("b", "127.0.0.3", "b.test")],
        [EgressPoolConfig("p", [EgressPoolMember("a", 3), EgressPoolMember("b", 1)])],
        default_pool="p", run_length=run_length))


def test_a_destination_gets_runs_and_the_weights_hold_over_them() -> None:
    sources = Sources(two_source_cfg(run_length=10))
    anyone: Callable[[str], bool] = lambda name: True  # noqa: E731
    picks = [sources.pick("p", anyone, "gmail") for _ in range(1000)]
    assert Counter(picks) == {"a": 750, "b": 250}
    runs = [picks[i:i + 10] for i in range(0, 1000, 10)]
    assert all(len(set(run)) == 1 for run in runs)  # ten in a row from one source
    assert [run[0] for run in runs[:4]] == ["a", "a", "b", "a"]  # runs by SWRR
    # Two destinations interleaved: each keeps its own run.
    mixed = [(d, sources.pick("p", anyone, d)) for _ in range(10) for d in ("x", "y")]
    assert len({s for d, s in mixed if d == "x"}) == 1
    assert len({s for d, s in mixed if d == "y"}) == 1
    # A source no longer eligible (down, suspended, at its cap) ends its run at once.
    first = sources.pick("p", anyone, "z")
    other = sources.pick("p", lambda name: name != first, "z")
    assert other is not None and other != first
    assert sources.pick("p", anyone, "z") == other  # the new run goes on


def choose_many(egress: Egress, n: int, provider: str = "gmail") -> Counter[str]:
    async def run() -> Counter[str]:
        found: Counter[str] = Counter()
        for _ in range(n):
            choice = await egress.choose("p", provider)
            found[choice.source.name if choice.verdict is Verdict.CHOSEN and choice.source
                  else choice.verdict.value] += 1
        return found

    return asyncio.run(run())


def test_a_down_source_is_skipped_and_comes_back_after_its_interval() -> None:
    now = [1000.0]
    events: list[dict[str, Any]] = []
    egress = Egress(Sources(two_source_cfg()), down_interval=60.0, on_event=events.append,
                    clock=lambda: now[0])
    egress.failed("a", "Cannot assign requested address")
    egress.failed("a", "again")  # one event per outage
    assert choose_many(egress, 10) == {"b": 10}
    assert [e["type"] for e in events] == ["SourceDown"]
    assert events[0]["source"] == "a" and events[0]["address"] == "127.0.0.2"
    assert egress.state()["a"]["up"] is False
    egress.failed("b", "gone too")
    choice = asyncio.run(egress.choose("p", "gmail"))
    assert choice.verdict is Verdict.WAIT and 1.0 <= choice.wait <= 60.0  # waits, no bounce
    now[0] += 61
    assert choose_many(egress, 8) == {"a": 6, "b": 2}  # tried again after the interval
    egress.connected("a")
    assert [e["type"] for e in events][-1] == "SourceUp"
    assert egress.state()["a"]["up"] is True


def test_gate_refusal_moves_mail_to_the_other_source_then_waits_for_its_time() -> None:
    gate = FakeGate({("a", "gmail"): 5, ("b", "gmail"): 0}, retry=5000.0)
    egress = Egress(Sources(two_source_cfg()), gate, clock=lambda: 1000.0)
    assert choose_many(egress, 8, "gmail") == {"a": 5, "wait": 3}
    choice = asyncio.run(egress.choose("p", "gmail"))
    assert choice.verdict is Verdict.WAIT and choice.wait == 4000.0
    assert "warm-up cap" in choice.reason
    assert choose_many(egress, 4, "yahoo") == {"a": 3, "b": 1}  # caps are per provider


def test_suspended_sources_are_skipped_all_suspended_holds_bounce_rule_bounces() -> None:
    rules = Rules({"a": Rule("suspend")})
    egress = Egress(Sources(two_source_cfg()), rules=rules)
    assert choose_many(egress, 5) == {"b": 5}
    rules.rules["b"] = Rule("suspend")
    choice = asyncio.run(egress.choose("p", "gmail"))
    assert choice.verdict is Verdict.HELD and choice.source is not None
    rules.rules = {"a": Rule("bounce"), "b": Rule("bounce")}
    assert asyncio.run(egress.choose("p", "gmail")).verdict is Verdict.BOUNCED


def test_throttle_scopes_are_kept_per_source() -> None:
    spec = ScopeSpec("provider", "gmail", Limits(), shared=True)
    dest = Destination("gmail.com", "gmail", (spec,))
    assert dest.source == "" and spec.key == "provider:gmail"  # no sources: as before
    a, b = dest.from_source("a"), dest.from_source("b")
    assert a.scopes[0].key == "provider:gmail@a" != b.scopes[0].key
    assert a.name == "gmail" and a.provider == "gmail" and a.source == "a"


def test_adaptive_limits_and_shared_budgets_are_per_source_and_provider() -> None:
    throttle = Throttle(load_shaping(SHIPPED_SHAPING))
    gmail = throttle.destination("gmail.com", ["gmail-smtp-in.l.google.com"])
    assert gmail.provider == "gmail"
    a, b = gmail.from_source("a"), gmail.from_source("b")
    assert [x.key for x in throttle.budgets(a)] == ["provider:gmail@a"]  # Redis keys too
    before = throttle.budgets(b)[0].message_rate
    for _ in range(3):
        throttle.record(a, 421, "4.7.28", "Our system has detected an unusual rate of mail")
    assert throttle.budgets(a)[0].message_rate < before  # a slowed down at gmail ...
    assert throttle.budgets(b)[0].message_rate == before  # ... b did not
    assert {r["source"] for r in throttle.snapshot()} >= {"a"}


# --- config ----------------------------------------------------------------------------


def write_config(tmp: Path, egress: dict[str, Any], accounts: list[dict[str, Any]] | None = None
                 ) -> Path:
    path = tmp / "mta.toml"
    path.write_text(tomli_w.dumps({"egress": egress, "accounts": accounts or []}))
    return path


SOURCES = [{"name": "ip1", "address": "127.0.0.2", "ehlo_name": "a.test"},
           {"name": "ip2", "address": "127.0.0.3", "ehlo_name": "b.test"}]


@pytest.mark.parametrize(("egress", "accounts", "message"), [
    ({"sources": SOURCES, "pools": [{"name": "p", "sources": [{"source": "ip9"}]}],
      "default_pool": "p"}, None, "pool 'p': unknown source 'ip9'"),
    ({"sources": [*SOURCES, SOURCES[0]], "pools": [], "default_pool": ""}, None,
     "source 'ip1' is defined twice"),
    ({"sources": SOURCES, "pools": [{"name": "p", "sources": [{"source": "ip1", "weight": 0}]}],
      "default_pool": "p"}, None, "weight of 'ip1' must be above 0"),
    ({"sources": SOURCES, "pools": [{"name": "p", "sources": [{"source": "ip1"}]}] * 2,
      "default_pool": "p"}, None, "pool 'p' is defined twice"),
    ({"sources": SOURCES, "pools": [{"name": "p", "sources": [{"source": "ip1"}]}],
      "default_pool": "p"}, [{"name": "shop", "pool": "q"}], "shop: unknown pool 'q'"),
    ({"sources": SOURCES, "pools": [{"name": "p", "sources": [{"source": "ip1"}]}],
      "default_pool": "p"}, [{"name": "shop", "pools": ["q"]}], "shop: unknown pool 'q'"),
    ({"sources": SOURCES, "pools": [{"name": "p", "sources": [{"source": "ip1"}]}],
      "default_pool": ""}, None, "default_pool must name a pool"),
    ({"sources": SOURCES, "pools": [{"name": "p", "sources": [{"source": "ip1"}]}],
      "default_pool": "p", "trial_pool": "t"}, None, "trial_pool: unknown pool 't'"),
    ({"sources": [{"name": "ip1", "address": "mail.example", "ehlo_name": "a.test"}]}, None,
     "is not an IP address"),
    ({"sources": [{**SOURCES[0]}, {**SOURCES[1], "address": "127.0.0.2"}]}, None,
     "address 127.0.0.2 is another source's"),
    ({"run_length": 0}, None, "run_length: must be a whole number of messages from 1 to 1000"),
])
def test_bad_egress_config_is_one_line(tmp_path: Path, egress: dict[str, Any],
                                       accounts: list[dict[str, Any]] | None,
                                       message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, egress, accounts))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_good_egress_config_loads(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, {
        "sources": SOURCES, "default_pool": "p",
        "pools": [{"name": "p", "sources": [{"source": "ip1", "weight": 3},
                                             {"source": "ip2"}]}]},
        [{"name": "shop", "pool": "p", "pools": ["p"]}]))
    assert [(m.source, m.weight) for m in cfg.egress.pools[0].sources] == [("ip1", 3), ("ip2", 1)]
    assert cfg.account("shop") is not None and cfg.account("shop").pool == "p"


# --- real engines --------------------------------------------------------------------


def engine_with(tmp: Path, dns: Any, port: int, egress: dict[str, Any],
                accounts: list[dict[str, Any]], **sections: Any) -> EngineProcess:
    config = engine_config(
        tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": port, "allow_loopback_mx": True,
                  "retry_initial": 1.0, "retry_max": 1.0, "retry_jitter": 0.0,
                  "connect_timeout": 5.0, "command_timeout": 10.0},
        egress=egress, accounts=accounts, **sections)
    return EngineProcess(tmp, config, workers=1).start()


def peers(sink: Any) -> list[tuple[str, str]]:
    """(peer address, EHLO name) of each message the sink received."""
    return [(m.peer.rpartition(":")[0], m.helo) for m in list(sink.received)]


def mta_json(engine: EngineProcess, *args: str) -> Any:
    run = subprocess.run([sys.executable, "-m", "mta", *args, "--json", "--config",
                          str(engine.config_path)], capture_output=True, text=True, timeout=60,
                         cwd=PROJECT_ROOT, check=True)
    return json.loads(run.stdout)


def test_pool_3_to_1_carries_1000_messages_each_address_with_its_ehlo(
        tmp_path: Path, dns_server: Any, route: Any) -> None:
    sink = route("dest.test", "127.0.0.9")
    egress = {"sources": [{"name": "a", "address": "127.0.0.2", "ehlo_name": "a.test"},
                          {"name": "b", "address": "127.0.0.3", "ehlo_name": "b.test"}],
              "pools": [{"name": "p", "sources": [{"source": "a", "weight": 3},
                                                   {"source": "b", "weight": 1}]}],
              "default_pool": "p"}
    engine = engine_with(tmp_path, dns_server, sink.port, egress, [{"name": "shop"}],
                         smtp={"trusted_account": "shop"}, policy={"enabled": False},
                         http={"admin_token": TOKEN})
    try:
        def make(i: int) -> Submission:
            rcpt = f"user{i}@dest.test"
            return Submission(SENDER, [rcpt], make_body(400, f"m {i}", SENDER, rcpt))

        result = asyncio.run(run_load(engine.host, engine.port, make, 1000, sessions=8))
        assert result.accepted == 1000, result.replies
        assert wait_until(lambda: len(sink.received) >= 1000, timeout=120)
        seen = peers(sink)
        assert set(seen) == {("127.0.0.2", "a.test"), ("127.0.0.3", "b.test")}
        share = Counter(address for address, _ in seen)["127.0.0.2"] / len(seen)
        assert 0.70 <= share <= 0.80, share
        assert wait_until(lambda: len(read_events(tmp_path / "events.jsonl", "Delivery")) == 1000,
                          timeout=30)
        deliveries = read_events(tmp_path / "events.jsonl", "Delivery")
        assert {e["source"] for e in deliveries} == {"a", "b"}
        spool = Spool(Path(engine.config["spool"]["path"]), readonly=True)
        try:  # each message's sent record names the source that carried it (complaints)
            with spool.read() as txn:
                noted = {e["source"]: spool.sent_origin(txn, e["id"]).sources
                         for e in deliveries[::50]}
        finally:
            spool.close()
        assert all(sources == {"dest.test": [name, "other"]}
                   for name, sources in noted.items()), noted
        status = {}

        def counted() -> bool:
            nonlocal status
            status = mta_json(engine, "egress", "status")
            return sum(p["delivered"] for s in status["sources"]
                       for p in s["providers"].values()) == 1000

        assert wait_until(counted, timeout=20)
        by_name = {s["name"]: s for s in status["sources"]}
        assert by_name["a"]["address"] == "127.0.0.2" and by_name["a"]["ehlo_name"] == "a.test"
        assert by_name["a"]["pools"] == ["p"] and by_name["a"]["up"] is True
        assert sum(p["delivered"] for p in by_name["b"]["providers"].values()) == \
            Counter(address for address, _ in seen)["127.0.0.3"]
        assert by_name["a"]["totals"]["delivery_rate"] == 100.0
        offline = mta_json(engine, "egress", "status", "--offline")
        assert offline["sources"] == status["sources"]  # the API and the spool agree
        code, api, _ = call(f"http://{engine.config['http']['listen']}/api/v1/egress")
        assert code == 200 and api["sources"] == status["sources"]
        code, board, _ = call(f"http://{engine.config['http']['listen']}/api/v1/dashboard")
        assert code == 200 and [s["name"] for s in board["egress"]] == ["a", "b"]
        code, text, _ = call(f"http://{engine.config['http']['listen']}/metrics")
        found = re.search(r'mta_egress_messages_total\{outcome="delivered",provider="([^"]+)",'
                          r'source="a"\} ([\d.]+)', text)
        assert found and float(found[2]) == by_name["a"]["totals"]["delivered"], [
            line for line in text.splitlines() if "egress" in line]
    finally:
        engine.stop()


def test_accounts_pools_campaign_header_and_trial_pool(
        tmp_path: Path, dns_server: Any, route: Any) -> None:
    sink = route("dest.test", "127.0.0.9")
    names = ["shared", "brand", "promo", "trial"]
    egress = {"sources": [{"name": n, "address": f"127.0.0.{i + 4}", "ehlo_name": f"{n}.test"}
                          for i, n in enumerate(names)],
              "pools": [{"name": n, "sources": [{"source": n}]} for n in names],
              "default_pool": "shared", "trial_pool": "trial"}
    accounts = [{"name": name, "password_hash": hash_password(f"{name}-pw", log_n=10), **kw}
                for name, kw in [("shop", {}), ("brand", {"pool": "brand", "pools": ["promo"]}),
                                 ("new", {"plan": "trial"})]]
    engine = engine_with(tmp_path, dns_server, sink.port, egress, accounts,
                         policy={"enabled": False})
    cases = [("shop", "", "127.0.0.4"), ("shop", "promo", "127.0.0.4"),  # not its pool
             ("brand", "", "127.0.0.5"), ("brand", "promo", "127.0.0.6"),  # allowed
             ("brand", "trial", "127.0.0.5"), ("new", "", "127.0.0.7"),
             ("new", "shared", "127.0.0.7")]
    try:
        for n, (account, pool, _) in enumerate(cases):
            rcpt = f"case{n}@dest.test"
            extra = [f"X-MTA-Pool: {pool}"] if pool else []
            body = make_body(300, f"case {n}", SENDER, rcpt, "spring", extra).replace(
                b"\r\n..", b"\r\n.")
            with smtplib.SMTP(engine.host, engine.port, timeout=30) as client:
                client.login(account, f"{account}-pw")
                client.sendmail(SENDER, [rcpt], body)
        assert wait_until(lambda: len(sink.received) >= len(cases), timeout=60)
        got = {m.rcpt_tos[0]: (m.peer.rpartition(":")[0], m.data) for m in list(sink.received)}
        for n, (account, pool, address) in enumerate(cases):
            peer, data = got[f"case{n}@dest.test"]
            assert peer == address, (account, pool, peer)
            assert b"X-MTA-Pool" not in data  # for the engine only: removed
        bad = make_body(300, "bad", SENDER, "x@dest.test", "", ["X-MTA-Pool: no pool!"])
        with smtplib.SMTP(engine.host, engine.port, timeout=30) as client:
            client.login("shop", "shop-pw")
            with pytest.raises(smtplib.SMTPDataError) as err:
                client.sendmail(SENDER, ["x@dest.test"], bad)
        assert err.value.smtp_code == 550
    finally:
        engine.stop()


def test_two_accounts_two_pools_never_share_addresses(
        tmp_path: Path, dns_server: Any, route: Any) -> None:
    sink = route("dest.test", "127.0.0.9")
    egress = {"sources": [{"name": f"s{i}", "address": f"127.0.0.{i}", "ehlo_name": f"s{i}.test"}
                          for i in (2, 3, 4, 5)],
              "pools": [{"name": "pa", "sources": [{"source": "s2"}, {"source": "s3"}]},
                        {"name": "pb", "sources": [{"source": "s4"}, {"source": "s5"}]}],
              "default_pool": "pa"}
    accounts = [{"name": "a", "password_hash": hash_password("a-pw", log_n=10), "pool": "pa"},
                {"name": "b", "password_hash": hash_password("b-pw", log_n=10), "pool": "pb"}]
    engine = engine_with(tmp_path, dns_server, sink.port, egress, accounts,
                         policy={"enabled": False})
    try:
        for account in ("a", "b"):
            def make(i: int, account: str = account) -> Submission:
                rcpt = f"{account}{i}@dest.test"
                return Submission(SENDER, [rcpt], make_body(300, f"{account} {i}", SENDER, rcpt))

            result = asyncio.run(run_load(engine.host, engine.port, make, 100, sessions=4,
                                          logins=Logins.single(account, f"{account}-pw")))
            assert result.accepted == 100, result.replies
        assert wait_until(lambda: len(sink.received) >= 200, timeout=60)
        by_account: dict[str, set[str]] = {"a": set(), "b": set()}
        for m in list(sink.received):
            by_account[m.rcpt_tos[0][0]].add(m.peer.rpartition(":")[0])
        assert by_account == {"a": {"127.0.0.2", "127.0.0.3"}, "b": {"127.0.0.4", "127.0.0.5"}}
    finally:
        engine.stop()


def test_unbindable_source_address_fails_start_with_one_line(tmp_path: Path) -> None:
    config = engine_config(tmp_path, egress={
        "sources": [{"name": "ip1", "address": "127.0.0.2", "ehlo_name": "a.test"},
                    {"name": "far", "address": "192.0.2.55", "ehlo_name": "far.test"}],
        "pools": [{"name": "p", "sources": [{"source": "ip1"}, {"source": "far"}]}],
        "default_pool": "p"})
    path = tmp_path / "mta.toml"
    path.write_text(tomli_w.dumps(config))
    run = subprocess.run([sys.executable, "-m", "mta", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "far" in lines[0] and "192.0.2.55" in lines[0]


def test_a_source_address_gone_at_run_time_is_a_local_failure() -> None:
    """What marks a source down at run time (mta.delivery.deliverer._source_failed): the
    connection fails binding its address, not at the remote host."""
    from mta.delivery.connection import ConnectSettings, Target, connect

    async def attempt(source: str) -> Any:
        settings = ConnectSettings(port=9, helo="a.test", connect_timeout=5.0,
                                   command_timeout=5.0, source_address=source)
        return await connect([Target("mx.test", "127.0.0.9")], settings)

    conn, failures = asyncio.run(attempt("192.0.2.55"))
    assert conn is None and [f.local for f in failures] == [True]
    conn, failures = asyncio.run(attempt("127.0.0.2"))  # refused by the host: not local
    assert conn is None and [f.local for f in failures] == [False]


def test_counts_in_lmdb_and_the_sent_record_names_the_source_for_complaints(
        tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mta.egress.counters import EgressRecorder, name_sources, read_counts, source_noter
    from mta.egress.status import egress_report
    from mta.queue.spool import NewMessage, Spool

    spool = Spool(tmp_path / "spool", 64 * 1024**2)
    try:
        message = NewMessage("news@shop.test", ["u@gmail.com"], b"x", account="shop",
                             campaign="spring")
        spool.apply([spool.store_many_op([message])])
        ops: list[Any] = []

        async def submit(op: Any) -> None:
            ops.append(op)

        recorder = EgressRecorder(spool, frozenset({"a", "b"}), 0, submit)
        base = {"id": message.id, "account": "shop", "domain": "gmail.com",
                "provider": "gmail", "recipient": "u@gmail.com"}
        for kind, source in [("Delivery", "a"), ("Delivery", "a"), ("TransientFailure", "b"),
                             ("Bounce", "b"), ("Bounce", "async")]:
            recorder.on_event({"type": kind, "source": source, **base})
        recorder.on_event({"type": "Delivery", "source": "a", "dsn": True, **base})  # ours
        asyncio.run(recorder.flush())
        spool.apply(ops)
        assert read_counts(spool) == {
            "a": {"gmail": {"delivered": 2, "deferred": 0, "bounced": 0, "complained": 0}},
            "b": {"gmail": {"delivered": 0, "deferred": 1, "bounced": 1, "complained": 0}}}
        # The delivery's outcome transaction names its source (a deferral or our own DSN
        # through another source does not).
        note = source_noter(spool)
        stored = {"id": message.id, "account": "shop"}
        delivered = SimpleNamespace(delivered=["u@gmail.com"])
        spool.apply([
            lambda txn: note(txn, SimpleNamespace(message=stored, domain="gmail.com",
                                                  source="a", provider="gmail"), delivered),
            lambda txn: note(txn, SimpleNamespace(message=stored, domain="gmail.com",
                                                  source="b", provider="gmail"),
                             SimpleNamespace(delivered=[])),
            lambda txn: note(txn, SimpleNamespace(message={**stored, "dsn_for": "x"},
                                                  domain="gmail.com", source="b",
                                                  provider="gmail"), delivered)])
        with spool.read() as txn:
            origin = spool.sent_origin(txn, message.id)
        assert origin is not None and origin.sources == {"gmail.com": ["a", "gmail"]}
        complaint = name_sources([{"type": "Complaint", "source": "async",
                                   "recipient": "u@gmail.com"}], origin.sources)[0]
        assert complaint["egress_source"] == "a" and complaint["provider"] == "gmail"
        recorder.on_event(complaint)
        ops.clear()
        asyncio.run(recorder.flush())
        spool.apply(ops)
        assert read_counts(spool)["a"]["gmail"]["complained"] == 1
        report = egress_report(two_source_cfg(), spool)
        row = report["sources"][0]
        assert row["name"] == "a" and row["providers"]["gmail"]["complaint_rate"] == 50.0
        assert report["sources"][1]["providers"]["gmail"]["bounce_rate"] == 50.0
    finally:
        spool.close()


def test_a_source_failing_at_run_time_is_down_and_the_pool_carries_on(
        asyncio_sink_factory: Any) -> None:
    """192.0.2.55 is no address of this machine: bound at run time (as if it had gone
    since the start), its connections fail locally; the source is marked down (one
    SourceDown event) and every message goes from the other source of the pool."""
    from mta.delivery.deliverer import Deliverer
    from mta.delivery.mx import Host, Route
    from mta.queue.jobs import new_job
    from mta.queue.scheduler import Item
    from mta.throttle.shared import LocalBudget

    sink = asyncio_sink_factory(host="127.0.0.9", record=True)
    cfg = Config(egress=EgressConfig(
        [EgressSourceConfig("gone", "192.0.2.55", "gone.test"),
         EgressSourceConfig("here", "127.0.0.3", "here.test")],
        [EgressPoolConfig("p", [EgressPoolMember("gone", 3), EgressPoolMember("here", 1)])],
        default_pool="p"))
    cfg.delivery.port = sink.port

    class Resolver:
        async def route(self, domain: str) -> Route:
            return Route(domain, (Host("mx.dest.test", ("127.0.0.9",)),))

    async def run() -> tuple[RecordingScheduler, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        scheduler = RecordingScheduler()
        egress = Egress(Sources(cfg), down_interval=600.0, on_event=events.append)
        deliverer = Deliverer(cfg, Resolver(), Throttle(load_shaping(SHIPPED_SHAPING)),
                              LocalBudget(), scheduler, [], set(), None,  # type: ignore[arg-type]
                              egress=egress)
        for i in range(20):
            rcpt = f"user{i}@dest.test"
            job = new_job(b"M%d.0" % i, f"M{i}", "dest.test", "", "", [rcpt], 0)
            message = {"id": f"M{i}", "from": SENDER, "received": 0.0,
                       "data": b"Subject: x\r\n\r\nbody\r\n"}
            deliverer.dispatch(Item(job, message, 0.0))
        for _ in range(400):  # bounded: 20 s at most
            if len(scheduler.results) == 20:
                break
            await asyncio.sleep(0.05)
        await deliverer.close()
        return scheduler, events

    scheduler, events = asyncio.run(run())
    assert len(scheduler.results) == 20 and not scheduler.postponed
    assert all(r.delivered for results in scheduler.results.values() for r in results)
    assert {(m.peer.rpartition(":")[0], m.helo) for m in sink.received} == {
        ("127.0.0.3", "here.test")}
    assert [(e["type"], e["source"]) for e in events] == [("SourceDown", "gone")]
