"""Warm-up (mta.egress.warmup*): the ramp as pure logic, the gate with a fake clock over a
real LMDB spool (several processes) and a real Redis (several nodes), health signals."""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from mta.cluster import RedisLink
from mta.cluster.warmup import RedisRampStore
from mta.config import ClusterConfig
from mta.egress.health import SignalReader, signal_name
from mta.egress.warmup import (
    HealthLimits,
    Ramp,
    Signals,
    Verdict,
    cap_at,
    day_of,
    judge,
    next_day_start,
    roll,
)
from mta.egress.warmup_gate import WarmingSource, WarmupGate
from mta.egress.warmup_store import LmdbRampStore
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool

UTC = ZoneInfo("UTC")
PARIS = ZoneInfo("Europe/Paris")
SCHEDULE = [50, 100, 200, 0]
LIMITS = HealthLimits(max_hard_bounce_rate=0.02, max_complaint_rate=0.001,
                      max_deferral_rate=0.05, min_sample=50)


def at(day: str, hour: int = 12, tz: ZoneInfo = UTC) -> float:
    d = dt.date.fromisoformat(day)
    return dt.datetime(d.year, d.month, d.day, hour, tzinfo=tz).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- pure logic ------------------------------------------------------------------------


def test_days_roll_over_at_the_time_zones_midnight() -> None:
    late = at("2026-12-05", 23, UTC)  # 00:00 on the 6th in Paris
    assert day_of(late, UTC) == "2026-12-05"
    assert day_of(late, PARIS) == "2026-12-06"
    assert next_day_start(at("2026-12-05", 12, UTC), UTC) == at("2026-12-06", 0, UTC)
    assert next_day_start(at("2026-12-05", 12, PARIS), PARIS) == at("2026-12-06", 0, PARIS)
    # the day daylight saving time ends in Paris has 25 hours
    assert next_day_start(at("2026-10-25", 1, PARIS), PARIS) - at("2026-10-25", 0, PARIS) \
        == 25 * 3600


def test_caps_of_the_schedule() -> None:
    assert [cap_at(SCHEDULE, step) for step in range(5)] == [50, 100, 200, None, None]


def test_judge_needs_a_sample_then_checks_each_rate() -> None:
    assert judge(Signals(delivered=49), LIMITS, 100)[0] is None
    assert judge(Signals(delivered=10), LIMITS, 10)[0] is True  # the whole cap is enough
    healthy, reason = judge(Signals(delivered=100), LIMITS, 100)
    assert healthy is True and reason.startswith("healthy")
    healthy, reason = judge(Signals(delivered=95, hard_bounces=5), LIMITS, 100)
    assert healthy is False and "hard-bounce rate 5.0 %" in reason
    healthy, reason = judge(Signals(delivered=100, complaints=1), LIMITS, 100)
    assert healthy is False and "complaint rate 1.0 %" in reason
    healthy, reason = judge(Signals(delivered=90, deferrals=10), LIMITS, 100)
    assert healthy is False and "deferral rate 10.0 %" in reason


def test_roll_advances_holds_steps_back_and_stays_quiet() -> None:
    ramp = Ramp(1, "2026-12-05")
    same, none = roll(ramp, "2026-12-05", SCHEDULE, LIMITS, Signals(delivered=100))
    assert same == ramp and none is None
    up, t = roll(ramp, "2026-12-06", SCHEDULE, LIMITS, Signals(delivered=100))
    assert (up.step, up.day, t.verdict, t.cap) == (2, "2026-12-06", Verdict.ADVANCED, 200)
    held, t = roll(ramp, "2026-12-06", SCHEDULE, LIMITS, Signals(delivered=50, deferrals=50))
    assert (held.step, t.verdict) == (1, Verdict.HELD) and "deferral" in t.reason
    back, t = roll(ramp, "2026-12-06", SCHEDULE,
                   HealthLimits(step_back=True), Signals(delivered=50, hard_bounces=50))
    assert (back.step, t.verdict, t.cap) == (0, Verdict.STEPPED_BACK, 50)
    quiet, t = roll(ramp, "2026-12-06", SCHEDULE, LIMITS, Signals())
    assert quiet.step == 1 and quiet.verdict is Verdict.HELD and t is None
    few, t = roll(ramp, "2026-12-06", SCHEDULE, LIMITS, Signals(delivered=3))
    assert few.step == 1 and t.verdict is Verdict.HELD and "too few" in t.reason
    top, t = roll(Ramp(3, "2026-12-05"), "2026-12-06", SCHEDULE, LIMITS, Signals(delivered=99))
    assert top.step == 3 and t is None  # unlimited already: nothing to tell


def test_signals_from_events() -> None:
    base = {"egress_source": "warm", "provider": "gmail", "recipient": "a@gmail.test"}
    assert signal_name({"type": "Delivery", **base}) == "delivered"
    assert signal_name({"type": "Bounce", "kind": "hard", **base}) == "hard_bounces"
    assert signal_name({"type": "Bounce", "kind": "soft", **base}) is None
    assert signal_name({"type": "Complaint", **base}) == "complaints"
    rate = {"type": "TransientFailure", "code": 421, "status": "4.7.28",
            "reply": "Our system has detected an unusual rate of unsolicited mail", **base}
    assert signal_name(rate) == "deferrals"
    blocked = {"type": "TransientFailure", "code": 450, "status": "4.7.1",
               "reply": "client host blocked", "reason": "blocked", **base}
    assert signal_name(blocked) == "deferrals"
    full = {"type": "TransientFailure", "code": 452, "status": "4.2.2",
            "reply": "mailbox full", "reason": "mailboxfull", **base}
    assert signal_name(full) is None
    assert signal_name({"type": "Delivery", "dsn": True, **base}) is None
    reader = SignalReader(frozenset({"warm"}))
    assert reader.read({"type": "Delivery", **base}).provider == "gmail"
    # a complaint names only the recipient: the provider learned from deliveries
    complaint = {"type": "Complaint", "egress_source": "warm", "source": "async",
                 "recipient": "b@gmail.test"}
    assert reader.read(complaint).provider == "gmail"
    assert reader.read({"type": "Delivery", "source": "async", "provider": "x"}) is None
    site = {"type": "Delivery", "source": "warm", "provider": "", "recipient": "c@small.test",
            "egress_provider": "mx:mx.small.test"}
    assert reader.read(site).provider == "mx:mx.small.test"
    assert reader.read({"type": "Delivery", "source": "other", "provider": "x"}) is None


# --- the gate over LMDB, fake clock ------------------------------------------------------


def make_gate(spool: Spool, committer: GroupCommitter, clock: Clock, events: list[Any],
              limits: HealthLimits = LIMITS, start: str = "2026-12-05",
              tz: ZoneInfo = UTC) -> WarmupGate:
    warming = {"warm": WarmingSource("warm", start, SCHEDULE)}
    return WarmupGate(warming, LmdbRampStore(spool, committer.submit), limits, tz,
                      events.append, clock=clock)


async def admit_many(gate: WarmupGate, provider: str, n: int) -> int:
    return sum([await gate.admit("warm", provider) for _ in range(n)])


def feed(gate: WarmupGate, provider: str, **counts: int) -> None:
    types = {"delivered": ("Delivery", {}), "hard_bounces": ("Bounce", {"kind": "hard"}),
             "deferrals": ("TransientFailure", {"code": 421, "status": "4.7.28",
                                                "reply": "rate limited, slow down"})}
    for name, n in counts.items():
        kind, extra = types[name]
        for i in range(n):
            gate.on_event({"type": kind, "egress_source": "warm", "provider": provider,
                           "recipient": f"r{i}@{provider}.test", **extra})


def run_lmdb(tmp_path: Path, scenario: Any) -> None:
    async def main() -> None:
        spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
        committer = GroupCommitter(spool)
        committer.start()
        try:
            await scenario(spool, committer)
        finally:
            await committer.close()
            spool.close()

    asyncio.run(main())


def test_day_cap_per_provider_then_healthy_day_raises_it(tmp_path: Path) -> None:
    async def scenario(spool: Spool, committer: GroupCommitter) -> None:
        clock, events = Clock(at("2026-12-05", 10)), []
        gate = make_gate(spool, committer, clock, events)
        assert gate.established("other") and not gate.established("warm")
        assert await gate.admit("other", "gmail")
        assert await admit_many(gate, "gmail", 80) == 50
        assert await admit_many(gate, "yahoo", 10) == 10  # its own cap at another provider
        assert gate.retry_at("warm", "gmail") == at("2026-12-06", 0)
        feed(gate, "gmail", delivered=50)
        feed(gate, "yahoo", delivered=10)
        await gate.flush()
        clock.now = at("2026-12-05", 23) + 3599  # still the same day
        assert not await gate.admit("warm", "gmail")
        clock.now = at("2026-12-06", 0) + 1  # after midnight: healthy, one step up
        assert await admit_many(gate, "gmail", 150) == 100
        assert [e["type"] for e in events] == ["WarmupAdvanced"]
        assert events[0] | {"source": "warm", "provider": "gmail", "step": 1, "cap": 100} \
            == events[0]
        await gate.refresh()
        status = gate.status()["sources"]["warm"]["providers"]
        assert status["gmail"]["sent_today"] == 100 and status["gmail"]["cap"] == 100
        # yahoo sent 10 (fewer than its cap of 50 and the sample): held, told
        assert await admit_many(gate, "yahoo", 60) == 50
        assert events[-1]["type"] == "WarmupHeld" and "too few" in events[-1]["reason"]

    run_lmdb(tmp_path, scenario)


def test_reputation_deferrals_hold_the_ramp(tmp_path: Path) -> None:
    async def scenario(spool: Spool, committer: GroupCommitter) -> None:
        clock, events = Clock(at("2026-12-05", 10)), []
        gate = make_gate(spool, committer, clock, events)
        assert await admit_many(gate, "gmail", 50) == 50
        feed(gate, "gmail", delivered=40, deferrals=10)
        await gate.flush()
        clock.now = at("2026-12-06", 10)
        assert await admit_many(gate, "gmail", 80) == 50  # still step 0
        assert [e["type"] for e in events] == ["WarmupHeld"]
        assert "reputation/slow-down deferral rate 20.0 %" in events[0]["reason"]
        assert gate.status()["transitions"][0]["type"] == "WarmupHeld"

    run_lmdb(tmp_path, scenario)


def test_hard_bounces_step_back_when_configured(tmp_path: Path) -> None:
    async def scenario(spool: Spool, committer: GroupCommitter) -> None:
        clock, events = Clock(at("2026-12-05", 10)), []
        gate = make_gate(spool, committer, clock, events,
                         limits=HealthLimits(min_sample=50, step_back=True))
        assert await admit_many(gate, "gmail", 50) == 50
        feed(gate, "gmail", delivered=50)
        await gate.flush()
        clock.now = at("2026-12-06", 10)
        assert await admit_many(gate, "gmail", 100) == 100  # advanced to 100
        feed(gate, "gmail", delivered=80, hard_bounces=20)
        await gate.flush()
        clock.now = at("2026-12-07", 10)
        assert await admit_many(gate, "gmail", 100) == 50  # back to 50
        assert [e["type"] for e in events] == ["WarmupAdvanced", "WarmupSteppedBack"]
        assert "hard-bounce rate 20.0 %" in events[-1]["reason"]

    run_lmdb(tmp_path, scenario)


def test_nothing_before_the_start_day(tmp_path: Path) -> None:
    async def scenario(spool: Spool, committer: GroupCommitter) -> None:
        clock = Clock(at("2026-12-04", 22, PARIS))
        gate = make_gate(spool, committer, clock, [], start="2026-12-05", tz=PARIS)
        assert not await gate.admit("warm", "gmail")
        assert gate.retry_at("warm", "gmail") == at("2026-12-05", 0, PARIS)
        clock.now = at("2026-12-05", 0, PARIS) + 1
        assert await gate.admit("warm", "gmail")

    run_lmdb(tmp_path, scenario)


def _worker_admits(path: str, now: float, tries: int, out: Any) -> None:
    async def main() -> tuple[int, int]:
        spool = Spool(path, map_size=64 * 1024**2)
        committer = GroupCommitter(spool)
        committer.start()
        events: list[Any] = []
        gate = make_gate(spool, committer, Clock(now), events)
        results = await asyncio.gather(*(gate.admit("warm", "gmail") for _ in range(tries)))
        await committer.close()
        spool.close()
        return sum(results), len(events)

    out.put(asyncio.run(main()))


def run_workers(path: str, now: float, tries: int, n: int = 4) -> list[tuple[int, int]]:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker_admits, args=(path, now, tries, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return results


def test_workers_sharing_the_spool_never_exceed_the_cap(tmp_path: Path) -> None:
    path = str(tmp_path / "spool")
    Spool(path, map_size=64 * 1024**2).close()
    results = run_workers(path, at("2026-12-05"), 40)
    assert sum(taken for taken, _ in results) == 50, results

    async def healthy_day() -> None:  # what the workers' events would have added
        spool = Spool(path, map_size=64 * 1024**2)
        committer = GroupCommitter(spool)
        committer.start()
        await LmdbRampStore(spool, committer.submit).add_signals(
            {("warm", "gmail", "2026-12-05"): {"delivered": 50}})
        await committer.close()
        spool.close()

    asyncio.run(healthy_day())
    results = run_workers(path, at("2026-12-06"), 40)  # all roll the day over at once
    assert sum(taken for taken, _ in results) == 100, results
    assert sum(told for _, told in results) == 1  # one WarmupAdvanced, from one worker


# --- the gate over Redis: several nodes ----------------------------------------------------


def test_nodes_sharing_redis_never_exceed_the_cap(redis_server: Any) -> None:
    cfg = ClusterConfig(redis=redis_server.url, timeout=2.0, retry_interval=0.2, node_ttl=3)

    async def main() -> None:
        links = [RedisLink(cfg, f"n{i}/0") for i in range(3)]
        for link in links:
            await link.start()
        clock, events = Clock(at("2026-12-05", 10)), []
        gates = [WarmupGate({"warm": WarmingSource("warm", "2026-12-05", SCHEDULE)},
                            RedisRampStore(link), LIMITS, UTC, events.append, clock=clock)
                 for link in links]
        results = await asyncio.gather(*(g.admit("warm", "gmail") for g in gates
                                         for _ in range(40)))
        assert sum(results) == 50
        feed(gates[0], "gmail", delivered=30)
        feed(gates[1], "gmail", delivered=20)
        await gates[0].flush()
        await gates[1].flush()
        clock.now = at("2026-12-06", 10)
        results = await asyncio.gather(*(g.admit("warm", "gmail") for g in gates
                                         for _ in range(50)))
        assert sum(results) == 100
        assert [e["type"] for e in events] == ["WarmupAdvanced"]  # one node rolled the day
        await gates[2].refresh()
        row = gates[2].status()["sources"]["warm"]["providers"]["gmail"]
        assert (row["step"], row["sent_today"]) == (1, 100)
        for link in links:
            await link.close()

    asyncio.run(main())


@pytest.mark.parametrize("tz", ["UTC", "America/New_York"])
def test_retry_at_is_the_next_midnight(tmp_path: Path, tz: str) -> None:
    zone = ZoneInfo(tz)

    async def scenario(spool: Spool, committer: GroupCommitter) -> None:
        clock = Clock(at("2026-12-05", 18, zone))
        gate = make_gate(spool, committer, clock, [], tz=zone)
        assert gate.retry_at("warm", "gmail") is None  # not refused for its cap
        assert await admit_many(gate, "gmail", 51) == 50
        assert gate.retry_at("warm", "gmail") == at("2026-12-06", 0, zone)
        assert gate.retry_at("other", "gmail") is None

    run_lmdb(tmp_path, scenario)


def test_while_redis_is_down_nothing_is_taken_and_it_resumes(redis_server: Any) -> None:
    cfg = ClusterConfig(redis=redis_server.url, timeout=0.5, retry_interval=0.1, node_ttl=3)

    async def main() -> None:
        link = RedisLink(cfg, "n1/0")
        await link.start()
        clock = Clock(at("2026-12-05", 10))
        gate = WarmupGate({"warm": WarmingSource("warm", "2026-12-05", SCHEDULE)},
                          RedisRampStore(link), LIMITS, UTC, lambda e: None, clock=clock)
        assert await admit_many(gate, "gmail", 10) == 10
        redis_server.stop()
        assert not await gate.admit("warm", "gmail")  # caps cannot be checked: refused
        assert gate.retry_at("warm", "gmail") is None  # look again soon, not tomorrow
        feed(gate, "gmail", delivered=5)
        await gate.flush()  # kept while down
        assert gate.store.pending
        redis_server.start()
        deadline = asyncio.get_running_loop().time() + 30
        while not link.up and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert await admit_many(gate, "gmail", 60) == 40  # the day's count survived
        await gate.flush()
        assert not gate.store.pending
        assert (await gate.store.signals(("warm", "gmail"), "2026-12-05")).delivered == 5
        await link.close()

    asyncio.run(main())


CONFIG = """
[egress]
default_pool = "p"
[[egress.sources]]
name = "new"
address = "127.0.0.2"
ehlo_name = "new.test"
warmup_start = "2026-12-01"
[[egress.sources]]
name = "newer"
address = "127.0.0.3"
ehlo_name = "newer.test"
warmup_start = "2026-12-03"
warmup_schedule = [10, 0]
[[egress.sources]]
name = "old"
address = "127.0.0.4"
ehlo_name = "old.test"
[[egress.pools]]
name = "p"
sources = [{ source = "new" }, { source = "newer" }, { source = "old" }]
[egress.warmup]
schedule = [50, 500, 0]
timezone = "Europe/Paris"
on_bad_health = "step_back"
"""


def test_config_names_the_warming_sources_and_their_schedules(tmp_path: Path) -> None:
    from mta.config import load_config
    from mta.egress.warmup_gate import limits_of, warming_sources

    path = tmp_path / "mta.toml"
    path.write_text(CONFIG)
    cfg = load_config(path)
    assert warming_sources(cfg) == {
        "new": WarmingSource("new", "2026-12-01", [50, 500, 0]),
        "newer": WarmingSource("newer", "2026-12-03", [10, 0])}
    assert limits_of(cfg.egress.warmup).step_back


@pytest.mark.parametrize(("change", "message"), [
    ('warmup_start = "2026-12-01"', 'warmup_start = "yesterday"'),
    ('schedule = [50, 500, 0]', "schedule = [50, 0, 500]"),
    ('timezone = "Europe/Paris"', 'timezone = "Europe/Atlantis"'),
    ('on_bad_health = "step_back"', 'on_bad_health = "panic"'),
])
def test_bad_warmup_settings_are_one_line_errors(tmp_path: Path, change: str,
                                                 message: str) -> None:
    from mta.config import ConfigError, load_config

    path = tmp_path / "mta.toml"
    path.write_text(CONFIG.replace(change, message, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "\n" not in text and message.split(" =")[0] in text
