"""Two engine nodes sharing throttles through Redis, against one node, on this machine.

Every node runs `mta serve --workers 1` with its own spool and SMTP port; the nodes of a
run share one Redis (bench/rig/redis.py) and one DNS server (bench/rig/dns.py), and the
load generator splits its sessions evenly over them. Two scenarios, each run on:

- ``1 node``: the single-node default, no Redis;
- ``1 node + Redis``: the same with `[cluster] redis` (what Redis costs one node);
- ``2 nodes + Redis``: the cluster;
- ``2 nodes, no Redis`` (throttled scenario only): each node holding the whole budget
  alone, what the cluster is for.

Throughput: `--messages` messages of `--size` bytes to 20 domains served by one sink
(bench/rig/sinks.py, its own process); printed: accepted msg/s (SMTP 250s over the
submission time) and delivered msg/s (messages at the sink over the time from the first
submission to the last delivery), and the CPU of the engines (per message) and of Redis
during the run (not the start-up).

Throttled: a provider whose MX (bench/rig/throttle_mx.py) allows K connections and R
messages/s in total, 421 beyond; the shaping file says the same (K, R). Printed: messages
delivered (within 1.5 x the time R allows, plus 15 s), the most concurrent connections the
MX saw, connections it refused (over K), messages it deferred (over R), and the goodput
(accepted/s over the whole seconds after the first delivery, until all were delivered or
the time was up) against R.

Usage::

    python -m bench.cluster_bench                       # 10,000 x 2 KB; K=4, R=100, 1500 msgs
    python -m bench.cluster_bench --messages 5000 --rate 150 --max-conn 6 --json out.json
    python -m bench.cluster_bench --rounds 3 --skip throttled   # medians of 3 rounds

The machine's two cores run the nodes, Redis, the sinks, the DNS server and the load
generator at once: the comparison is between topologies on the same machine, not a
prediction for two machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.engine_proc import EngineProcess
from bench.load import LoadResult, Submission, make_body, run_load
from bench.net import free_port
from bench.procstat import cpu_seconds
from bench.rig.dns import DnsServer
from bench.rig.redis import RedisServer
from bench.rig.sinks import AsyncioSinkProcess
from bench.rig.throttle_mx import BackgroundThrottleMx

SENDER = "news@bench.test"
SINK_HOST, MX_HOST = "127.0.0.2", "127.0.0.3"
DOMAINS = [f"d{i}.bench.test" for i in range(20)]
THROTTLED = [f"t{i}.bench.test" for i in range(4)]
DRAIN_TIMEOUT = 300.0

SHAPING = """
[default]
max_connections = 20
max_messages_per_connection = 1000
message_rate = "unlimited"
connection_rate = "unlimited"

[provider.throttled]
mx_suffixes = [".throttled.test"]
max_connections = {k}
max_messages_per_connection = 1000
message_rate = "{rate:g}/s"
connection_rate = "unlimited"
"""


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: int
    redis: bool


ONE = Topology("1 node", 1, False)
ONE_REDIS = Topology("1 node + Redis", 1, True)
TWO_REDIS = Topology("2 nodes + Redis", 2, True)
TWO_ALONE = Topology("2 nodes, no Redis", 2, False)


@dataclass
class Options:
    messages: int = 10_000
    size: int = 2000
    sessions: int = 20
    rate: float = 100.0  # R at the throttling MX
    max_connections: int = 4  # K at the throttling MX
    throttled_messages: int = 1500


@dataclass
class ThroughputResult:
    topology: str
    messages: int
    accepted_per_s: float
    delivered_per_s: float
    engine_cpu_s: float
    redis_cpu_s: float
    refused: int


@dataclass
class ThrottledResult:
    topology: str
    messages: int
    delivered: int  # accepted by the MX within the time allowed
    max_connections: int  # K
    rate: float  # R
    max_concurrent: int
    refused_connections: int
    deferred_messages: int
    goodput: float
    goodput_share: float
    seconds: float  # from the MX's start to the last delivery or the time bound


# --- the rig ------------------------------------------------------------------------------


def node_config(workdir: Path, dns: DnsServer, port: int, shaping: Path,
                redis_url: str) -> dict[str, Any]:
    return {
        "engine": {"workers": 1, "event_log": str(workdir / "events.jsonl"),
                   "audit_log": str(workdir / "audit.jsonl"), "log_level": "warning"},
        "smtp": {"listen": f"127.0.0.1:{free_port()}"},
        "spool": {"path": str(workdir / "spool"), "min_free_disk": 0},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "dns": {"nameservers": [dns.address], "timeout": 1.0},
        "delivery": {"enabled": True, "port": port, "allow_loopback_mx": True,
                     "retry_initial": 300.0, "connect_timeout": 5.0, "command_timeout": 10.0,
                     "connection_idle_timeout": 2.0},
        "throttle": {"shaping_file": str(shaping)},
        "bounce": {"verp_secret": "bench-verp"}, "policy": {"unsubscribe_secret": "bench-unsub"},
        "cluster": {"redis": redis_url, "node": workdir.name},
    }


@contextmanager
def nodes_running(workdir: Path, topology: Topology, dns: DnsServer, port: int,
                  opts: Options) -> Iterator[tuple[list[EngineProcess], RedisServer | None]]:
    shaping = workdir / "shaping.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    shaping.write_text(SHAPING.format(k=opts.max_connections, rate=opts.rate))
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer(workdir / "redis")) if topology.redis else None
        url = redis.url if redis is not None else ""
        nodes = [EngineProcess(workdir / f"n{i}", node_config(workdir / f"n{i}", dns, port,
                                                               shaping, url), workers=1)
                 for i in range(topology.nodes)]
        for node in nodes:
            stack.enter_context(node)
        yield nodes, redis


async def submit_all(nodes: list[EngineProcess], domains: list[str], count: int,
                     opts: Options) -> LoadResult:
    """`count` messages over `opts.sessions` sessions split evenly over the nodes."""
    body = {d: make_body(opts.size, "bench", SENDER, f"user@{d}") for d in domains}

    def submission(i: int) -> Submission:
        domain = domains[i % len(domains)]
        return Submission(SENDER, [f"u{i}@{domain}"], body[domain])

    share = [count // len(nodes) + (i < count % len(nodes)) for i in range(len(nodes))]
    sessions = max(1, opts.sessions // len(nodes))
    results = await asyncio.gather(*(run_load(n.host, n.port, submission, c, sessions=sessions)
                                     for n, c in zip(nodes, share, strict=True)))
    total = LoadResult(elapsed=max(r.elapsed for r in results))
    for r in results:
        total.accepted += r.accepted
        total.refused += r.refused + r.errors
    return total


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# --- scenarios ------------------------------------------------------------------------------


def throughput(workdir: Path, topology: Topology, dns: DnsServer, opts: Options
               ) -> ThroughputResult:
    with AsyncioSinkProcess(SINK_HOST) as sink, \
            nodes_running(workdir, topology, dns, sink.port, opts) as (nodes, redis):
        cpu_before = sum(n.cpu_seconds() for n in nodes)  # not the start-up
        redis_before = cpu_seconds(redis.proc.pid) if redis is not None and redis.proc else 0.0
        start = time.monotonic()
        load = asyncio.run(submit_all(nodes, DOMAINS, opts.messages, opts))
        if not wait_for(lambda: sink.accepted >= load.accepted, DRAIN_TIMEOUT):
            print(f"  {topology.name}: only {sink.accepted} of {load.accepted} delivered",
                  file=sys.stderr)
        drained = time.monotonic() - start
        cpu = sum(n.cpu_seconds() for n in nodes) - cpu_before
        redis_cpu = (cpu_seconds(redis.proc.pid) if redis is not None and redis.proc else 0.0
                     ) - redis_before
        return ThroughputResult(topology.name, load.accepted, load.rate,
                                sink.accepted / drained, cpu, redis_cpu, load.refused)


def throttled(workdir: Path, topology: Topology, dns: DnsServer, opts: Options
              ) -> ThrottledResult:
    count = opts.throttled_messages
    with BackgroundThrottleMx(host=MX_HOST, max_connections=opts.max_connections,
                              rate=opts.rate) as mx, \
            nodes_running(workdir, topology, dns, mx.port, opts) as (nodes, _):
        asyncio.run(submit_all(nodes, THROTTLED, count, opts))
        # Bounded: a topology that trips the MX's limits backs off and may take minutes.
        wait_for(lambda: mx.stats.accepted >= count, 1.5 * count / opts.rate + 15)
        end = time.monotonic() - mx.mx.started
        counts = [row["accepted"] for row in mx.history()]
        stats = mx.stats
    goodput = steady_rate(counts, end)
    return ThrottledResult(topology.name, count, stats.accepted, opts.max_connections,
                           opts.rate, stats.max_concurrent, stats.refused, stats.deferred,
                           goodput, goodput / opts.rate, round(end, 1))


def steady_rate(per_second: list[int], end: float) -> float:
    """Messages a second over the whole seconds after the first delivery and before
    `end` (all delivered, or the time allowed is up): idle seconds count."""
    first = next((i for i, n in enumerate(per_second) if n), None)
    if first is None:
        return 0.0
    counts = per_second + [0] * max(0, int(end) - len(per_second))
    steady = counts[first + 1:int(end)] or counts[first:]
    return sum(steady) / len(steady)


def make_dns(server: DnsServer) -> None:
    for domain in DOMAINS:
        server.add_mx(domain, [(10, "mx.sink.test")])
    server.add_a("mx.sink.test", SINK_HOST)
    for domain in THROTTLED:
        server.add_mx(domain, [(10, "mx.throttled.test")])
    server.add_a("mx.throttled.test", MX_HOST)


# --- output ---------------------------------------------------------------------------------


def median_run(runs: list[ThroughputResult]) -> ThroughputResult:
    """The run with the median delivered rate."""
    return sorted(runs, key=lambda r: r.delivered_per_s)[len(runs) // 2]


def format_throughput(rows: list[ThroughputResult]) -> str:
    lines = [f"{'throughput':<20} {'messages':>8} {'accepted/s':>11} {'delivered/s':>12} "
             f"{'engine CPU ms/msg':>18} {'Redis CPU s':>12}"]
    lines += [f"{r.topology:<20} {r.messages:>8} {r.accepted_per_s:>11.1f} "
              f"{r.delivered_per_s:>12.1f} {1000 * r.engine_cpu_s / max(1, r.messages):>18.2f} "
              f"{r.redis_cpu_s:>12.2f}" for r in rows]
    return "\n".join(lines)


def format_throttled(rows: list[ThrottledResult]) -> str:
    head = rows[0] if rows else None
    title = f"throttled K={head.max_connections} R={head.rate:g}/s" if head else "throttled"
    lines = [f"{title:<20} {'delivered':>14} {'max conns':>10} {'refused':>8} {'deferred':>9} "
             f"{'goodput/s':>10} {'of R':>6}"]
    lines += [f"{r.topology:<20} {f'{r.delivered}/{r.messages}':>14} {r.max_concurrent:>10} "
              f"{r.refused_connections:>8} {r.deferred_messages:>9} {r.goodput:>10.1f} "
              f"{r.goodput_share:>6.0%}" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=Options.messages)
    p.add_argument("--size", type=int, default=Options.size)
    p.add_argument("--sessions", type=int, default=Options.sessions)
    p.add_argument("--rate", type=float, default=Options.rate, help="R at the throttling MX")
    p.add_argument("--max-conn", type=int, default=Options.max_connections,
                   help="K at the throttling MX")
    p.add_argument("--throttled-messages", type=int, default=Options.throttled_messages)
    p.add_argument("--rounds", type=int, default=1,
                   help="throughput: rounds over the topologies (the median is printed)")
    p.add_argument("--skip", choices=("throughput", "throttled"), action="append", default=[])
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if min(args.messages, args.size, args.sessions, args.max_conn,
           args.throttled_messages, args.rounds) < 1 or args.rate <= 0:
        p.error("counts, sizes and the rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(args.messages, args.size, args.sessions, args.rate, args.max_conn,
                   args.throttled_messages)
    out: dict[str, Any] = {"options": asdict(opts)}
    with tempfile.TemporaryDirectory(prefix="mta-cluster-bench-") as tmp, DnsServer() as dns:
        make_dns(dns)
        if "throughput" not in args.skip:
            # Rounds interleave the topologies, so a change in the machine's load hits
            # them all alike; the median round of each is printed.
            runs = [[throughput(Path(tmp) / f"tp{r}-{i}", t, dns, opts)
                     for i, t in enumerate((ONE, ONE_REDIS, TWO_REDIS))]
                    for r in range(args.rounds)]
            rows = [median_run([run[i] for run in runs]) for i in range(len(runs[0]))]
            print(format_throughput(rows), flush=True)
            out["throughput"] = [asdict(r) for r in rows]
            out["throughput_rounds"] = [[asdict(r) for r in run] for run in runs]
        if "throttled" not in args.skip:
            shaped = [throttled(Path(tmp) / f"th{i}", t, dns, opts)
                      for i, t in enumerate((ONE, TWO_REDIS, TWO_ALONE))]
            print(format_throttled(shaped), flush=True)
            out["throttled"] = [asdict(r) for r in shaped]
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
