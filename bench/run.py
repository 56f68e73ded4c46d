"""`python -m bench run`: a complete local rig, a load through it, and a report.

The rig, all on loopback: a DNS server (bench.rig.dns) serving the scenario's test
domains, sink MX servers on 127.0.0.x sharing one port (Postfix's smtp-sink by
default, our asyncio sink where per-recipient refusals are needed, a throttling MX
where the scenario has one), the MTA under test (our engine as `mta serve` on a
temporary spool, Postfix as a relay instance, or any HOST:PORT), and the load
generator (bench.load). Every message carries an X-Bench-Index header; the load
generator records when each was accepted, the sinks when each arrived, and the two
are matched for the accept-to-delivered latency.

Everything started here is stopped at the end, after a failure or Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import tomli_w
import uvloop

from bench.engine_proc import EngineProcess, free_port
from bench.load import LoadResult, Logins, Submission, run_load
from bench.report import (
    RunResult,
    Sample,
    format_comparison,
    format_report,
    last_line,
    plot,
    write_json,
)
from bench.rig.dns import DnsServer
from bench.rig.postfix import OpenDkim, PostfixRelay
from bench.rig.sinks import (
    CAPTURE_SEPARATOR,
    AsyncioSink,
    SinkFaults,
    SmtpSink,
    parse_capture,
    start_smtp_sinks,
)
from bench.rig.sinks import free_port as free_port_on
from bench.rig.throttle_mx import BackgroundThrottleMx
from bench.scenarios import (
    DOMAIN_SUFFIX,
    UNKNOWN_PREFIX,
    UNKNOWN_REPLY,
    Destinations,
    Planned,
    Scenario,
    Traffic,
    account_name,
    destinations,
    index_of,
    load_scenario,
)
from mta.queue.spool import Spool
from mta.smtp.auth import hash_password

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DKIM_SELECTOR = "bench"
SAMPLE_INTERVAL = 0.5
COUNTER_POLL = 0.005
INGEST_INTERVAL = 0.2
SEPARATOR = CAPTURE_SEPARATOR.encode()
ROTATE_BYTES = 64 * 2**20  # capture file size at which it is read to the end and removed
ROTATE_SETTLE = 0.2


# --- the target's processes: CPU and memory -------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages split among the processes that map
    them, so the sum over many processes (Postfix's) is not inflated by shared libraries."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(x) for x in task.read_text().split()]
                found += kids
                stack += kids
    return found


class ProcessTree:
    """CPU time and memory (PSS) of some root processes and all their descendants.

    CPU counts each process's own time and its reaped children's (cutime, cstime), so
    short-lived workers (Postfix's smtpd, smtp) count once they exit too.
    Memory is read every `MEMORY_EVERY` samples (smaps_rollup costs more than stat).
    """

    CLK_TCK = os.sysconf("SC_CLK_TCK")
    MEMORY_EVERY = 4

    def __init__(self, roots: Callable[[], list[int]]) -> None:
        self.roots = roots
        self.cpu = 0.0
        self.memory = 0
        self.peak_memory = 0
        self._samples = 0

    def sample(self) -> tuple[float, int]:
        """(CPU seconds so far, memory bytes lately); remembers the peak memory."""
        with_memory = self._samples % self.MEMORY_EVERY == 0
        self._samples += 1
        cpu, memory = 0.0, 0
        for root in self.roots():
            for pid in [root, *descendants(root)]:
                fields = _stat_fields(pid)
                if fields is None:
                    continue
                cpu += sum(int(x) for x in fields[11:15]) / self.CLK_TCK
                memory += _pss(pid) if with_memory else 0
        self.cpu = max(self.cpu, cpu)
        if with_memory:
            self.memory = memory
            self.peak_memory = max(self.peak_memory, memory)
        return self.cpu, self.memory


# --- the rig: DNS and the receiving MX servers -----------------------------------------


class Rig:
    """DNS for the scenario's domains and the sinks they point at, on one shared port."""

    def __init__(self, scenario: Scenario, dest: Destinations, sink_port: int = 0,
                 dns_port: int = 0) -> None:
        self.scenario = scenario
        self.dest = dest
        self.sink_port = sink_port
        self.dns = DnsServer("127.0.0.1", dns_port)
        self.smtp_sinks: list[SmtpSink] = []
        self.asyncio_sinks: list[AsyncioSink] = []
        self.throttle: BackgroundThrottleMx | None = None

    def start(self) -> Rig:
        self.dns.start()
        for domain, address in self.dest.routes.items():
            mx = f"mx-{address.replace('.', '-')}.{DOMAIN_SUFFIX}"
            self.dns.add_mx(domain, [(10, mx)], ttl=3600)
            if not self.dns.store.records.get(mx):
                self.dns.add_a(mx, address, ttl=3600)
        hosts = list(self.scenario.sinks.hosts)
        throttle = self.scenario.throttle
        self.sink_port = self.sink_port or free_port_on(
            hosts + ([throttle.host] if throttle.enabled else []))
        if self.scenario.sinks.kind == "smtp-sink":
            self.smtp_sinks = start_smtp_sinks(hosts, self.sink_port, capture=True)
        else:
            self.asyncio_sinks = [self._asyncio_sink(host) for host in hosts]
        if throttle.enabled:
            self.throttle = BackgroundThrottleMx(
                host=throttle.host, port=self.sink_port,
                max_connections=throttle.max_connections, rate=throttle.rate).start()
        return self

    def _asyncio_sink(self, host: str) -> AsyncioSink:
        rule = (f"^{UNKNOWN_PREFIX}", UNKNOWN_REPLY.format(address="recipient"))
        faults = SinkFaults(rcpt_rules=[rule])
        return AsyncioSink(host, self.sink_port, faults=faults, record=True).start()

    def schedule_throttle(self) -> None:
        """Start the throttling MX's rate changes (seconds from now)."""
        if self.throttle is not None and self.scenario.throttle.schedule:
            self.throttle.schedule([(at, rate) for at, rate in self.scenario.throttle.schedule])

    def sink_messages(self) -> int:
        """Transactions the sinks have received (any mail, any reply)."""
        total = sum(s.messages for s in self.smtp_sinks)
        total += sum(s.accepted for s in self.asyncio_sinks)
        return total + (self.throttle.stats.accepted if self.throttle else 0)

    def throttle_accepted(self) -> int:
        return self.throttle.stats.accepted if self.throttle is not None else 0

    def publish_dkim(self, domain: str, selector: str, record: str) -> None:
        self.dns.add_txt(f"{selector}._domainkey.{domain}", record)

    def describe(self) -> str:
        hosts = ", ".join(self.scenario.sinks.hosts)
        text = (f"rig: DNS on {self.dns.address} ({len(self.dest.domains)} domains "
                f"*.{DOMAIN_SUFFIX}), {self.scenario.sinks.kind} MX on {hosts} port "
                f"{self.sink_port}")
        if self.throttle is not None:
            text += f", throttling MX on {self.scenario.throttle.host}:{self.sink_port}"
        return text

    def stop(self) -> None:
        stoppers: list[Callable[[], None]] = [s.stop for s in self.smtp_sinks]
        stoppers += [s.stop for s in self.asyncio_sinks]
        if self.throttle is not None:
            stoppers.append(self.throttle.stop)
        stoppers.append(self.dns.stop)
        for stop in stoppers:
            with contextlib.suppress(Exception):
                stop()

    def __enter__(self) -> Rig:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- arrivals at the sinks ----------------------------------------------------------------


class _CaptureReader:
    """Reads an smtp-sink's capture file as it grows; dates each message by the moment
    the sink's running counter reached its ordinal (polled every few milliseconds)."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink
        self.times: list[float] = []
        self.counts: list[int] = []
        self.offset = 0
        self.pending = b""
        self.taken = 0  # messages read so far

    def poll_counter(self) -> None:
        n = self.sink.messages
        if not self.counts or n > self.counts[-1]:
            self.times.append(time.time())
            self.counts.append(n)

    def arrival(self, ordinal: int) -> float:
        at = bisect_left(self.counts, ordinal)
        return self.times[min(at, len(self.times) - 1)] if self.times else time.time()

    def read(self) -> Iterator[tuple[bytes, int, float]]:
        """(data, recipients, arrival time) of each message that is complete in the file.

        smtp-sink appends a whole message to the file before it bumps its counter, so
        the first `counted` messages in the file are complete. Past ROTATE_BYTES the
        file is renamed away (smtp-sink opens it by name for every message) and
        finished, so a long run does not fill the disk."""
        counted = self.sink.messages
        path = self.sink.capture_file
        if path is None or not path.exists() or counted <= self.taken:
            return
        chunk = self._read_from(path)
        data, tail = split_partial_separator(self.pending + chunk)
        whole = data.split(SEPARATOR)[1:]  # the file starts with a separator
        ready = min(len(whole), counted - self.taken)
        self.pending = SEPARATOR.join([b"", *whole[ready:]]) + tail
        yield from self._messages(whole[:ready])
        if self.offset >= ROTATE_BYTES:
            yield from self._rotate(path)

    def _read_from(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        return chunk

    def _messages(self, raws: list[bytes]) -> Iterator[tuple[bytes, int, float]]:
        for raw in raws:
            self.taken += 1
            for message in parse_capture(SEPARATOR + raw):
                yield message.data, len(message.rcpt_tos), self.arrival(self.taken)

    def _rotate(self, path: Path) -> Iterator[tuple[bytes, int, float]]:
        done = path.with_name(path.name + ".done")
        os.rename(path, done)
        time.sleep(ROTATE_SETTLE)  # an append under way ends in the renamed file
        self.pending += self._read_from(done)
        done.unlink()
        whole = self.pending.split(SEPARATOR)[1:]
        self.pending, self.offset = b"", 0
        yield from self._messages(whole)


def header(data: bytes, name: bytes) -> str:
    """The first value of a top-level header, unfolded ('' if none)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[: len(name) + 1].lower() == name.lower() + b":":
            return line[len(name) + 1:].strip().decode("utf-8", "replace")
    return ""


def split_partial_separator(data: bytes) -> tuple[bytes, bytes]:
    """(data, the start of a separator being written at its end)."""
    for length in range(len(SEPARATOR) - 1, 0, -1):
        if data.endswith(SEPARATOR[:length]):
            return data[:-length], data[-length:]
    return data, b""


class ArrivalTracker:
    """Matches what the sinks received against the plan: which messages are complete, when."""

    def __init__(self, rig: Rig, plan: dict[int, Planned]) -> None:
        self.rig = rig
        self.plan = plan
        self.readers = [_CaptureReader(s) for s in rig.smtp_sinks]
        self.arrived: dict[int, int] = {}  # index -> recipients received so far
        self.delivered_at: dict[int, float] = {}  # index -> when its last recipient arrived
        self.matched = 0  # arrivals of the load's messages
        self.signed = 0  # ... with a DKIM-Signature header
        self.other: Counter[str] = Counter()  # mail that is not the load's, by its Subject
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-arrivals", daemon=True)
        self._lock = threading.Lock()

    @property
    def delivered(self) -> int:
        return len(self.delivered_at)

    def start(self) -> ArrivalTracker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.ingest()

    def _loop(self) -> None:
        next_ingest = time.monotonic() + INGEST_INTERVAL
        while not self._stop.wait(COUNTER_POLL):
            for reader in self.readers:
                reader.poll_counter()
            if time.monotonic() >= next_ingest:
                self.ingest()
                next_ingest = time.monotonic() + INGEST_INTERVAL

    def ingest(self) -> None:
        with self._lock:
            for reader in self.readers:
                reader.poll_counter()
                for data, rcpts, at in reader.read():
                    self._arrived(data, rcpts, at)
            for sink in self.rig.asyncio_sinks:
                while sink.received:
                    message = sink.received.popleft()
                    if message.accepted:
                        self._arrived(message.data, len(message.rcpt_tos), message.received_at)

    def _arrived(self, data: bytes, rcpts: int, at: float) -> None:
        index = index_of(data)
        planned = None if index is None else self.plan.get(index)
        if index is None or planned is None:
            self.other[header(data, b"Subject")[:60] or "(no subject)"] += 1
            return
        self.matched += 1
        self.signed += bool(header(data, b"DKIM-Signature"))
        got = self.arrived[index] = self.arrived.get(index, 0) + rcpts
        if got >= planned.recipients and index not in self.delivered_at:
            self.delivered_at[index] = at

    def __enter__(self) -> ArrivalTracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AcceptLog:
    """Which message index each 250 was for: run_load calls `submissions(i)` and then
    `on_accept` from the same worker task, so the task tells them apart."""

    def __init__(self, submissions: Callable[[int], Submission]) -> None:
        self._submissions = submissions
        self._current: dict[asyncio.Task[Any] | None, int] = {}
        self.accepted_at: dict[int, float] = {}

    def submission(self, i: int) -> Submission:
        self._current[asyncio.current_task()] = i
        return self._submissions(i)

    def on_accept(self, queue_id: str, at: float) -> None:
        index = self._current.get(asyncio.current_task())
        if index is not None:
            self.accepted_at[index] = at


# --- the MTA under test ------------------------------------------------------------------


class Target(Protocol):
    label: str
    host: str
    port: int
    processes: ProcessTree | None

    def start(self) -> Any: ...

    def stop(self) -> None: ...

    def queue_depth(self) -> int | None: ...

    def logins(self, traffic: Traffic) -> Logins | None: ...


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class DkimKey:
    domain: str
    selector: str
    path: Path
    record: str


def make_dkim_key(workdir: Path, domain: str) -> DkimKey:
    """An RSA-2048 key made with `mta dkim genkey`, and its DNS record."""
    path = workdir / f"{domain}.{DKIM_SELECTOR}.key"
    out = subprocess.run(
        [sys.executable, "-m", "mta", "dkim", "genkey", "--domain", domain, "--selector",
         DKIM_SELECTOR, "--out", str(path)], check=True, capture_output=True, text=True,
        cwd=PROJECT_ROOT, timeout=60).stdout
    record = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                   if line.startswith("value:")), "")
    return DkimKey(domain, DKIM_SELECTOR, path, record)


class EngineTarget:
    """Our engine: `mta serve` on a temporary spool, delivering to the rig."""

    label = "engine"

    def __init__(self, workdir: Path, scenario: Scenario, rig: Rig, workers: int,
                 dkim: DkimKey | None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        # Every account of the scenario is an engine account: sessions authenticate as
        # the account whose campaign they send, as an upstream app would.
        password = secrets.token_urlsafe(12)
        self.passwords = {account_name(k): password for k in range(scenario.messages.accounts)}
        self.config = deep_merge(self._base_config(rig, dkim), scenario.engine)
        hashed = hash_password(password)
        self.config.setdefault("accounts", []).extend(
            {"name": name, "password_hash": hashed, "plan": "pro"} for name in self.passwords)
        if scenario.shaping:
            shaping = workdir / "shaping.toml"
            shaping.write_text(tomli_w.dumps(scenario.shaping))
            self.config["throttle"] = {"shaping_file": str(shaping)}
        self.engine = EngineProcess(workdir, self.config, workers)
        self.processes: ProcessTree | None = ProcessTree(self._roots)
        self._spool: Spool | None = None

    def _base_config(self, rig: Rig, dkim: DkimKey | None) -> dict[str, Any]:
        w = self.workdir
        config: dict[str, Any] = {
            "engine": {"hostname": "mta-bench.localhost", "event_log": str(w / "events.jsonl"),
                       "audit_log": str(w / "audit.jsonl"), "log_level": "warning"},
            "smtp": {"listen": f"{self.host}:{self.port}"},
            "spool": {"path": str(w / "spool")},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "dns": {"nameservers": [rig.dns.address], "timeout": 2.0},
            "delivery": {"port": rig.sink_port, "allow_loopback_mx": True},
        }
        if dkim is not None:
            config["dkim"] = {"keys": [{"domain": dkim.domain, "selector": dkim.selector,
                                        "key_file": str(dkim.path)}]}
        return config

    def logins(self, traffic: Traffic) -> Logins | None:
        return Logins(lambda i: traffic.campaign(i)[0], self.passwords)

    def _roots(self) -> list[int]:
        proc = self.engine.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []

    def start(self) -> EngineTarget:
        self.engine.start()
        return self

    def queue_depth(self) -> int | None:
        if self._spool is None:
            try:
                self._spool = Spool(self.workdir / "spool", readonly=True)
            except (FileNotFoundError, OSError):
                return None
        return self._spool.count("msg")

    def stop(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.engine.stop()


class PostfixTarget:
    """Postfix as a relay to the rig (transport maps), with OpenDKIM when signing."""

    label = "postfix"

    def __init__(self, workdir: Path, scenario: Scenario, rig: Rig, dkim: DkimKey | None) -> None:
        self.host = "127.0.0.1"
        self.dkim = None if dkim is None else OpenDkim(workdir / "opendkim", dkim.domain,
                                                       dkim.selector, dkim.path)
        self.relay = PostfixRelay(workdir / "postfix", rig.dest.routes, rig.sink_port,
                                  milter=self.dkim.socket if self.dkim else "",
                                  extra=scenario.postfix)
        self.port = self.relay.port
        self.processes: ProcessTree | None = ProcessTree(self._roots)

    def _roots(self) -> list[int]:
        roots = [self.relay.master_pid()]
        if self.dkim is not None and self.dkim.proc is not None:
            roots.append(self.dkim.proc.pid)
        return [pid for pid in roots if pid is not None]

    def start(self) -> PostfixTarget:
        if self.dkim is not None:
            self.dkim.start()
        self.relay.start()
        return self

    def queue_depth(self) -> int | None:
        return self.relay.queue_depth()

    def logins(self, traffic: Traffic) -> Logins | None:
        return None  # a relay for its own network: no SASL

    def stop(self) -> None:
        self.relay.stop()
        if self.dkim is not None:
            self.dkim.stop()


class ExternalTarget:
    """Any MTA at HOST:PORT; it must relay the test domains to the rig's sinks itself."""

    processes: ProcessTree | None = None

    def __init__(self, hostport: str, auth: str = "") -> None:
        host, _, port = hostport.rpartition(":")
        self.host, self.port = host.strip("[]") or "127.0.0.1", int(port)
        self.label = hostport
        self.auth = auth  # USER:PASSWORD, or empty: no AUTH

    def logins(self, traffic: Traffic) -> Logins | None:
        if not self.auth:
            return None
        user, _, password = self.auth.partition(":")
        return Logins.single(user, password)

    def start(self) -> ExternalTarget:
        return self

    def queue_depth(self) -> int | None:
        return None

    def stop(self) -> None:
        pass


# --- running one load ----------------------------------------------------------------------


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


class Progress:
    """The live line on stderr: rewritten in place on a terminal, every 5 s otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def show(self, label: str, sample: Sample, rates: tuple[float, float]) -> None:
        if not self.enabled:
            return
        queue = "n/a" if sample.queue is None else str(sample.queue)
        line = (f"[{label}] {sample.t:6.1f}s accepted {sample.accepted} ({rates[0]:.0f}/s)"
                f" delivered {sample.delivered} ({rates[1]:.0f}/s) queue {queue}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
        elif sample.t - self.last_print >= 5.0:
            sys.stderr.write(line + "\n")
            self.last_print = sample.t
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class Monitor:
    """Samples the run every half second: counters, queue depth, CPU and memory."""

    def __init__(self, target: Target, accepts: AcceptLog, tracker: ArrivalTracker, rig: Rig,
                 progress: Progress) -> None:
        self.rig = rig
        self.target = target
        self.accepts = accepts
        self.tracker = tracker
        self.progress = progress
        self.samples: list[Sample] = []
        self.start = time.time()
        self.cpu0 = target.processes.sample()[0] if target.processes else 0.0

    def sample(self) -> Sample:
        cpu = memory = None
        if self.target.processes is not None:
            cpu_now, memory = self.target.processes.sample()
            cpu = cpu_now - self.cpu0
        sample = Sample(round(time.time() - self.start, 3), len(self.accepts.accepted_at),
                        self.tracker.delivered + self.rig.throttle_accepted(),
                        self.target.queue_depth(), memory, cpu)
        self.samples.append(sample)
        return sample

    def recent_rates(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return 0.0, 0.0
        a, b = self.samples[max(0, len(self.samples) - 3)], self.samples[-1]
        dt = (b.t - a.t) or 1.0
        return (b.accepted - a.accepted) / dt, (b.delivered - a.delivered) / dt

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.progress.show(self.target.label, self.sample(), self.recent_rates())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)
        self.progress.show(self.target.label, self.sample(), self.recent_rates())
        self.progress.done()


def throttled_expected(accepts: AcceptLog, plan: dict[int, Planned]) -> int:
    return sum(plan[i].throttled for i in accepts.accepted_at)


def drained(accepts: AcceptLog, tracker: ArrivalTracker, rig: Rig) -> bool:
    plan = tracker.plan
    waiting = any(plan[i].recipients and i not in tracker.delivered_at
                  for i in accepts.accepted_at)
    return not waiting and rig.throttle_accepted() >= throttled_expected(accepts, plan)


@dataclass
class Drain:
    why: str = ""  # why the wait ended before everything arrived
    at: float = 0.0  # time.time() when the wait ended


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
        await asyncio.sleep(0.05)
    return Drain("", time.time())


async def drive(target: Target, rig: Rig, traffic: Traffic, tracker: ArrivalTracker,
                opts: Options) -> RunResult:
    scenario = opts.scenario
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
    run = build_result(target, opts, result, accepts, tracker, monitor, started)
    add_throttled(run, rig, throttled_expected(accepts, tracker.plan), started, drain)
    if drain.why:
        run.notes.append(drain.why)
    return run


def build_result(target: Target, opts: Options, load: LoadResult, accepts: AcceptLog,
                 tracker: ArrivalTracker, monitor: Monitor, started: float) -> RunResult:
    plan = tracker.plan
    expected = [i for i in accepts.accepted_at if plan[i].recipients]
    delivered = [i for i in expected if i in tracker.delivered_at]
    last = max((tracker.delivered_at[i] for i in delivered), default=started)
    queues = [s.queue for s in monitor.samples if s.queue is not None]
    result = RunResult(
        target=target.label, scenario=opts.scenario.name, dkim=opts.dkim,
        accepted=load.accepted, refused=load.refused, errors=load.errors,
        replies=dict(load.replies), load_seconds=load.elapsed, e2e_seconds=last - started,
        expected=len(expected), delivered=len(delivered), other_arrivals=dict(tracker.other),
        accept_latencies=load.accept_latencies,
        e2e_latencies=[max(0.0, tracker.delivered_at[i] - accepts.accepted_at[i])
                       for i in delivered],
        delivered_times=[tracker.delivered_at[i] - started for i in delivered],
        cpu_seconds=monitor.samples[-1].cpu if monitor.samples else None,
        peak_memory=target.processes.peak_memory if target.processes else None,
        peak_queue=max(queues) if queues else None, samples=monitor.samples,
    )
    if opts.dkim:
        result.notes.append(f"DKIM-signed at the sinks: {tracker.signed} of {tracker.matched}")
    if len(accepts.accepted_at) != load.accepted:
        result.notes.append(f"{load.accepted - len(accepts.accepted_at)} accepts not matched")
    return result


def add_throttled(run: RunResult, rig: Rig, expected: int, started: float, drain: Drain) -> None:
    """Count the messages the throttling MX took (it dates none: no latencies from it)."""
    if rig.throttle is None:
        return
    stats = rig.throttle.stats
    got = min(stats.accepted, expected)
    run.expected += expected
    run.delivered += got
    if got:
        run.e2e_seconds = max(run.e2e_seconds, drain.at - started)
    run.notes.append(f"throttling MX: took {stats.accepted} of {expected}, answered"
                     f" {stats.deferred} messages and {stats.refused} connections with 421,"
                     f" at most {stats.max_concurrent} connections at once")


def make_target(kind: str, workdir: Path, rig: Rig, opts: Options,
                dkim: DkimKey | None) -> Target:
    if kind == "engine":
        return EngineTarget(workdir, opts.scenario, rig, opts.workers, dkim)
    if kind == "postfix":
        return PostfixTarget(workdir, opts.scenario, rig, dkim)
    return ExternalTarget(kind, opts.auth)


def run_once(kind: str, opts: Options) -> RunResult:
    """One complete run against one target, rig and all, torn down before returning."""
    workdir = Path(tempfile.mkdtemp(prefix=f"mta-bench-{kind.replace(':', '-')}-"))
    workdir.chmod(0o755)  # Postfix's daemons walk into it as the postfix user
    stack = ExitStack()
    try:
        dest = destinations(opts.scenario)
        rig = stack.enter_context(Rig(opts.scenario, dest, opts.sink_port, opts.dns_port))
        dkim = make_dkim_key(workdir, opts.scenario.messages.sender_domain) if opts.dkim else None
        if dkim is not None:
            rig.publish_dkim(dkim.domain, dkim.selector, dkim.record)
        target = make_target(kind, workdir, rig, opts, dkim)
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
            if opts.keep:
                print(f"kept {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Let a teardown finish even if Ctrl-C is pressed again meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- the command -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", default="steady", help="a name in bench/scenarios/ or a file")
    parser.add_argument("--count", type=int, help="messages to submit (scenario's by default)")
    parser.add_argument("--duration", type=float, help="submit for this many seconds instead")
    parser.add_argument("--rate", type=float, help="target msg/s overall (0: as fast as possible)")
    parser.add_argument("--sessions", type=int, help="concurrent SMTP sessions")
    parser.add_argument("--target", default="engine",
                        help="engine (default), postfix, or HOST:PORT of any MTA")
    parser.add_argument("--compare", choices=["postfix"], help="also run Postfix, print ratios")
    parser.add_argument("--dkim", action="store_true", help="sign with RSA-2048 (OpenDKIM for Postfix)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--sink-port", type=int, default=0, help="port of every sink (0: free)")
    parser.add_argument("--dns-port", type=int, default=0, help="port of the rig's DNS (0: free)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "out"),
                        help="folder for the PNG plot and the JSON figures")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--quiet", action="store_true", help="no live progress line")
    parser.add_argument("--auth", default="", metavar="USER:PASSWORD",
                        help="AUTH PLAIN as this user at a --target HOST:PORT (after STARTTLS "
                             "when offered); the engine target authenticates per account")


def scenario_from(args: argparse.Namespace) -> Scenario:
    scenario = load_scenario(args.scenario)
    overrides = {key: getattr(args, key) for key in ("count", "duration", "rate", "sessions")
                 if getattr(args, key) is not None}
    if overrides:
        scenario.load = replace(scenario.load, **overrides)
    return scenario


def targets_of(args: argparse.Namespace) -> list[str]:
    kinds = [args.target]
    if args.compare and args.compare not in kinds:
        kinds.append(args.compare)
    for kind in kinds:
        if kind not in ("engine", "postfix"):
            check_external(kind)
    return kinds


def check_external(hostport: str) -> None:
    """HOST:PORT on loopback: the rig's DNS and sinks listen on 127.0.0.x only, so an MTA
    anywhere else could not deliver to them (and the bench sends no load off this host)."""
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or not host:
        raise SystemExit(f"--target must be engine, postfix or HOST:PORT, not {hostport!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--target {hostport}: the bench rig is loopback-only "
                         "(127.0.0.0/8 or ::1)")


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    scenario = scenario_from(args)
    opts = Options(scenario, args.workers, args.dkim, args.sink_port, args.dns_port, args.keep,
                   not args.quiet, args.auth)
    results: list[RunResult] = []
    try:
        for kind in targets_of(args):
            results.append(run_once(kind, opts))
            print(format_report(results[-1]), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: everything started has been stopped", file=sys.stderr)
        return 130
    if len(results) > 1:
        print(format_comparison(results[0], results[1]))
    png = save_outputs(results, Path(args.out))
    print(f"plot: {png}" if png else "plot: skipped (pip install matplotlib)")
    print(last_line(results[0]), flush=True)
    return 0


def save_outputs(results: list[RunResult], out: Path) -> Path | None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{results[0].scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    write_json(results, out / f"{stem}.json")
    return plot(results, out / f"{stem}.png")
