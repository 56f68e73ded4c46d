"""The bench toolkit's parts without a rig: scenarios, traffic, matching, figures, configs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.accepts import AcceptLog
from bench.arrivals import CaptureReader, header, split_partial_separator
from bench.procstat import ProcessTree
from bench.report import RunResult, Sample, last_line, percentile, percentiles, rates
from bench.rig.postfix import main_cf, master_cf, opendkim_conf, transport_table
from bench.rig.sinks import CAPTURE_SEPARATOR, capture_head
from bench.scenarios import (
    ScenarioError,
    Traffic,
    destinations,
    domain_weights,
    index_of,
    list_scenarios,
    load_scenario,
    parse_scenario,
)
from bench.soak import verdict, windows
from bench.targets import EngineTarget, deep_merge
from mta.smtp.auth import verify_password

SEP = CAPTURE_SEPARATOR.encode()


# --- scenarios -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_scenarios())
def test_every_shipped_scenario_loads_and_makes_messages(name: str) -> None:
    scenario = load_scenario(name)
    traffic = Traffic(scenario, destinations(scenario))
    sub = traffic.submission(7)
    assert index_of(sub.data) == 7
    assert sub.data.endswith(b"\r\n") and b"\r\n.\r\n" not in sub.data
    assert traffic.plan[7].recipients + traffic.plan[7].throttled <= len(sub.recipients)


def test_prepared_submissions_are_those_composed_in_order_and_planned() -> None:
    """Composed before the clock starts, the messages are what composing them one by one
    during the run gives (same seed, same order), and the plan already knows them."""
    scenario = load_scenario("steady")
    prepared, live = (Traffic(scenario, destinations(scenario), run_id="r1") for _ in "ab")
    prepared.prepare(50)
    assert len(prepared.plan) == 50
    for i in range(60):  # past the prepared ones, composing goes on from the same draws
        a, b = prepared.submission(i), live.submission(i)
        assert (a.sender, a.recipients, index_of(a.data)) == (b.sender, b.recipients, i)
        assert a.data.split(b"Date:")[0] == b.data.split(b"Date:")[0]
    assert prepared.plan == live.plan


def test_submissions_over_the_memory_budget_are_composed_during_the_run() -> None:
    scenario = load_scenario("steady")
    traffic = Traffic(scenario, destinations(scenario))
    traffic.prepare(1000, budget=100 * 4096)
    assert traffic.plan == {}
    assert index_of(traffic.submission(3).data) == 3


def test_the_five_scenarios_of_the_issue_are_there() -> None:
    assert {"steady", "burst", "campaigns", "throttled", "bounces"} <= set(list_scenarios())


def test_steady_is_the_issue_load() -> None:
    s = load_scenario("steady")
    assert (s.load.count, s.load.sessions, s.domains.count) == (20000, 20, 100)
    assert s.sinks.hosts == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    sizes = [len(Traffic(s, destinations(s)).submission(i).data) for i in range(20)]
    assert all(3800 <= size <= 4300 for size in sizes)


@pytest.mark.parametrize("raw, problem", [
    ({"lod": {}}, "unknown key 'lod'"),
    ({"load": {"cuont": 1}}, "unknown key [load] cuont"),
    ({"load": {"count": "many"}}, "[load] count must be int"),
    ({"sinks": {"kind": "exim"}}, "kind must be"),
    ({"domains": {"unknown_share": 0.1}}, "needs [sinks] kind = 'asyncio'"),
])
def test_scenario_mistakes_are_named(raw: dict, problem: str) -> None:
    with pytest.raises(ScenarioError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_scenario(raw, "x")


def test_unknown_scenario_lists_the_known_ones() -> None:
    with pytest.raises(ScenarioError, match="steady"):
        load_scenario("no-such-scenario")


def test_providers_get_their_share_and_the_tail_the_rest() -> None:
    weights = domain_weights(100, 4, 0.6)
    assert sum(weights) == pytest.approx(1.0)
    assert sum(weights[:4]) == pytest.approx(0.6)
    assert weights[0] > weights[1] > weights[3] > weights[4] == weights[99]


def test_unknown_recipients_are_not_expected_at_the_sinks() -> None:
    s = parse_scenario({"domains": {"unknown_share": 1.0}, "sinks": {"kind": "asyncio"}}, "x")
    traffic = Traffic(s, destinations(s))
    sub = traffic.submission(0)
    assert sub.recipients[0].startswith("nouser")
    assert traffic.plan[0].recipients == 0


def test_throttled_domains_are_counted_apart() -> None:
    s = parse_scenario({"domains": {"providers": 1, "provider_share": 1.0},
                        "throttle": {"enabled": True, "providers": 1}}, "x")
    dest = destinations(s)
    assert dest.routes["d0000.bench.test"] == s.throttle.host
    traffic = Traffic(s, dest)
    traffic.submission(0)
    assert (traffic.plan[0].recipients, traffic.plan[0].throttled) == (0, 1)


def test_sequential_campaigns_come_in_blocks() -> None:
    s = parse_scenario({"messages": {"campaigns": 4, "campaign_order": "sequential",
                                     "campaign_size": 10, "accounts": 2}}, "x")
    traffic = Traffic(s, destinations(s))
    assert traffic.campaign(0) == traffic.campaign(9) == ("acct0", "acct0-c0")
    assert traffic.campaign(10) == ("acct1", "acct1-c1")


def test_the_engine_target_knows_every_account_and_logs_in_per_campaign(tmp_path: Path) -> None:
    s = load_scenario("campaigns")
    rig = SimpleNamespace(dns=SimpleNamespace(address="127.0.0.1:53"), sink_port=25)
    target = EngineTarget(tmp_path, s, rig, workers=1, dkim=None)  # type: ignore[arg-type]
    names = [a["name"] for a in target.config["accounts"]]
    assert names == [f"acct{k}" for k in range(s.messages.accounts)] == list(target.passwords)
    traffic = Traffic(s, destinations(s))
    logins = target.logins(traffic)
    assert logins is not None
    for i in (0, 49, 50, 1000, 19999):
        login = logins.login(i)
        assert login.user == traffic.campaign(i)[0] and login.password == target.passwords[login.user]
        assert verify_password(login.password.encode(),
                               target.config["accounts"][names.index(login.user)]["password_hash"])


def test_the_index_is_read_from_the_top_headers_only() -> None:
    dsn = b"From: MAILER-DAEMON\r\nSubject: x\r\n\r\nX-Bench-Index: 5\r\n"
    assert index_of(dsn) is None
    assert index_of(b"Received: x\r\nX-Bench-Index: 42\r\n\r\nbody\r\n") == 42


# --- matching arrivals -------------------------------------------------------------------


def capture(index: int, rcpts: int = 1) -> bytes:
    rcpt = "".join(f"X-Rcpt-Args: <u{index}.{k}@d.test>\n" for k in range(rcpts))
    return (SEP + b"X-Client-Addr: 127.0.0.1\nX-Mail-Args: <a@b>\n" + rcpt.encode()
            + b"Received: from x\n\tby smtp-sink\n\tdate\n"
            + f"X-Bench-Index: {index}\nSubject: s\n\nbody\n".encode())


def test_capture_reader_takes_only_what_the_counter_vouches_for(tmp_path: Path) -> None:
    path = tmp_path / "messages"
    sink = SimpleNamespace(messages=0, capture_file=path)
    reader = CaptureReader(sink)  # type: ignore[arg-type]
    path.write_bytes(capture(1) + capture(2, rcpts=3) + SEP[:5])
    sink.messages = 1
    reader.poll_counter()
    got = list(reader.read())
    assert [(index_of(d), n) for d, n, _ in got] == [(1, 1)]
    sink.messages = 3
    reader.poll_counter()
    with open(path, "ab") as f:
        f.write(capture(3)[5:])
    got = list(reader.read())
    assert [(index_of(d), n) for d, n, _ in got] == [(2, 3), (3, 1)]
    assert reader.taken == 3 and reader.pending == b""


def test_capture_reader_rotates_a_large_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.arrivals.ROTATE_BYTES", 10)
    monkeypatch.setattr("bench.arrivals.ROTATE_SETTLE", 0.0)
    path = tmp_path / "messages"
    sink = SimpleNamespace(messages=2, capture_file=path)
    reader = CaptureReader(sink)  # type: ignore[arg-type]
    path.write_bytes(capture(1) + capture(2))
    assert [index_of(d) for d, _, _ in reader.read()] == [1, 2]
    assert not path.exists() and reader.offset == 0
    path.write_bytes(capture(3))
    sink.messages = 3
    assert [index_of(d) for d, _, _ in reader.read()] == [3]
    assert reader.taken == 3


def test_capture_reader_dates_by_the_counter() -> None:
    reader = CaptureReader(SimpleNamespace(messages=0, capture_file=None))  # type: ignore[arg-type]
    reader.times, reader.counts = [10.0, 11.0, 12.0], [2, 5, 6]
    assert [reader.arrival(n) for n in (1, 2, 3, 5, 6)] == [10.0, 10.0, 11.0, 11.0, 12.0]


def test_a_separator_cut_in_half_waits_for_the_rest() -> None:
    assert split_partial_separator(b"abc\n" + SEP[:3]) == (b"abc\n", SEP[:3])
    assert split_partial_separator(b"abc\n") == (b"abc\n", b"")


def test_header_reads_top_level_values() -> None:
    data = b"DKIM-Signature: v=1;\r\n\tb=x\r\nSubject: hi\r\n\r\nSubject: no\r\n"
    assert header(data, b"subject") == "hi"
    assert header(data, b"DKIM-Signature") == "v=1;"
    assert header(data, b"To") == ""


def test_accepts_are_matched_to_their_index_by_task() -> None:
    log = AcceptLog(lambda i: SimpleNamespace(i=i))  # type: ignore[arg-type, return-value]

    async def worker(i: int, delay: float) -> None:
        log.submission(i)
        await asyncio.sleep(delay)
        log.on_accept(f"Q{i}", 100.0 + i)

    async def both() -> None:
        await asyncio.gather(worker(1, 0.02), worker(2, 0.0))

    asyncio.run(both())
    assert log.accepted_at == {1: 101.0, 2: 102.0}


# --- figures ------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank_in_ms() -> None:
    values = [i / 1000 for i in range(1, 101)]
    assert percentile(sorted(values), 50) == 0.05
    assert percentiles(values) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


def test_last_line_format() -> None:
    result = RunResult("engine", "steady", accepted=1000, load_seconds=2.0, delivered=1000,
                       e2e_seconds=4.0, e2e_latencies=[0.010] * 99 + [0.5])
    assert last_line(result) == "accepted_rate=500.0 e2e_rate=250.0 p50_ms=10.0 p99_ms=10.0"


def test_rates_over_windows() -> None:
    samples = [Sample(t / 2, 100 * t, 50 * t, None, None, None) for t in range(5)]
    times, values = rates(samples, "accepted")
    assert times == [0.5, 1.0, 1.5, 2.0] and values == [200.0] * 4


# --- configs and processes ---------------------------------------------------------------


def test_postfix_instance_config(tmp_path: Path) -> None:
    cf = main_cf(tmp_path, milter="inet:127.0.0.1:9999", extra={"queue_run_delay": "2s"})
    assert f"queue_directory = {tmp_path / 'queue'}\n" in cf
    assert "mynetworks = 127.0.0.0/8\n" in cf and "smtp_tls_security_level = none\n" in cf
    assert "smtpd_milters = inet:127.0.0.1:9999\n" in cf and "queue_run_delay = 2s\n" in cf
    assert master_cf("127.0.0.1", 2600).startswith("127.0.0.1:2600 inet n - n - - smtpd\n")
    assert transport_table({"d.test": "127.0.0.3"}, 2600) == "d.test smtp:[127.0.0.3]:2600\n"
    assert "Socket inet:8891@127.0.0.1\n" in opendkim_conf(tmp_path, 8891)


def test_deep_merge_keeps_what_is_not_overridden() -> None:
    base = {"delivery": {"port": 25, "allow_loopback_mx": True}, "smtp": {"listen": "x"}}
    merged = deep_merge(base, {"delivery": {"retry_initial": 2.0}})
    assert merged["delivery"] == {"port": 25, "allow_loopback_mx": True, "retry_initial": 2.0}
    assert base["delivery"] == {"port": 25, "allow_loopback_mx": True}


def test_process_tree_measures_this_process() -> None:
    tree = ProcessTree(lambda: [os.getpid()])
    sum(i * i for i in range(200_000))
    cpu, memory = tree.sample()
    assert cpu > 0 and memory > 1_000_000 and tree.peak_memory == memory


def test_soak_windows_cut_the_run_and_judge_it() -> None:
    samples = [Sample(float(t), 100 * t, 90 * t, 5, (50 + t) * 2**20, None) for t in range(25)]
    result = RunResult("engine", "steady", samples=samples, e2e_latencies=[0.01, 0.02, 0.03],
                       delivered_times=[1.0, 12.0, 24.0])
    rows = windows(result, 10.0)
    assert [(w.start, w.end) for w in rows] == [(0.0, 10.0), (10.0, 24.0)]
    assert rows[0].accepted_rate == 100.0 and rows[0].delivered_rate == 90.0
    assert rows[1].p99_ms == 30.0 and rows[1].memory_mib == 74.0
    assert verdict(rows)[0] == "memory: 60.0 -> 74.0 MiB (+14.0 MiB in 14 s)"


def test_free_ports_come_from_below_the_ephemeral_range(tmp_path: Path) -> None:
    """A port the kernel may give an outgoing connection is never handed to a listener."""
    import socket

    from bench.net import free_port, listen_range

    low, high = listen_range()
    for _ in range(20):
        port = free_port("127.0.0.1", "127.0.0.2")
        assert low <= port <= high
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("40000\t60999\n")
    assert listen_range(str(ranges)) == (28000, 39999)
    assert listen_range(str(tmp_path / "missing")) == (20768, 32767)


def test_free_port_never_hands_out_a_port_twice_before_it_is_bound() -> None:
    """An engine's SMTP and HTTP addresses are drawn one after the other, neither bound
    yet: 400 draws from 12,000 ports would repeat one almost surely (birthday odds
    above 99 %) if the draws did not remember what they gave."""
    from bench.net import free_port

    ports = [free_port() for _ in range(400)]
    assert len(set(ports)) == len(ports)


# --- the rig's scheduling policy ---------------------------------------------------------

RIG_AND_TARGET = """
import os, subprocess, sys
from bench.rig.sched import as_target, rig_policy
rig_policy(sys.argv[1])
probe = [sys.executable, "-c",
         "import os; print(os.sched_getscheduler(0), os.environ.get('JOINED', '-'))"]
rig = subprocess.run(probe, capture_output=True, text=True, check=True).stdout
target = subprocess.run(probe, capture_output=True, text=True, check=True,
                        preexec_fn=as_target(lambda: os.environ.update(JOINED="1"))).stdout
print(rig, target)
"""


@pytest.mark.parametrize("policy", ["batch", "normal"])
def test_the_rig_yields_to_the_mta_under_test(policy: str) -> None:
    """What the rig starts has the rig's policy; an MTA under test starts at the normal
    one whatever the rig's, and what it starts with (its cgroup join: `then`) still runs."""
    out = subprocess.run([sys.executable, "-c", RIG_AND_TARGET, policy], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parent.parent).stdout.split()
    expected_rig = os.SCHED_BATCH if policy == "batch" else os.SCHED_OTHER
    assert out == [str(expected_rig), "-", str(os.SCHED_OTHER), "1"]


def test_capture_head_is_the_header_block_and_the_rcpt_count() -> None:
    # What the arrival tracker reads of each delivered message: the header block in CRLF
    # form (never a line of the body) and how many RCPT TO the sink took.
    chunk = capture(4, rcpts=2).removeprefix(SEP).replace(
        b"Subject: s\n", b"Subject: s\n t\n") + b"X-Bench-Index: 99\n"
    head, rcpts = capture_head(chunk)
    assert head == b"X-Bench-Index: 4\r\nSubject: s\r\n t\r\n\r\n" and rcpts == 2
    assert index_of(head) == 4 and header(head, b"Subject") == "s"
    headless = b"X-Rcpt-Args: <a@b>\nReceived: x\n\ty\n\tz\n\nX-Bench-Index: 5\n"
    assert capture_head(headless) == (b"\r\n\r\n", 1)
    assert index_of(capture_head(headless)[0]) is None
    assert capture_head(b"X-Client-Addr: 127.0.0.1\n") == (b"", 0)
