"""The MTA under test: our engine, a peer (Postfix tuned or default, Exim, Haraka), or
any MTA at HOST:PORT on loopback.

A target starts (and stops) its server, relaying the scenario's test domains to the
rig's sinks, and tells how a load logs in, how deep its queue is and which processes
are its own (for CPU and memory: a cgroup v2 of its own where possible, see
bench/cgroup.py; `notes` says how CPU was measured).

The peers are configured for throughput as their documentation recommends, fsync kept;
their configurations are in bench/peers/ with a comment per setting.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import tomli_w

from bench.cgroup import CpuMeter
from bench.engine_proc import PROJECT_ROOT, EngineProcess
from bench.load import Logins
from bench.net import free_port
from bench.procstat import ProcessTree
from bench.rig.assembly import Rig
from bench.rig.exim import EximRelay
from bench.rig.haraka import HarakaRelay
from bench.rig.postfix import OpenDkim, PostfixRelay, tuned_settings
from bench.rig.sched import as_target
from bench.scenarios import Scenario, Traffic, account_name
from mta.queue.spool import Spool
from mta.smtp.auth import hash_password

DKIM_SELECTOR = "bench"
PEERS = ("postfix", "postfix-default", "exim", "haraka")  # --target / --compare names
ROUTED_BY_TABLE = "routed to the sinks by a table, no DNS lookups (--dns-ttl does not apply)"


class Target(Protocol):
    label: str
    host: str
    port: int
    processes: ProcessTree | None
    notes: list[str]  # for the report: how CPU was measured, what was left out

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
                 dkim: DkimKey | None, tls_ca_file: str = "") -> None:
        self.workdir = workdir
        self.tls_ca_file = tls_ca_file
        if tls_ca_file:
            self.label = "engine+tls"
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
        self.cpu = CpuMeter(self.label, ProcessTree(self._roots))
        self.processes: ProcessTree | None = self.cpu.tree
        self.notes = [self.cpu.note]
        self.engine = EngineProcess(workdir, self.config, workers, preexec=as_target(self.cpu.preexec))
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
        if self.tls_ca_file:  # the sinks' CA; every session's certificate is verified
            config["delivery"]["tls_ca_file"] = self.tls_ca_file
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
        self.cpu.close()


class PostfixTarget:
    """Postfix as a relay to the rig (transport maps), with OpenDKIM when signing:
    tuned for throughput (bench/peers/postfix-tuned.cf, label "postfix") or on its
    default settings ("postfix-default")."""

    def __init__(self, workdir: Path, scenario: Scenario, rig: Rig, dkim: DkimKey | None,
                 tuned: bool = True) -> None:
        self.label = "postfix" if tuned else "postfix-default"
        self.host = "127.0.0.1"
        self.cpu = CpuMeter(self.label, ProcessTree(self._roots))
        self.processes: ProcessTree | None = self.cpu.tree
        self.notes = [self.cpu.note, ROUTED_BY_TABLE]
        self.dkim = None if dkim is None else OpenDkim(workdir / "opendkim", dkim.domain,
                                                       dkim.selector, dkim.path,
                                                       preexec=as_target(self.cpu.preexec))
        extra = {**(tuned_settings() if tuned else {}), **scenario.postfix}
        self.relay = PostfixRelay(workdir / "postfix", rig.dest.routes, rig.sink_port,
                                  milter=self.dkim.socket if self.dkim else "",
                                  extra=extra, preexec=as_target(self.cpu.preexec))
        self.port = self.relay.port

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
        self.cpu.close()


class PeerTarget:
    """Exim or Haraka as a relay to the rig (a routing table: no DNS), fetched on first
    use (bench/rig/peer_install.py). No DKIM: --dkim compares with Postfix only."""

    def __init__(self, kind: str, workdir: Path, rig: Rig, dkim: DkimKey | None) -> None:
        if dkim is not None:
            raise SystemExit(f"--dkim: {kind} has no DKIM signing set up in the bench "
                             "(compare with --compare postfix, OpenDKIM)")
        self.label = kind
        self.host = "127.0.0.1"
        self.cpu = CpuMeter(kind, ProcessTree(self._roots))
        self.processes: ProcessTree | None = self.cpu.tree
        self.notes = [self.cpu.note, ROUTED_BY_TABLE]
        relay = EximRelay if kind == "exim" else HarakaRelay
        self.relay: EximRelay | HarakaRelay = relay(workdir / kind, rig.dest.routes,
                                                    rig.sink_port, preexec=as_target(self.cpu.preexec))
        self.port = self.relay.port

    def _roots(self) -> list[int]:
        proc = self.relay.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []

    def start(self) -> PeerTarget:
        self.relay.start()
        return self

    def queue_depth(self) -> int | None:
        return self.relay.queue_depth()

    def logins(self, traffic: Traffic) -> Logins | None:
        return None  # a relay for its own network: no SASL

    def stop(self) -> None:
        self.relay.stop()
        self.cpu.close()


class ExternalTarget:
    """Any MTA at HOST:PORT; it must relay the test domains to the rig's sinks itself."""

    processes: ProcessTree | None = None

    def __init__(self, hostport: str, auth: str = "") -> None:
        self.notes: list[str] = []
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


def make_target(kind: str, workdir: Path, rig: Rig, scenario: Scenario, workers: int,
                dkim: DkimKey | None, auth: str = "", tls_ca_file: str = "") -> Target:
    """`kind` is "engine", one of PEERS or HOST:PORT (see `check_target`)."""
    if kind == "engine":
        return EngineTarget(workdir, scenario, rig, workers, dkim, tls_ca_file)
    if kind in ("postfix", "postfix-default"):
        return PostfixTarget(workdir, scenario, rig, dkim, tuned=kind == "postfix")
    if kind in ("exim", "haraka"):
        return PeerTarget(kind, workdir, rig, dkim)
    return ExternalTarget(kind, auth)


def check_target(kind: str) -> None:
    """engine, a peer (PEERS), or HOST:PORT on loopback: the rig's DNS and sinks listen
    on 127.0.0.x only, so an MTA anywhere else could not deliver to them (and the bench
    sends no load off this host). SystemExit with the reason if not."""
    if kind == "engine" or kind in PEERS:
        return
    host, _, port = kind.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or not host:
        raise SystemExit(f"--target must be engine, {', '.join(PEERS)} or HOST:PORT, "
                         f"not {kind!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--target {kind}: the bench rig is loopback-only "
                         "(127.0.0.0/8 or ::1)")
