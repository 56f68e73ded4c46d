"""`python -m bench run --webhook`: the same load without, then with a webhook, in one run.

The webhook receiver is a process of its own on loopback (`python -m bench.rig.webhook`),
checking every signature. The engine sends it the events an upstream app would want
(RECEIVER_EVENTS). Once the sinks have every message, the run waits (the engine still
up) until the receiver has every such event of the engine's event log, by id, and says
how many arrived, how many twice, how long after the drain it caught up; then the
end-to-end rates of the two runs are compared (the issue asks for at least 0.9).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.engine_proc import PROJECT_ROOT, read_events
from bench.orchestrator import Options, run_once
from bench.pairs import ab_order, pair_comparison
from bench.report import RunResult, format_report, last_line, save_outputs
from bench.rig.webhook import SECRET_ENV
from bench.scenarios import Scenario

APP_EVENTS = ["Delivery", "Bounce", "Expiration", "Complaint", "Unsubscribe", "CampaignPaused"]
ALL_EVENTS = ["Reception", "TransientFailure", *APP_EVENTS]
EVENT_SETS = {"app": APP_EVENTS, "all": ALL_EVENTS}
CATCH_UP_TIMEOUT = 300.0  # seconds after the drain for the receiver to have every event


class ReceiverProcess:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def start(self) -> ReceiverProcess:
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), **{SECRET_ENV: self.secret})
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.rig.webhook"],
                                     stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=PROJECT_ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"the webhook receiver did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def stats(self, ids: bool = False) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/stats" + ("?ids=1" if ids else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def with_webhook(scenario: Scenario, url: str, secret: str, events: list[str]) -> Scenario:
    hook = {"name": "bench", "url": url, "secret": secret, "events": events,
            "batch_size": 100, "batch_wait": 0.5}
    return replace(scenario, engine={**scenario.engine, "webhooks": [hook]})


def logged_ids(workdir: Path, events: list[str]) -> set[str]:
    """The ids of the events the receiver should get, from the engine's event log."""
    return {e["event_id"] for e in read_events(workdir / "events.jsonl")
            if e.get("type") in events and "event_id" in e}


def catch_up(receiver: ReceiverProcess, target: Any, events: list[str]) -> list[str]:
    """Wait until the receiver has every event of the event log; lines for the report."""
    drained_at = time.time()
    deadline = time.monotonic() + CATCH_UP_TIMEOUT
    expected: set[str] = set()
    while True:
        time.sleep(0.5)
        expected = logged_ids(target.workdir, events)
        stats = receiver.stats()
        if stats["unique"] >= len(expected) or time.monotonic() >= deadline:
            break
    stats = receiver.stats(ids=True)
    missing = len(expected - set(stats.pop("ids")))
    lag = max(0.0, stats["last_at"] - drained_at)
    return [f"webhook: {len(expected)} events expected, {stats['unique']} received once or "
            f"more, {missing} missing, {stats['duplicates']} duplicates, "
            f"{stats['bad_signatures']} bad signatures, {stats['batches']} batches (largest "
            f"{stats['largest_batch']}), the last {lag:.1f}s after the mail drained"]


def run_hooked(opts: Options, scenario: Scenario, events: list[str]) -> RunResult:
    """One run of the engine sending its events to a receiver of its own."""
    receiver = ReceiverProcess(secrets.token_urlsafe(24)).start()
    try:
        hooked = replace(opts,
                         scenario=with_webhook(scenario, receiver.url, receiver.secret, events),
                         after_drain=lambda target, r=receiver: catch_up(r, target, events))
        result = run_once("engine", hooked)
    finally:
        receiver.stop()
    result.target = "engine+webhook"
    return result


def webhook_compare(args: Any, scenario: Scenario, opts: Options) -> int:
    """Rounds of (without, with) the webhook, counterbalanced (bench/pairs.py); the ratio
    of end-to-end rates per round."""
    order = ab_order(args.rounds)
    events = EVENT_SETS[args.webhook_events]
    results: list[RunResult] = []
    for hooked in order:
        results.append(run_hooked(opts, scenario, events) if hooked
                       else run_once("engine", opts))
        print(format_report(results[-1]), flush=True)
    print(pair_comparison(results, order, "webhook / no webhook"))
    print(save_outputs(results, Path(args.out)))
    print(last_line(results[0]), flush=True)
    return 0
