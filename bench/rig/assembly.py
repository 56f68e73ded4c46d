"""The rig of a scenario: DNS for its test domains and the sink MX servers they point at.

Every sink listens on the same port on its own 127.0.0.x address: Postfix's smtp-sink by
default (bench.rig.sinks), our asyncio sink where the scenario needs per-recipient
refusals, and a throttling MX (bench.rig.throttle_mx) where the scenario has one. The
DNS server (bench.rig.dns) gives each test domain an MX record on one of the sinks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from bench.net import free_port
from bench.rig.dns import DEFAULT_TTL, DnsServer
from bench.rig.sinks import (
    AsyncioSink,
    AsyncioSinkProcess,
    SinkFaults,
    SmtpSink,
    server_context,
    start_smtp_sinks,
)
from bench.rig.throttle_mx import BackgroundThrottleMx
from bench.scenarios import (
    DOMAIN_SUFFIX,
    INDEX_HEADER,
    UNKNOWN_PREFIX,
    UNKNOWN_REPLY,
    Destinations,
    Scenario,
)


class Rig:
    """DNS for the scenario's domains and the sinks they point at, on one shared port."""

    def __init__(self, scenario: Scenario, dest: Destinations, sink_port: int = 0,
                 dns_port: int = 0, tls_cert: str = "", processes: bool = False,
                 dns_ttl: int = DEFAULT_TTL) -> None:
        self.scenario = scenario
        self.dns_ttl = dns_ttl  # of the MX and A answers: 0 makes every message a lookup
        self.tls_cert = tls_cert  # PEM key and chain: the asyncio sinks offer STARTTLS
        self.processes = processes  # asyncio sinks in processes of their own
        self.dest = dest
        self.sink_port = sink_port
        self.dns = DnsServer("127.0.0.1", dns_port)
        self.smtp_sinks: list[SmtpSink] = []
        self.asyncio_sinks: list[AsyncioSink | AsyncioSinkProcess] = []
        self.throttle: BackgroundThrottleMx | None = None

    def start(self) -> Rig:
        self.dns.start()
        for domain, address in self.dest.routes.items():
            mx = f"mx-{address.replace('.', '-')}.{DOMAIN_SUFFIX}"
            self.dns.add_mx(domain, [(10, mx)], ttl=self.dns_ttl)
            if not self.dns.store.records.get(mx):
                self.dns.add_a(mx, address, ttl=self.dns_ttl)
        hosts = list(self.scenario.sinks.hosts)
        throttle = self.scenario.throttle
        self.sink_port = self.sink_port or free_port(
            *hosts, *([throttle.host] if throttle.enabled else []))
        if self.scenario.sinks.kind == "smtp-sink":
            self.smtp_sinks = start_smtp_sinks(hosts, self.sink_port, capture=True)
        else:
            self.asyncio_sinks = [self._asyncio_sink(host) for host in hosts]
        if throttle.enabled:
            self.throttle = BackgroundThrottleMx(
                host=throttle.host, port=self.sink_port,
                max_connections=throttle.max_connections, rate=throttle.rate).start()
        return self

    def _asyncio_sink(self, host: str) -> AsyncioSink | AsyncioSinkProcess:
        rule = (f"^{UNKNOWN_PREFIX}", UNKNOWN_REPLY.format(address="recipient"))
        faults = SinkFaults(rcpt_rules=[rule])
        if self.processes:  # the bench process's CPU (and GIL) stays the load's
            return AsyncioSinkProcess(host, self.sink_port, faults=faults,
                                      tls_cert=self.tls_cert,
                                      arrivals_header=INDEX_HEADER).start()
        return AsyncioSink(host, self.sink_port, faults=faults, record=True,
                           tls=server_context(self.tls_cert) if self.tls_cert else None).start()

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
                f"*.{DOMAIN_SUFFIX}, TTL {self.dns_ttl} s), {self.scenario.sinks.kind} MX on {hosts} port "
                f"{self.sink_port}" + (" with STARTTLS" if self.tls_cert else "")
                + (" (sink processes)" if self.processes else ""))
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
