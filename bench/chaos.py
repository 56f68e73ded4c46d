"""`python -m bench chaos`: the fault soak. Mixed load for a long time while the engine is
killed with SIGKILL at intervals and the remote MX misbehaves in turn; at the end,
every message that got a 250 must have reached the MX. Prints what was accepted,
delivered, duplicated and lost (lost must be 0).

    python -m bench chaos [--duration 3600] [--kill-every 60] [--fault-every 20]
                          [--rate 100] [--sessions 20] [--workers 2]
                          [--delivery-workers 0]

The rig: a DNS server on loopback routing `--domains` test domains to one in-process
asyncio sink on 127.0.0.2 that records queue ids. Faults cycle through, with a
healthy period after each: the connection dropped after the final dot, 421 at the
final dot, 451 at MAIL, a reply to the dot slower than the engine's command timeout,
421 at the greeting. The engine's shaping has no rate ceiling (as the steady scenario),
so what holds delivery back is the faults. Each kill takes
down the supervisor and its workers at once (kill -9 of the process group); the engine
is started again on the same spool at once. After the load, faults stop and the engine
drains. A message counts as delivered when the sink answered 250 to it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.engine_proc import EngineProcess
from bench.load import Submission, make_body, run_load
from bench.net import free_port
from bench.rig.dns import DnsServer
from bench.rig.sinks import AsyncioSink, SinkFaults

QUEUE_ID = re.compile(rb"with E?SMTPS?A? id ([0-9A-F]{20})")
COMMAND_TIMEOUT = 3.0  # the engine's, so that a slow dot reply is a timeout
DRAIN_TIMEOUT = 1800.0


DRAIN_STALL = 120.0  # the drain gives up after this long without a delivery
# As bench/scenarios/steady.toml: no rate ceiling, so what limits delivery is the faults.
SHAPING = """[default]
max_connections = 20
max_messages_per_connection = 100
message_rate = "unlimited"
connection_rate = "unlimited"
"""
FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("drop after dot", {"drop_after_dot": True}),
    ("421 at the dot", {"dot_reply": "421 4.3.0 closing, try later"}),
    ("451 at MAIL", {"mail_reply": "451 4.3.0 not now"}),
    ("slow dot reply", {"dot_delay": COMMAND_TIMEOUT + 2.0}),
    ("421 greeting", {"greeting": "421 4.3.2 busy"}),
]


def fault_modes() -> list[tuple[str, dict[str, Any]]]:
    """Each fault in turn, with a healthy period after each (faults half the time)."""
    return [mode for fault in FAULTS for mode in (fault, ("none", {}))]


@dataclass
class Tally:
    accepted: list[str] = field(default_factory=list)  # queue ids that got a 250
    kills: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def on_accept(self, queue_id: str, _when: float) -> None:
        self.accepted.append(queue_id)


def engine_config(workdir: Path, dns: DnsServer, sink_port: int,
                  delivery_workers: int = 0) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "shaping.toml").write_text(SHAPING)
    return {
        "engine": {"delivery_workers": delivery_workers,
                   "event_log": str(workdir / "events.jsonl"),
                   "audit_log": str(workdir / "audit.jsonl"), "log_level": "warning"},
        "smtp": {"listen": f"127.0.0.1:{free_port()}"},
        "spool": {"path": str(workdir / "spool"), "min_free_disk": 0},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "dns": {"nameservers": [dns.address], "timeout": 1.0},
        "delivery": {"enabled": True, "port": sink_port, "allow_loopback_mx": True,
                     "retry_initial": 2.0, "retry_max": 10.0,
                     "connect_timeout": 3.0, "command_timeout": COMMAND_TIMEOUT},
        "policy": {"enabled": False},
        "throttle": {"shaping_file": str(workdir / "shaping.toml")},
    }


def route(dns: DnsServer, count: int) -> list[str]:
    domains = [f"d{i}.chaos.test" for i in range(count)]
    for domain in domains:
        dns.add_mx(domain, [(10, "mx.chaos.test")])
    dns.add_a("mx.chaos.test", "127.0.0.2")
    return domains


def submissions(domains: list[str]) -> Callable[[int], Submission]:
    def make(i: int) -> Submission:
        rcpt = f"u{i}@{domains[i % len(domains)]}"
        size = (1024, 2048, 4096, 16384)[i % 4]
        return Submission("news@shop.test", [rcpt], make_body(size, f"m{i}", "news@shop.test",
                                                               rcpt))

    return make


def load(host: str, port: int, make: Callable[[int], Submission], tally: Tally,
         seconds: float, rate: float, sessions: int) -> None:
    """Submit for `seconds`; sessions broken by a kill reconnect (to the same port)."""
    asyncio.run(run_load(host, port, make, 0, sessions=sessions, rate=rate, duration=seconds,
                         on_accept=tally.on_accept))


def delivered_ids(sink: AsyncioSink) -> list[str]:
    return [m.group(1).decode() for r in list(sink.received)
            if r.accepted and (m := QUEUE_ID.search(r.data))]


def cycle_faults(sink: AsyncioSink, tally: Tally, until: float, every: float) -> None:
    for name, faults in itertools.cycle(fault_modes()):
        if time.monotonic() >= until:
            break
        set_faults(sink.faults, faults)
        tally.faults[name] += 1
        time.sleep(min(every, max(0.0, until - time.monotonic())))
    set_faults(sink.faults, {})


def set_faults(current: SinkFaults, faults: dict[str, Any]) -> None:
    """Change the sink's faults in place: open sessions hold the same object."""
    for name, value in vars(SinkFaults(**faults)).items():
        setattr(current, name, value)


def run_chaos(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    tally = Tally()
    with DnsServer() as dns:
        domains = route(dns, args.domains)
        sink = AsyncioSink("127.0.0.2", record=True).start()
        try:
            config = engine_config(workdir, dns, sink.port, args.delivery_workers)
            engine = EngineProcess(workdir, config, workers=args.workers).start()
            started = time.monotonic()
            until = started + args.duration
            threads = [
                threading.Thread(target=load, daemon=True,
                                 args=(engine.host, engine.port, submissions(domains), tally,
                                       args.duration, args.rate, args.sessions)),
                threading.Thread(target=cycle_faults, daemon=True,
                                 args=(sink, tally, until, args.fault_every)),
            ]
            for thread in threads:
                thread.start()
            for _ in kill_times(started, until, args.kill_every):
                engine.kill9()
                engine.start()  # the same spool and port
                tally.kills += 1
                report_progress(tally, sink, started)
            for thread in threads:
                thread.join(60)
            drained = wait_for_drain(tally, sink)
            engine.stop()
            return summary(tally, sink, drained, time.monotonic() - started)
        finally:
            sink.stop()


def kill_times(started: float, until: float, every: float) -> Iterator[float]:
    """Sleep until each kill; yields while the load runs (bounded by `until`)."""
    when = started + every
    while when < until:
        time.sleep(max(0.0, when - time.monotonic()))
        yield when
        when += every
    time.sleep(max(0.0, until - time.monotonic()))


def wait_for_drain(tally: Tally, sink: AsyncioSink) -> bool:
    """Until every accepted message is at the sink, while deliveries keep coming."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    last_count, last_progress = -1, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last_progress < DRAIN_STALL:
        delivered = delivered_ids(sink)
        if set(tally.accepted) <= set(delivered):
            return True
        if len(delivered) != last_count:
            last_count, last_progress = len(delivered), time.monotonic()
        time.sleep(1.0)
    return False


def report_progress(tally: Tally, sink: AsyncioSink, started: float) -> None:
    print(f"t={time.monotonic() - started:7.0f}s kills={tally.kills} "
          f"accepted={len(tally.accepted)} delivered={sink.accepted}", flush=True)


def summary(tally: Tally, sink: AsyncioSink, drained: bool, seconds: float) -> dict[str, Any]:
    at_sink = delivered_ids(sink)
    unique = set(at_sink)
    accepted = set(tally.accepted)
    return {"seconds": round(seconds), "kills": tally.kills, "faults": dict(tally.faults),
            "accepted": len(accepted), "delivered": len(accepted & unique),
            "duplicated": len(at_sink) - len(unique), "lost": len(accepted - unique),
            "drained": drained, "sink_sessions": sink.sessions}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of load")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--fault-every", type=float, default=20.0,
                        help="seconds each remote fault mode lasts")
    parser.add_argument("--rate", type=float, default=100.0, help="offered msg/s")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--delivery-workers", type=int, default=0,
                        help="[engine] delivery_workers: workers that only deliver")
    parser.add_argument("--domains", type=int, default=20)
    parser.add_argument("--workdir", help="keep the spool, logs and events here "
                                          "(default: a temporary directory)")


def main(args: argparse.Namespace) -> int:
    if args.workdir:
        result = run_chaos(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="mta-chaos-") as tmp:
            result = run_chaos(args, Path(tmp))
    print(" ".join(f"{k}={v}" for k, v in result.items() if k != "faults"))
    print("faults: " + ", ".join(f"{k} x{v}" for k, v in result["faults"].items()))
    print(f"accepted={result['accepted']} delivered={result['delivered']} "
          f"duplicated={result['duplicated']} lost={result['lost']}")
    return 0 if result["lost"] == 0 and result["drained"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.chaos")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
