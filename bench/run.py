"""`python -m bench run`: a complete local rig, a load through it, and a report.

The rig, all on loopback: a DNS server (bench.rig.dns) serving the scenario's test
domains, sink MX servers on 127.0.0.x sharing one port (Postfix's smtp-sink by
default, our asyncio sink where per-recipient refusals are needed, a throttling MX
where the scenario has one), the MTA under test (our engine as `mta serve` on a
temporary spool, a peer as a relay instance -- Postfix tuned for throughput or on its
defaults, Exim 4.96, Haraka 3.3, configured in bench/peers/ -- or any HOST:PORT), and
the load generator (bench.load). Every message carries an X-Bench-Index header; the load
generator records when each was accepted, the sinks when each arrived, and the two
are matched for the accept-to-delivered latency.

Everything started here is stopped at the end, after a failure or Ctrl-C too.

Where the parts are:

    bench/run.py            this command: its arguments, the runs, the report
    bench/orchestrator.py   one run: rig, target, load, drain, result, teardown
    bench/rig/assembly.py   the rig of a scenario: DNS and the sink MX servers
    bench/targets.py        the MTA under test: engine, a peer, HOST:PORT
    bench/peer_compare.py   --compare: the order of the runs, the medians and ratios
    bench/cgroup.py         CPU of a target's whole process tree (cgroup v2)
    bench/rig/sched.py      the rig's processes yield the CPU to the MTA under test
    bench/rig/exim.py, haraka.py, peer_install.py   the peers, fetched on first use
    bench/peers/            the peers' configurations, a comment per setting
    bench/accepts.py        the load's side: which message each 250 was for
    bench/arrivals.py       the sinks' side: which message arrived when
    bench/monitor.py        a sample every 0.1 s and the live progress line
    bench/results.py        the accepts, arrivals and samples made into a RunResult
    bench/report.py         the text report, the JSON figures, the plot, the last line
    bench/interrupts.py     Ctrl-C and SIGTERM: stop and tear down
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.engine_proc import PROJECT_ROOT
from bench.interrupts import stop_on_signals
from bench.orchestrator import Options, run_once
from bench.pairs import ab_order, pair_comparison
from bench.peer_compare import SETTLE, Settle, compare_kinds, format_medians, interleaved
from bench.report import RunResult, format_comparison, format_report, last_line, save_outputs
from bench.rig.dns import DEFAULT_TTL
from bench.rig.sched import rig_policy
from bench.scenarios import Scenario, load_scenario
from bench.sources import with_sources
from bench.targets import PEERS, check_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", default="steady", help="a name in bench/scenarios/ or a file")
    parser.add_argument("--count", type=int, help="messages to submit (scenario's by default)")
    parser.add_argument("--duration", type=float, help="submit for this many seconds instead")
    parser.add_argument("--rate", type=float, help="target msg/s overall (0: as fast as possible)")
    parser.add_argument("--sessions", type=int, help="concurrent SMTP sessions")
    parser.add_argument("--target", default="engine",
                        help="engine (default), postfix (tuned), postfix-default, exim, "
                             "haraka, or HOST:PORT of any MTA")
    parser.add_argument("--compare", choices=[*PEERS, "all"],
                        help="also run this peer (configs in bench/peers/: postfix tuned for "
                             "throughput, postfix-default, exim 4.96, haraka 3.3; all: each "
                             "in turn), --rounds interleaved; prints medians and ratios")
    parser.add_argument("--dns-ttl", type=int, default=DEFAULT_TTL, metavar="SECONDS",
                        help="TTL of the rig's MX and A answers (default %(default)s; 0: a "
                             "lookup for every message). The peers route by table: no DNS")
    parser.add_argument("--dkim", action="store_true", help="sign with RSA-2048 (OpenDKIM for Postfix)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--sink-port", type=int, default=0, help="port of every sink (0: free)")
    parser.add_argument("--dns-port", type=int, default=0, help="port of the rig's DNS (0: free)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "out"),
                        help="folder for the PNG plot and the JSON figures")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--quiet", action="store_true", help="no live progress line")
    parser.add_argument("--tls", action="store_true",
                        help="the engine twice on the same rig of asyncio sinks: plain text, "
                             "then STARTTLS at every sink (certificates from a local CA, "
                             "verified); prints the TLS / plain ratio")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --tls: this many plain/TLS pairs, alternating; with "
                             "--compare: this many rounds of every target, interleaved (the "
                             "medians are less at the mercy of other load on the machine)")
    parser.add_argument("--html", action="store_true",
                        help="messages with a text part and an HTML part holding links")
    parser.add_argument("--tracking", choices=["on", "off", "compare"],
                        help="the engine's open and click tracking; compare: off then on, "
                             "--rounds pairs, and the ratio of their end-to-end rates")
    parser.add_argument("--sources", type=int, default=0, metavar="N",
                        help="the engine with a pool of N loopback sources (mta.egress) next "
                             "to the engine with one source: --rounds pairs, alternating, "
                             "and the ratio of their end-to-end rates (bench/sources.py)")
    parser.add_argument("--webhook", action="store_true",
                        help="run the engine without, then with a loopback webhook receiver "
                             "(every event checked by id; e2e ratio; bench/webhook_bench.py)")
    parser.add_argument("--webhook-events", choices=["app", "all"], default="app",
                        help="with --webhook: the events the receiver asks for; app (default): "
                             "Delivery, Bounce, Expiration, Complaint, Unsubscribe, "
                             "CampaignPaused; all: Reception and TransientFailure too")
    parser.add_argument("--rig-sched", choices=["batch", "normal"], default="batch",
                        help="scheduling policy of the rig's own processes (load generator, "
                             "sinks, DNS); batch (default): they never preempt the MTA under "
                             "test when it wakes them (bench/rig/sched.py)")
    parser.add_argument("--settle", type=float, default=SETTLE, metavar="SECONDS",
                        help="with --compare: a target's round starts at least this long "
                             "after its previous one ended (default %(default)s; 0: at once): "
                             "a file-per-message queue on this machine's ext4 pays for inodes "
                             "freed within the last minute (bench/peer_compare.py)")
    parser.add_argument("--auth", default="", metavar="USER:PASSWORD",
                        help="AUTH PLAIN as this user at a --target HOST:PORT (after STARTTLS "
                             "when offered); the engine target authenticates per account")


def scenario_from(args: argparse.Namespace) -> Scenario:
    scenario = load_scenario(args.scenario)
    overrides = {key: getattr(args, key) for key in ("count", "duration", "rate", "sessions")
                 if getattr(args, key) is not None}
    if overrides:
        scenario.load = replace(scenario.load, **overrides)
    if args.html:
        scenario.messages = replace(scenario.messages, html=True)
    return scenario


def with_tracking(scenario: Scenario, on: bool) -> Scenario:
    engine = {**scenario.engine, "tracking": {**scenario.engine.get("tracking", {}),
                                              "opens": on, "clicks": on}}
    return replace(scenario, engine=engine)


def targets_of(args: argparse.Namespace) -> list[str]:
    kinds = compare_kinds(args.target, args.compare)
    for kind in kinds:
        check_target(kind)
    if args.dkim and {"exim", "haraka"} & set(kinds):
        raise SystemExit("--dkim: only the engine and Postfix (OpenDKIM) sign in the bench; "
                         "no exim or haraka")
    return interleaved(kinds, args.rounds) if args.compare else kinds


def ab_comparison(args: argparse.Namespace) -> str | None:
    """The ratio line's label of the A/B comparison asked for (--tls, --tracking compare,
    --sources), or None."""
    asked = [label for label, on in (
        ("TLS / plain", args.tls),
        ("tracking on / off", args.tracking == "compare"),
        (f"{args.sources} sources / 1 source", bool(args.sources))) if on]
    if not asked:
        return None
    if len(asked) > 1 or args.target != "engine" or args.compare or (
            args.tracking and args.tracking != "compare"):
        raise SystemExit("--tls, --tracking compare and --sources each run the engine "
                         "twice: one of them, and no --target, --compare or --tracking")
    return asked[0]


def ab_options(args: argparse.Namespace, scenario: Scenario, opts: Options,
               variant: bool) -> Options:
    """The options of the baseline (A) or the variant (B) run of an A/B comparison."""
    if args.tls:  # smtp-sink has no STARTTLS: both runs on our sinks, the same terms
        return replace(opts, tls=variant, sink_processes=True)
    if args.tracking == "compare":
        return replace(opts, scenario=with_tracking(scenario, variant))
    return replace(opts, scenario=with_sources(scenario, args.sources if variant else 0))


def main(args: argparse.Namespace) -> int:
    rig_policy(args.rig_sched)  # before the rig starts: what it starts inherits it
    stop_on_signals()
    if args.dns_ttl < 0:
        raise SystemExit("--dns-ttl must be 0 or more seconds")
    scenario = scenario_from(args)
    if args.tls:
        scenario.sinks = replace(scenario.sinks, kind="asyncio")
    opts = Options(scenario, args.workers, args.dkim, args.sink_port, args.dns_port, args.keep,
                   not args.quiet, args.auth, dns_ttl=args.dns_ttl)
    if args.webhook:
        if args.target != "engine" or args.compare or args.tls or args.tracking or args.sources:
            raise SystemExit("--webhook runs the engine twice: no --target, --compare, --tls, "
                             "--tracking or --sources")
        from bench.webhook_bench import webhook_compare

        try:
            return webhook_compare(args, scenario, opts)
        except KeyboardInterrupt:
            print("\ninterrupted: everything started has been stopped", file=sys.stderr)
            return 130
    label = ab_comparison(args)
    order = ab_order(args.rounds) if label else []
    if label:
        runs = [("engine", ab_options(args, scenario, opts, variant)) for variant in order]
    else:
        tracking = {"on": True, "off": False}.get(args.tracking or "")
        run_opts = opts if tracking is None else replace(
            opts, scenario=with_tracking(scenario, tracking))
        runs = [(kind, run_opts) for kind in targets_of(args)]
    results: list[RunResult] = []
    settle = Settle(args.settle if args.compare else 0.0)
    try:
        for kind, run_opts in runs:
            wait = settle.due_in(kind)
            if wait > 0:
                if not args.quiet:
                    print(f"{kind}: next round in {wait:.0f} s (--settle)", flush=True)
                time.sleep(wait)
            results.append(run_once(kind, run_opts))
            settle.ended(kind)
            print(format_report(results[-1]), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: everything started has been stopped", file=sys.stderr)
        return 130
    if label:
        print(pair_comparison(results, order, label))
    elif len(results) > 2 or (args.compare and args.rounds > 1):
        print(format_medians(results))
    elif len(results) > 1:
        print(format_comparison(results[0], results[1]))
    print(save_outputs(results, Path(args.out)))
    print(last_line(results[0]), flush=True)
    return 0
