"""Injection-API benchmark: recipients per second into the spool through
`POST /api/inject/v1` against messages per second over SMTP, in the same run.

    python -m bench.inject [--recipients 50000] [--batch 1000] [--concurrency 8]
                           [--smtp-count 20000] [--sessions 20] [--size 4096]
                           [--workers 2] [--rounds 1] [--long-lines]

Each phase gets a fresh `mta serve` on a temporary spool (fsync on, delivery off, the
policy guard on): first `--smtp-count` messages of `--size` bytes over `--sessions` SMTP
sessions (the load of `bench.accept`), then `--recipients` recipients in requests of
`--batch`, `--concurrency` requests at a time, each recipient's message rendered from
the same templates to about `--size` bytes (a text and an HTML part, personalised).
`--long-lines` makes the HTML one long line per paragraph, as many editors write it
(quoted-printable instead of 7bit). Prints both rates, the engine's CPU per message and
the ratio (the target: at least 3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.accept import measure as measure_smtp
from bench.engine_proc import EngineProcess, read_events
from bench.net import free_port, wait_for_port
from mta.inject.auth import api_key_hash, new_api_key

PARAGRAPH = "The quick brown fox jumps over the lazy dog; 0123456789 abcdefghij."


def templates(size: int, long_lines: bool) -> dict[str, Any]:
    """Content whose rendered messages are about `size` bytes (half text, half HTML), with
    the substitutions of a typical campaign: the name in the greeting and the subject,
    a personal code in both parts, the shop's name from the request's substitutions."""
    lines = max(1, (size - 700) // 2 // 75)
    text = ("Hello {{ name }},\n\n" + f"{PARAGRAPH}\n" * lines
            + "Your code: {{ code }}\n{{ shop }}\n")
    paragraphs = [f"<p>{PARAGRAPH}</p>" for _ in range(lines)]
    html = ("<html><body>\n<h1>Hello {{ name }}</h1>\n"
            + ("".join(paragraphs) if long_lines else "\n".join(paragraphs))
            + "\n<p>Your code: <b>{{ code }}</b></p>\n<p>{{ shop }}</p>\n</body></html>\n")
    return {"from": {"email": "news@bench.test", "name": "{{ shop }}"},
            "subject": "Your offer, {{ name }}", "text_body": text, "html_body": html,
            "headers": {"X-Mailer": "bench"}}


def request_body(start: int, batch: int, content: dict[str, Any]) -> bytes:
    recipients = [{"email": f"user{i}@d{i % 100}.test", "name": f"User {i}",
                   "substitutions": {"code": f"C{i:08d}"}} for i in range(start, start + batch)]
    return json.dumps({"envelope_sender": "bounce@bench.test", "campaign": f"c{start % 5}",
                       "recipients": recipients, "substitutions": {"shop": "Bench Shop"},
                       "content": content}).encode()


async def post_all(url: str, key: str, bodies: list[bytes], concurrency: int
                   ) -> tuple[int, int, float]:
    """(recipients accepted, refused, seconds) for all requests, `concurrency` at a time."""
    queue = list(reversed(bodies))
    accepted = refused = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted, refused
        while queue:
            body = queue.pop()
            async with session.post(url, data=body, headers={
                    "Authorization": f"Bearer {key}",
                    "Content-Type": "application/json"}) as reply:
                result = await reply.json()
                if reply.status != 200:
                    raise RuntimeError(f"{reply.status}: {result}")
                accepted += result["success_count"]
                refused += result["fail_count"]

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return accepted, refused, time.perf_counter() - started


async def measure_api(recipients: int, batch: int, concurrency: int, size: int, workers: int,
                      long_lines: bool) -> dict[str, float]:
    key = new_api_key()
    content = templates(size, long_lines)
    bodies = [request_body(start, min(batch, recipients - start), content)
              for start in range(0, recipients, batch)]
    with tempfile.TemporaryDirectory(prefix="mta-bench-inject-") as tmp:
        port = free_port()
        config = {
            "engine": {"workers": workers, "event_log": f"{tmp}/events.jsonl",
                       "audit_log": f"{tmp}/audit.jsonl", "log_level": "warning"},
            "smtp": {"listen": f"127.0.0.1:{free_port()}"},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "inject": {"listen": f"127.0.0.1:{port}"},
            "spool": {"path": f"{tmp}/spool"},
            "delivery": {"enabled": False},
            "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.5},
            "accounts": [{"name": "bench", "api_key_hashes": [api_key_hash(key)]}],
        }
        async with EngineProcess(Path(tmp), config) as engine:
            wait_for_port("127.0.0.1", port, 10)
            cpu0 = engine.cpu_seconds()
            accepted, refused, elapsed = await post_all(
                f"http://127.0.0.1:{port}/api/inject/v1", key, bodies, concurrency)
            cpu = engine.cpu_seconds() - cpu0
        sizes = [e["size"] for e in read_events(Path(tmp) / "events.jsonl", "Reception")]
    return {
        "accepted": accepted, "refused": refused, "elapsed_s": round(elapsed, 2),
        "accepted_rate": round(accepted / elapsed, 1),
        "engine_cpu_ms_per_msg": round(1000 * cpu / max(accepted, 1), 3),
        "mean_message_bytes": round(statistics.mean(sizes)) if sizes else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipients", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1000, help="recipients per request")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at a time")
    parser.add_argument("--smtp-count", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--long-lines", action="store_true",
                        help="HTML paragraphs on one line (quoted-printable)")
    args = parser.parse_args()
    ratios = []
    for round_ in range(1, args.rounds + 1):
        smtp = asyncio.run(measure_smtp(args.smtp_count, args.sessions, args.size,
                                        args.workers))
        api = asyncio.run(measure_api(args.recipients, args.batch, args.concurrency,
                                      args.size, args.workers, args.long_lines))
        ratio = api["accepted_rate"] / smtp["accepted_rate"]
        ratios.append(ratio)
        print(f"round {round_}: smtp " + " ".join(f"{k}={v}" for k, v in smtp.items()),
              flush=True)
        print(f"round {round_}: api  " + " ".join(f"{k}={v}" for k, v in api.items()),
              flush=True)
        print(f"round {round_}: ratio={ratio:.2f}", flush=True)
    print(f"ratio_median={statistics.median(ratios):.2f} (target: at least 3)")


if __name__ == "__main__":
    main()
