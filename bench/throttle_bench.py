"""Adaptive throttling end to end: a real engine against a throttling MX whose rate changes.

The MX (bench/rig/throttle_mx.py, on loopback) allows at most K concurrent connections
and R messages/s and answers 421 4.7.0 beyond. A feeder keeps the engine's backlog for
the MX's domain full (it always has mail ready), while the MX's allowed rate follows
the phases (by default R, then R/3, then 2R). The engine is not told R: its shaping
file's ceiling is far above it (--ceiling), so whatever it delivers it found by itself.

Counted at the MX, every `--sample` seconds: messages accepted, messages deferred (421
at MAIL), connections refused (421 at the greeting, over K). Printed per phase:

- goodput: messages accepted per second, as a share of the allowed rate, once adapted;
- deferred: deferred messages plus refused connections, as a share of all attempts;
- adapt: seconds after the change until a `--window`-second window (ending then)
  delivers at least 90 % of the new rate with at most 5 % of attempts deferred; the
  window's length is included, so it is an upper bound.

Usage::

    python -m bench.throttle_bench                      # R=100, K=4, 3 x 40 s phases
    python -m bench.throttle_bench --rate 150 --phase 60 --workers 2 --json out.json

The machine's two cores run the engine, the MX, the feeder and the DNS server at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.engine_proc import EngineProcess, read_events
from bench.load import SmtpSession, Submission, make_body
from bench.net import free_port
from bench.rig.dns import DnsServer
from bench.rig.throttle_mx import ThrottleMx
from mta.queue.spool import Spool

SENDER = "news@bench.test"
MX_HOST = "mx.throttled.test"
SETTLE_LOW, SETTLE_DEFERRED = 0.9, 0.05
LATE = 60.0  # a job due this long after the run went to the retry schedule, not the pace


@dataclass
class Scenario:
    rate: float = 100.0  # R: what the MX allows at first, messages/s
    max_connections: int = 4  # K: concurrent connections the MX allows
    phases: list[tuple[float, float]] = field(
        default_factory=lambda: [(40.0, 1.0), (40.0, 1 / 3), (40.0, 2.0)])  # (seconds, x R)
    warmup: float = 10.0  # the first phase's first seconds are not counted
    window: float = 5.0  # seconds of the sliding window that decides "adapted"
    sample: float = 0.25  # seconds between counts at the MX
    workers: int = 1  # engine worker processes
    domains: int = 1  # recipient domains, all served by the one MX (one site)
    ceiling: str = "1000/s"  # the shaping file's message rate: far above R
    ceiling_connections: int = 10  # the shaping file's connection limit (above K)
    message_size: int = 1000
    backlog: float = 3.0  # the feeder keeps this many seconds of the highest rate queued
    feeders: int = 4  # feeder SMTP sessions
    retry_initial: float = 300.0  # the engine's retry schedule for failing mailboxes
    mx_address: str = "127.0.0.2"
    rules: str = ""  # extra [[rule]] tables for the shaping file
    adapt: dict[str, Any] = field(default_factory=dict)  # [adapt] overrides

    def allowed(self) -> list[tuple[float, float, float]]:
        """(start, end, allowed rate) of each phase, seconds from the start of the run."""
        out, start = [], 0.0
        for seconds, factor in self.phases:
            out.append((start, start + seconds, self.rate * factor))
            start += seconds
        return out

    @property
    def duration(self) -> float:
        return sum(seconds for seconds, _ in self.phases)


@dataclass
class Sample:
    t: float  # seconds since the start of the run
    accepted: int  # cumulative, at the MX
    deferred: int
    refused: int


@dataclass
class PhaseResult:
    start: float
    end: float
    rate: float  # allowed
    adapt: float  # seconds after the change (inf: never within the phase)
    measured_from: float  # where the steady-state figures start
    goodput: float  # accepted per second from measured_from to end
    goodput_share: float  # goodput / rate
    deferred_share: float  # (deferred + refused) / all attempts, same span
    accepted: int
    deferred: int
    refused: int


@dataclass
class RunResult:
    scenario: Scenario
    phases: list[PhaseResult]
    samples: list[Sample]
    submitted: int
    delivered_events: int = 0
    deferred_events: int = 0
    throttle_changes: int = 0
    max_concurrent: int = 0
    overall_deferred_share: float = 0.0  # after the warm-up, changes included
    late_jobs: int = 0  # jobs left due more than LATE seconds after the run (retry schedule)
    queued_jobs: int = 0  # jobs left in the spool after the run
    engine_cpu: float = 0.0
    elapsed: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "rate": self.scenario.rate, "max_connections": self.scenario.max_connections,
            "workers": self.scenario.workers, "domains": self.scenario.domains,
            "phases": [{k: (round(v, 3) if isinstance(v, float) else v)
                        for k, v in asdict(p).items()} for p in self.phases],
            "overall_deferred_share": round(self.overall_deferred_share, 4),
            "submitted": self.submitted, "max_concurrent_at_mx": self.max_concurrent,
            "queued_jobs": self.queued_jobs, "late_jobs": self.late_jobs,
            "throttle_changes": self.throttle_changes, "engine_cpu_s": round(self.engine_cpu, 1),
            "elapsed_s": round(self.elapsed, 1), "notes": self.notes,
        }


# --- analysis (plain functions over the samples) ------------------------------------------


def counts_between(samples: Sequence[Sample], start: float, end: float) -> tuple[int, int, int]:
    """(accepted, deferred, refused) between the samples nearest to start and end."""
    first, last = _at(samples, start), _at(samples, end)
    return (last.accepted - first.accepted, last.deferred - first.deferred,
            last.refused - first.refused)


def _at(samples: Sequence[Sample], t: float) -> Sample:
    """The last sample taken at or before t (the first one if none)."""
    best = samples[0]
    for s in samples:
        if s.t > t + 1e-9:
            break
        best = s
    return best


def window_figures(samples: Sequence[Sample], start: float, end: float) -> tuple[float, float]:
    """(accepted per second, share of attempts deferred or refused) in [start, end]."""
    accepted, deferred, refused = counts_between(samples, start, end)
    span = _at(samples, end).t - _at(samples, start).t
    attempts = accepted + deferred + refused
    return (accepted / span if span > 0 else 0.0,
            (deferred + refused) / attempts if attempts else 0.0)


def adapt_time(samples: Sequence[Sample], start: float, end: float, rate: float,
               window: float, step: float) -> float:
    """Seconds after `start` until a window ending then delivers at least 90 % of `rate`
    with at most 5 % of attempts deferred; inf when that never happens before `end`.
    (No upper bound: after a slow phase the MX's bucket holds a second's worth of the
    new rate, so a good start may briefly deliver more than the rate.)"""
    t = start + window
    while t <= end + 1e-9:
        goodput, deferred = window_figures(samples, t - window, t)
        if goodput >= SETTLE_LOW * rate and deferred <= SETTLE_DEFERRED:
            return t - start
        t += step
    return math.inf


def analyse(samples: Sequence[Sample], scenario: Scenario) -> list[PhaseResult]:
    results = []
    for i, (start, end, rate) in enumerate(scenario.allowed()):
        if i == 0:
            adapt = adapt_time(samples, start, end, rate, scenario.window, scenario.sample)
            measured_from = start + scenario.warmup
        else:
            adapt = adapt_time(samples, start, end, rate, scenario.window, scenario.sample)
            measured_from = min(end, start + adapt) if math.isfinite(adapt) else end
        goodput, deferred_share = window_figures(samples, measured_from, end)
        accepted, deferred, refused = counts_between(samples, measured_from, end)
        results.append(PhaseResult(start, end, rate, adapt, measured_from, goodput,
                                   goodput / rate, deferred_share, accepted, deferred, refused))
    return results


# --- the run ---------------------------------------------------------------------------------


def shaping_text(scenario: Scenario) -> str:
    adapt = "".join(f"{k} = {json.dumps(v)}\n" for k, v in scenario.adapt.items())
    return (f"[adapt]\n{adapt}\n"
            "[default]\n"
            f"max_connections = {scenario.ceiling_connections}\n"
            "max_messages_per_connection = 100\n"
            f'message_rate = "{scenario.ceiling}"\n'
            'connection_rate = "unlimited"\n\n'
            f"{scenario.rules}")


def engine_config(tmp: Path, scenario: Scenario, dns: DnsServer, port: int,
                  **extra: dict[str, Any]) -> dict[str, Any]:
    shaping = tmp / "shaping.toml"
    shaping.write_text(shaping_text(scenario))
    config: dict[str, Any] = {
        "engine": {"workers": scenario.workers, "event_log": str(tmp / "events.jsonl"),
                   "audit_log": str(tmp / "audit.jsonl"), "log_level": "warning"},
        "smtp": {"listen": f"127.0.0.1:{free_port()}"},
        "spool": {"path": str(tmp / "spool"), "min_free_disk": 0},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "dns": {"nameservers": [dns.address], "timeout": 1.0},
        "delivery": {"enabled": True, "port": port, "allow_loopback_mx": True,
                     "retry_initial": scenario.retry_initial, "connect_timeout": 5.0,
                     "command_timeout": 10.0, "connection_idle_timeout": 5.0},
        "throttle": {"shaping_file": str(shaping)},
    }
    for name, values in extra.items():
        config.setdefault(name, {}).update(values)
    return config


def add_domains(dns: DnsServer, scenario: Scenario) -> list[str]:
    domains = [f"d{i}.throttled.test" for i in range(scenario.domains)]
    for domain in domains:
        dns.add_mx(domain, [(10, MX_HOST)])
    dns.add_a(MX_HOST, scenario.mx_address)
    return domains


class Feeder:
    """Keeps the engine's backlog for the MX at `target` messages (submitted - accepted)."""

    def __init__(self, engine: EngineProcess, mx: ThrottleMx, domains: list[str],
                 target: int, sessions: int, size: int) -> None:
        self.engine, self.mx, self.domains = engine, mx, domains
        self.target, self.sessions, self.size = target, sessions, size
        self.submitted = 0
        self.errors = 0
        self.stop = asyncio.Event()

    def _submission(self) -> Submission | None:
        if self.submitted - self.mx.stats.accepted >= self.target:
            return None
        i = self.submitted
        self.submitted += 1
        rcpt = f"user{i}@{self.domains[i % len(self.domains)]}"
        return Submission(SENDER, [rcpt], make_body(self.size, f"m{i}", SENDER, rcpt))

    async def _session(self) -> None:
        session: SmtpSession | None = None
        while not self.stop.is_set():
            sub = self._submission()
            if sub is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.05)
                continue
            try:
                if session is None:
                    session = await SmtpSession.open(self.engine.host, self.engine.port)
                code, _ = await session.send(sub)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError):
                code, session = 0, None
            if code != 250:
                self.errors += 1
                self.submitted -= 1  # a free slot; try again a little later
                await asyncio.sleep(0.1)
        if session is not None:
            await session.close()

    async def run(self) -> None:
        await asyncio.gather(*(self._session() for _ in range(self.sessions)))


def queued_jobs(spool_path: Path, late: float = LATE) -> tuple[int, int]:
    """(jobs in the spool, of which due more than `late` seconds from now)."""
    spool = Spool(spool_path, readonly=True)
    try:
        limit = (time.time() + late) * 1000
        with spool.read() as txn:
            due = [job.next_ms for job in spool.jobs(txn)]
    finally:
        spool.close()
    return len(due), sum(d > limit for d in due)


async def run_scenario(tmp: Path, dns: DnsServer, scenario: Scenario,
                       progress: bool = False) -> RunResult:
    """Run the engine against the throttling MX through the phases; figures at the MX."""
    tmp.mkdir(parents=True, exist_ok=True)
    domains = add_domains(dns, scenario)
    mx = ThrottleMx(scenario.mx_address, 0, scenario.max_connections, scenario.rate)
    await mx.start()
    engine = EngineProcess(tmp, engine_config(tmp, scenario, dns, mx.port))
    samples: list[Sample] = []
    top_rate = max(scenario.rate * f for _, f in scenario.phases)
    feeder: Feeder | None = None
    feeding: asyncio.Task[None] | None = None
    began = time.monotonic()
    try:
        await asyncio.to_thread(engine.start)
        cpu_before = engine.cpu_seconds()
        feeder = Feeder(engine, mx, domains, int(top_rate * scenario.backlog) + 20,
                        scenario.feeders, scenario.message_size)
        t0 = time.monotonic()
        mx.stats.accepted = mx.stats.deferred = mx.stats.refused = 0
        mx.set_rate(scenario.rate)
        mx.schedule([(start, rate) for start, _, rate in scenario.allowed()[1:]])
        feeding = asyncio.get_running_loop().create_task(feeder.run())
        next_print = 0.0
        for step in range(int(scenario.duration / scenario.sample) + 2):
            now = time.monotonic() - t0
            st = mx.stats
            samples.append(Sample(now, st.accepted, st.deferred, st.refused))
            if progress and now >= next_print:
                next_print += 5.0
                sys.stderr.write(f"t={now:5.1f}s allowed={st.rate:6.1f}/s accepted={st.accepted}"
                                 f" deferred={st.deferred} refused={st.refused}"
                                 f" submitted={feeder.submitted}\n")
            if now >= scenario.duration:
                break
            await asyncio.sleep(max(0.0, t0 + (step + 1) * scenario.sample - time.monotonic()))
        feeder.stop.set()
        await feeding
        cpu = engine.cpu_seconds() - cpu_before
    finally:
        if feeder is not None:
            feeder.stop.set()
        if feeding is not None and not feeding.done():
            feeding.cancel()
        await asyncio.to_thread(engine.stop)
        await mx.stop()
    events = read_events(tmp / "events.jsonl")
    result = RunResult(scenario, analyse(samples, scenario), samples,
                       feeder.submitted if feeder else 0,
                       delivered_events=sum(e["type"] == "Delivery" for e in events),
                       deferred_events=sum(e["type"] == "TransientFailure" for e in events),
                       throttle_changes=sum(e["type"] == "ThrottleChange" for e in events),
                       max_concurrent=mx.stats.max_concurrent, engine_cpu=cpu,
                       elapsed=time.monotonic() - began)
    start = scenario.warmup
    result.overall_deferred_share = window_figures(samples, start, scenario.duration)[1]
    result.queued_jobs, result.late_jobs = queued_jobs(tmp / "spool")
    if result.late_jobs:
        result.notes.append(f"{result.late_jobs} of {result.queued_jobs} queued jobs are due"
                            f" more than {LATE:g} s from now (sent to the retry schedule)")
    if feeder is not None and feeder.errors:
        result.notes.append(f"{feeder.errors} submissions refused or failed")
    return result


# --- command line ------------------------------------------------------------------------------


def format_result(result: RunResult) -> str:
    sc = result.scenario
    lines = [f"engine: {sc.workers} worker(s), {sc.domains} domain(s); MX: K={sc.max_connections}"
             f" connections, R={sc.rate:g}/s; shaping ceiling {sc.ceiling},"
             f" {sc.ceiling_connections} connections",
             f"{'phase':<18}{'allowed':>9}{'adapt':>9}{'goodput':>10}{'share':>8}"
             f"{'deferred':>10}{'accepted':>10}{'def+ref':>9}"]
    for p in result.phases:
        adapt = f"{p.adapt:.1f}s" if math.isfinite(p.adapt) else "never"
        lines.append(f"{p.start:5.0f}-{p.end:4.0f}s (from {p.measured_from - p.start:4.1f})"
                     f"{p.rate:8.1f}/s{adapt:>9}{p.goodput:9.1f}/s{p.goodput_share:8.1%}"
                     f"{p.deferred_share:10.1%}{p.accepted:10d}{p.deferred + p.refused:9d}")
    lines.append(f"after the {sc.warmup:g}-s warm-up, changes included: "
                 f"{result.overall_deferred_share:.1%} of attempts deferred; max "
                 f"{result.max_concurrent} concurrent at the MX; {result.throttle_changes} "
                 f"throttle changes; engine CPU {result.engine_cpu:.1f} s in {sc.duration:g} s")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def parse_phases(text: str, default_seconds: float) -> list[tuple[float, float]]:
    """'1,0.333,2' or '40:1,40:0.333,40:2' -> [(seconds, factor of R), ...]."""
    phases = []
    for part in filter(None, text.split(",")):
        seconds, _, factor = part.rpartition(":")
        phases.append((float(seconds) if seconds else default_seconds, float(factor)))
    return phases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=100.0, help="R, messages/s (default 100)")
    p.add_argument("--max-conn", type=int, default=4, help="K, the MX's connections (4)")
    p.add_argument("--phase", type=float, default=40.0, help="seconds per phase (40)")
    p.add_argument("--phases", default="1,0.3333,2", help="factors of R, or SECONDS:FACTOR")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--window", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--domains", type=int, default=1)
    p.add_argument("--ceiling", default="1000/s")
    p.add_argument("--ceiling-connections", type=int, default=10)
    p.add_argument("--size", type=int, default=1000, help="message size in bytes")
    p.add_argument("--json", help="also write the figures and samples to this file")
    p.add_argument("--workdir", help="keep the engine's files here (default: a temp dir)")
    args = p.parse_args(argv)
    scenario = Scenario(rate=args.rate, max_connections=args.max_conn,
                        phases=parse_phases(args.phases, args.phase), warmup=args.warmup,
                        window=args.window, workers=args.workers, domains=args.domains,
                        ceiling=args.ceiling, ceiling_connections=args.ceiling_connections,
                        message_size=args.size)

    async def run(tmp: Path) -> RunResult:
        with DnsServer() as dns:
            return await run_scenario(tmp, dns, scenario, progress=True)

    if args.workdir:
        result = asyncio.run(run(Path(args.workdir)))
    else:
        with tempfile.TemporaryDirectory(prefix="throttle-bench-") as tmp:
            result = asyncio.run(run(Path(tmp)))
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {**result.summary(), "samples": [asdict(s) for s in result.samples]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
