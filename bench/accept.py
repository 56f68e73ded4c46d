"""Accept-rate benchmark: N messages of about 4 KB over 20 sessions into a fresh engine.

    python -m bench.accept [--count 20000] [--sessions 20] [--size 4096] [--workers 2]
                           [--compare postfix] [--rounds 3]

Starts `mta serve` on a temporary spool (fsync on, as always), submits the load,
and prints the accepted rate and the engine's CPU time per message. Delivery is off,
so only intake is measured. `--compare postfix` sends the same load to a Postfix 3.7
relay instance (bench/rig/postfix.py; its queue files are fsync'd too) whose delivery
is deferred (`defer_transports`), round after round, and prints the median rates and
their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from bench.engine_proc import EngineProcess
from bench.load import Submission, make_body, run_load
from bench.net import free_port
from bench.rig.postfix import PostfixRelay


def submissions(size: int, domains: int = 100):
    body_cache: dict[int, bytes] = {}

    def make(i: int) -> Submission:
        rcpt = f"user{i}@d{i % domains}.test"
        body = body_cache.get(i % 50)
        if body is None:
            body = body_cache[i % 50] = make_body(size, f"load {i}", "sender@bench.test", rcpt,
                                                  campaign=f"c{i % 5}")
        return Submission("sender@bench.test", [rcpt], body)

    return make


async def measure(count: int, sessions: int, size: int, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mta-bench-") as tmp:
        port = free_port()
        config = {
            "engine": {"workers": workers, "event_log": f"{tmp}/events.jsonl",
                       "log_level": "warning"},
            "smtp": {"listen": f"127.0.0.1:{port}"},
            "spool": {"path": f"{tmp}/spool"},
            "delivery": {"enabled": False},
            "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.5},
        }
        async with EngineProcess(Path(tmp), config) as engine:
            cpu0 = engine.cpu_seconds()
            result = await run_load("127.0.0.1", port, submissions(size), count, sessions)
            cpu = engine.cpu_seconds() - cpu0
    return {
        "accepted": result.accepted, "refused": result.refused, "errors": result.errors,
        "elapsed_s": round(result.elapsed, 2), "accepted_rate": round(result.rate, 1),
        "engine_cpu_ms_per_msg": round(1000 * cpu / max(result.accepted, 1), 3),
        "engine_cpu_cores": round(cpu / result.elapsed, 2) if result.elapsed else 0.0,
    }


async def measure_postfix(count: int, sessions: int, size: int) -> dict[str, float]:
    """The same load into Postfix, which queues it (fsync) and delivers nothing."""
    with tempfile.TemporaryDirectory(prefix="mta-bench-pf-") as tmp:
        os.chmod(tmp, 0o755)  # the postfix user walks into its queue below
        routes = {f"d{i}.test": "127.0.0.2" for i in range(100)}
        with PostfixRelay(Path(tmp) / "postfix", routes, free_port(),
                          extra={"defer_transports": "smtp relay"}) as postfix:
            result = await run_load(postfix.host, postfix.port, submissions(size), count,
                                    sessions)
    return {"accepted": result.accepted, "refused": result.refused, "errors": result.errors,
            "elapsed_s": round(result.elapsed, 2), "accepted_rate": round(result.rate, 1)}


def compare(args: argparse.Namespace) -> None:
    ours: list[float] = []
    theirs: list[float] = []
    for round_ in range(1, args.rounds + 1):
        mine = asyncio.run(measure(args.count, args.sessions, args.size, args.workers))
        other = asyncio.run(measure_postfix(args.count, args.sessions, args.size))
        ours.append(mine["accepted_rate"])
        theirs.append(other["accepted_rate"])
        print(f"round {round_}: engine {mine['accepted_rate']} msg/s "
              f"({mine['engine_cpu_ms_per_msg']} ms CPU/msg), postfix "
              f"{other['accepted_rate']} msg/s, ratio {mine['accepted_rate'] / other['accepted_rate']:.2f}",
              flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"engine_rate={a} postfix_rate={b} ratio={a / b:.2f} (medians of {args.rounds})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--compare", choices=["postfix"], help="the same load into Postfix")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the comparison")
    args = parser.parse_args()
    if args.compare:
        compare(args)
        return
    stats = asyncio.run(measure(args.count, args.sessions, args.size, args.workers))
    print(" ".join(f"{k}={v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
