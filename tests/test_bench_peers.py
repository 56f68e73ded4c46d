"""The bench's peers (issue 21): Postfix tuned for throughput, Exim 4.96 unpacked from
Debian's .deb, Haraka 3.3 from npm, each relaying a few hundred messages to the rig's
sinks; CPU by cgroup v2; the rig's DNS TTL; `--compare all`'s order and its table.

A peer that cannot be fetched or started fails its test with the reason (nothing is
skipped): the first use downloads it (apt-get download, npm install; see
bench/rig/peer_install.py), later runs use bench/out/peers/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from dnslib import QTYPE, DNSRecord

from bench.cgroup import CpuCgroup, CpuMeter
from bench.orchestrator import Options, run_once
from bench.pairs import ab_order, pair_comparison, pair_ratios, paired
from bench.peer_compare import Settle, compare_kinds, format_medians, interleaved, medians
from bench.procstat import ProcessTree
from bench.report import RunResult
from bench.rig import peer_install
from bench.rig.assembly import Rig
from bench.rig.exim import macros, route_table
from bench.rig.haraka import forward_sections
from bench.rig.postfix import main_cf, read_settings, tuned_settings
from bench.scenarios import destinations, load_scenario
from bench.targets import PEERS, check_target

ISSUE_21_POSTFIX = {
    "in_flow_delay": "0s",
    "default_process_limit": "200",
    "smtp_destination_concurrency_limit": "20",
    "smtp_destination_rate_delay": "0s",
    "smtp_connection_cache_on_demand": "yes",
}
SMOKE_COUNT = 300
SMOKE_SECONDS = 60.0


# --- configuration, no sockets ---------------------------------------------------------


def test_tuned_postfix_is_exactly_the_issues_settings_and_reaches_main_cf() -> None:
    assert tuned_settings() == ISSUE_21_POSTFIX
    text = main_cf(Path("/x"), extra={**tuned_settings(), "in_flow_delay": "2s"})
    assert "default_process_limit = 200\n" in text
    assert "in_flow_delay = 2s\n" in text  # a scenario's [postfix] table still wins


def test_main_cf_fragment_reader_skips_comments_and_refuses_garbage() -> None:
    assert read_settings("# c\n\n a = 1 \nb=x y\n") == {"a": "1", "b": "x y"}
    with pytest.raises(ValueError, match="line 2"):
        read_settings("a = 1\nno equals sign\n")


def test_exim_macros_and_routes() -> None:
    assert macros({"BENCH_PORT": 25, "BENCH_SPOOL": "/s"}) == "BENCH_PORT = 25\nBENCH_SPOOL = /s\n"
    with pytest.raises(ValueError):
        macros({"BENCH_SPOOL": "/s\n.include /etc/passwd"})
    assert route_table({"d1.test": "127.0.0.2"}) == "d1.test: 127.0.0.2\n"


def test_haraka_forward_sections_name_each_domains_sink() -> None:
    text = forward_sections({"d1.test": "127.0.0.2", "d2.test": "127.0.0.3"}, 2600)
    assert "[d1.test]\nhost=127.0.0.2\nport=2600\n" in text
    assert "[d2.test]\nhost=127.0.0.3\nport=2600\n" in text


def test_missing_libraries_are_the_uninstalled_lib_depends(monkeypatch: pytest.MonkeyPatch) -> None:
    depends = ("exim4-daemon-light\n  Depends: exim4-base\n |Depends: debconf\n"
               "  Depends: <debconf-2.0>\n  Depends: libc6\n  Depends: libidn12\n"
               "  Conflicts: libfoo\n")
    monkeypatch.setattr(peer_install, "_installed", lambda name: name == "libc6")
    assert peer_install.missing_libraries(depends) == ["libidn12"]


def test_compare_all_runs_every_peer_after_the_engine_in_interleaved_rounds() -> None:
    kinds = compare_kinds("engine", "all")
    assert kinds == ["engine", "postfix", "exim", "haraka"]
    assert interleaved(kinds, 2) == kinds + kinds
    assert compare_kinds("engine", "postfix-default") == ["engine", "postfix-default"]
    with pytest.raises(SystemExit):
        compare_kinds("postfix", "all")
    for kind in PEERS:
        check_target(kind)
    with pytest.raises(SystemExit):
        check_target("sendmail")


def test_a_round_starts_once_the_same_targets_last_round_has_settled() -> None:
    now = [100.0]
    settle = Settle(65.0, clock=lambda: now[0])
    assert settle.due_in("postfix") == 0.0  # no round yet
    settle.ended("postfix")
    now[0] += 20.0  # the engine's round in between
    settle.ended("engine")
    assert settle.due_in("postfix") == pytest.approx(45.0)
    assert settle.due_in("exim") == 0.0  # each target has its own
    now[0] += 70.0
    assert settle.due_in("postfix") == 0.0
    assert settle.due_in("engine") == 0.0
    assert Settle(0.0, clock=lambda: now[0]).due_in("postfix") == 0.0


def _result(target: str, e2e: float, accept: float, p99_s: float, cpu: float) -> RunResult:
    return RunResult(target=target, scenario="steady", accepted=1000, load_seconds=1000 / accept,
                     expected=1000, delivered=1000, e2e_seconds=1000 / e2e,
                     accept_latencies=[p99_s] * 10, cpu_seconds=cpu)


def test_medians_and_ratios_over_interleaved_rounds() -> None:
    results = [_result("engine", 900, 1000, 0.010, 1.0), _result("postfix", 300, 500, 0.040, 2.0),
               _result("engine", 1100, 1200, 0.012, 1.2), _result("postfix", 500, 700, 0.020, 3.0),
               _result("engine", 1000, 1100, 0.011, 1.1), _result("postfix", 400, 600, 0.030, 2.5)]
    table = medians(results)
    assert table["engine"]["e2e_rate"] == pytest.approx(1000)
    assert table["postfix"]["accept_p99_ms"] == pytest.approx(30.0)
    assert table["postfix"]["cpu_ms_per_msg"] == pytest.approx(2.5)
    text = format_medians(results)
    assert "engine / postfix: e2e 2.50 x, accept 1.83 x, accept p99 0.37 x, CPU/msg 0.44 x" in text



def test_ab_rounds_are_counterbalanced_and_paired_by_role() -> None:
    order = ab_order(3)
    assert order == [False, True, True, False, False, True]
    # A machine slowing down through the sitting: 1000, 950, ..., the variant as fast as
    # the baseline. Each round's pair, read by role, shows a ratio around 1 either way.
    results = [_result("pool" if variant else "single", 1000 - 50 * i, 1000, 0.01, 1.0)
               for i, variant in enumerate(order)]
    pairs = paired(results, order)
    assert [(a.target, b.target) for a, b in pairs] == [("single", "pool")] * 3
    ratios = pair_ratios(results, order)
    assert ratios[0] < 1 < ratios[1] and ratios[2] < 1
    text = pair_comparison(results, order, "4 sources / 1 source")
    assert "4 sources / 1 source e2e ratio per round: 0.95, 1.06, 0.94; median 0.95" in text
    assert "rounds: mean 0.982, standard error 0.039, lowest 0.94, highest 1.06" in text


# --- CPU by cgroup ---------------------------------------------------------------------

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


def test_cgroup_counts_a_grandchild_that_was_reaped_by_its_parent() -> None:
    cgroup, why_not = CpuCgroup.create("test")
    if cgroup is None:
        pytest.fail(f"cgroup v2 not writable here ({why_not}): the bench falls back on the "
                    "process walk, this test needs a cgroup")
    try:
        # The child starts a grandchild that burns 0.3 s of CPU, waits for it, and exits:
        # a /proc walk from the child sees none of it (the child's cutime is gone with it).
        code = (f"import subprocess, sys\n"
                f"subprocess.run([sys.executable, '-c', {BURN!r}], check=True)\n")
        subprocess.run([sys.executable, "-c", code], check=True, preexec_fn=cgroup.join,  # noqa: PLW1509
                       timeout=60)
        assert cgroup.usage_seconds() >= 0.25
        assert cgroup.pids() == []
    finally:
        cgroup.close()
    assert not cgroup.path.exists()


def test_cgroup_close_kills_what_the_mta_left_behind() -> None:
    meter = CpuMeter("test-leftover", ProcessTree(list))
    assert meter.cgroup is not None, meter.note
    proc = subprocess.Popen(["sleep", "60"], preexec_fn=meter.preexec,  # noqa: PLW1509
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while proc.pid not in meter.cgroup.pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.pid in meter.cgroup.pids()
    meter.close()
    assert proc.wait(10) != 0
    assert not meter.cgroup.path.exists()


def test_a_killed_bench_runs_empty_cgroup_is_removed_by_the_next() -> None:
    cgroup, why_not = CpuCgroup.create("first")
    assert cgroup is not None, why_not
    stale = cgroup.path.parent / "mta-bench-999999999-engine-1"  # no such pid
    stale.mkdir()
    cgroup.close()
    second, _ = CpuCgroup.create("second")
    assert second is not None
    second.close()
    assert not stale.exists()


# --- the rig's DNS TTL -----------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, 300])
def test_rig_serves_mx_answers_with_the_configured_ttl(ttl: int) -> None:
    scenario = load_scenario("steady")
    scenario.domains = replace(scenario.domains, count=2)
    dest = destinations(scenario)
    with Rig(scenario, dest, dns_ttl=ttl) as rig:
        reply = DNSRecord.parse(DNSRecord.question(dest.domains[0], "MX").send(
            rig.dns.host, rig.dns.port, timeout=5))
        [answer] = [rr for rr in reply.rr if rr.rtype == QTYPE.MX]
        assert answer.ttl == ttl
        assert f"TTL {ttl} s" in rig.describe()


# --- each peer relays a few hundred messages to the sinks ------------------------------


def smoke_options() -> Options:
    scenario = load_scenario("steady")
    scenario.load = replace(scenario.load, count=SMOKE_COUNT, sessions=10,
                            drain_timeout=SMOKE_SECONDS, stall_timeout=30.0)
    return Options(scenario, workers=2, progress=False)


@pytest.fixture(scope="module")
def peers_installed() -> None:
    """Fetch Exim and Haraka once (first use: apt-get download, npm install), outside
    the timed runs; a failure fails the tests that need them, with the reason."""
    try:
        peer_install.exim()
        peer_install.haraka()
    except peer_install.PeerInstallError as exc:
        pytest.fail(f"a peer could not be installed: {exc}")


@pytest.mark.parametrize("kind", ["postfix", "exim", "haraka"])
def test_peer_relays_every_message_to_the_sinks(kind: str, peers_installed: None) -> None:
    if kind == "postfix" and not Path("/usr/sbin/postfix").exists():
        pytest.fail("Debian package postfix not installed (scripts/system-packages.sh)")
    started = time.monotonic()
    result = run_once(kind, smoke_options())
    assert time.monotonic() - started < SMOKE_SECONDS, "the smoke run took too long"
    assert result.target == kind
    assert result.accepted == SMOKE_COUNT, result.replies
    assert result.delivered == result.expected == SMOKE_COUNT, result.notes
    assert result.cpu_seconds is not None and result.cpu_seconds > 0
    assert any("by cgroup v2" in note for note in result.notes), result.notes
    assert any("routed to the sinks by a table" in note for note in result.notes)


def test_webhook_bench_expects_the_events_of_its_set(tmp_path: Path) -> None:
    """`bench run --webhook` counts what the receiver asked for: the app's events by
    default (no Reception), every event of a message's path with `--webhook-events all`."""
    from bench.scenarios import load_scenario
    from bench.webhook_bench import EVENT_SETS, logged_ids, with_webhook

    lines = [{"type": "Reception", "event_id": "r1"}, {"type": "Delivery", "event_id": "d1"},
             {"type": "TransientFailure", "event_id": "t1"}, {"type": "Delivery"}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert logged_ids(tmp_path, EVENT_SETS["app"]) == {"d1"}
    assert logged_ids(tmp_path, EVENT_SETS["all"]) == {"r1", "d1", "t1"}
    hooked = with_webhook(load_scenario("steady"), "http://127.0.0.1:1/e", "s", EVENT_SETS["app"])
    assert hooked.engine["webhooks"][0]["events"] == EVENT_SETS["app"]
