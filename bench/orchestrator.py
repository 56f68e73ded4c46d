"""One complete run against one target: the rig up, the target up, the load through
it, the wait until the sinks have everything, the result, and the teardown.

Everything started here is stopped before `run_once` returns, after a failure or
Ctrl-C too (see bench/interrupts.py).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench.accepts import AcceptLog
from bench.arrivals import ArrivalTracker
from bench.interrupts import signals_ignored
from bench.load import run_load
from bench.monitor import Monitor, Progress
from bench.report import RunResult
from bench.results import Drain, add_throttled, build_result, drained, throttled_expected
from bench.rig.assembly import Rig
from bench.rig.dns import DEFAULT_TTL
from bench.scenarios import DOMAIN_SUFFIX, Scenario, Traffic, destinations
from bench.targets import Target, make_dkim_key, make_target

DRAIN_POLL = 0.05


@dataclass
class Options:
    scenario: Scenario
    workers: int
    dkim: bool = False
    sink_port: int = 0
    dns_port: int = 0
    keep: bool = False
    progress: bool = True
    auth: str = ""  # USER:PASSWORD for a --target HOST:PORT
    tls: bool = False  # STARTTLS at the sinks, certificates from a local CA the engine trusts
    sink_processes: bool = False  # asyncio sinks in processes of their own
    dns_ttl: int = DEFAULT_TTL  # the rig's MX and A answers (0: a lookup per message)
    # Run once the sinks have everything, the target still up: its lines join the notes
    # (`bench run --webhook`: wait until the webhook receiver has every event).
    after_drain: Callable[[Target], list[str]] | None = None


def run_once(kind: str, opts: Options) -> RunResult:
    """One complete run against one target, rig and all, torn down before returning."""
    stack = ExitStack()
    os.sync()  # what earlier runs left to write goes out now, not during this run
    gc.collect()  # earlier runs' garbage collected now, and what they keep (results)
    gc.freeze()  # never scanned again: the load generator's pauses alike in every run
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f"mta-bench-{kind.replace(':', '-')}-"))
        stack.callback(_remove_workdir, workdir, opts.keep)
        workdir.chmod(0o755)  # Postfix's daemons walk into it as the postfix user
        dest = destinations(opts.scenario)
        tls = local_ca(workdir) if opts.tls else None
        rig = stack.enter_context(Rig(opts.scenario, dest, opts.sink_port, opts.dns_port,
                                      tls_cert=tls.cert_file if tls else "",
                                      processes=opts.sink_processes, dns_ttl=opts.dns_ttl))
        dkim = make_dkim_key(workdir, opts.scenario.messages.sender_domain) if opts.dkim else None
        if dkim is not None:
            rig.publish_dkim(dkim.domain, dkim.selector, dkim.record)
        target = make_target(kind, workdir, rig, opts.scenario, opts.workers, dkim, opts.auth,
                             tls_ca_file=tls.ca_file if tls else "")
        stack.callback(target.stop)
        print(rig.describe(), file=sys.stderr)
        target.start()
        print(f"target: {target.label} on {target.host}:{target.port}, work dir {workdir}",
              file=sys.stderr)
        traffic = Traffic(opts.scenario, dest)
        tracker = stack.enter_context(ArrivalTracker(rig, traffic.plan))
        return uvloop.run(drive(target, rig, traffic, tracker, opts))
    finally:
        with signals_ignored():
            stack.close()


@dataclass
class LocalCa:
    ca_file: str  # the CA certificate the engine trusts ([delivery] tls_ca_file)
    cert_file: str  # the sinks' key and certificate, for every MX name *.<domain suffix>


def local_ca(workdir: Path) -> LocalCa:
    """A CA made for the run (trustme) and the sinks' certificate for every MX name."""
    import trustme

    ca = trustme.CA()
    ca_file, cert_file = workdir / "bench-ca.pem", workdir / "bench-sinks.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert(f"*.{DOMAIN_SUFFIX}").private_key_and_cert_chain_pem.write_to_path(
        str(cert_file))
    return LocalCa(str(ca_file), str(cert_file))


def _remove_workdir(workdir: Path, keep: bool) -> None:
    if keep:
        print(f"kept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


async def drive(target: Target, rig: Rig, traffic: Traffic, tracker: ArrivalTracker,
                opts: Options) -> RunResult:
    """The load through the target, then the wait for the sinks, watched throughout."""
    scenario = opts.scenario
    traffic.prepare(scenario.load.count)
    accepts = AcceptLog(traffic.submission)
    monitor = Monitor(target, accepts, tracker, rig, Progress(opts.progress))
    stop = asyncio.Event()
    monitoring = asyncio.create_task(monitor.run(stop))
    rig.schedule_throttle()
    load = scenario.load
    try:
        started = time.time()
        result = await run_load(target.host, target.port, accepts.submission, load.count,
                                load.sessions, load.messages_per_session, load.rate,
                                load.duration, on_accept=accepts.on_accept,
                                logins=target.logins(traffic))
        drain = await wait_for_drain(accepts, tracker, rig, scenario)
    finally:
        stop.set()
        await monitoring
    tracker.ingest()
    run = build_result(target, scenario.name, opts.dkim, result, accepts, tracker, monitor,
                       started)
    add_throttled(run, rig, throttled_expected(accepts, tracker.plan), started, drain)
    run.notes += target.notes
    if drain.why:
        run.notes.append(drain.why)
    if opts.after_drain is not None:
        run.notes += await asyncio.to_thread(opts.after_drain, target)
    return run


async def wait_for_drain(accepts: AcceptLog, tracker: ArrivalTracker, rig: Rig,
                         scenario: Scenario) -> Drain:
    """Wait until the sinks have every accepted message, or give up."""
    deadline = time.monotonic() + scenario.load.drain_timeout
    last_count, last_change = -1, time.monotonic()
    while not drained(accepts, tracker, rig):
        now = time.monotonic()
        count = rig.sink_messages()
        if count != last_count:
            last_count, last_change = count, now
        if now >= deadline:
            return Drain(f"gave up after drain_timeout={scenario.load.drain_timeout:.0f}s",
                         time.time())
        if now - last_change >= scenario.load.stall_timeout:
            return Drain(f"nothing arrived for stall_timeout={scenario.load.stall_timeout:.0f}s",
                         time.time())
        await asyncio.sleep(DRAIN_POLL)
    return Drain("", time.time())
