"""An authoritative DNS server on loopback for tests and benchmarks, built on dnslib.

Zones are plain Python data: `add_mx`, `add_a`, `add_aaaa`, `add_cname`, `add_txt`,
`add_tlsa`. `secure(name)` sets the AD flag on the answers for that name (and
`secure(zone, subtree=True)` for every name under it), as a validating resolver does
for DNSSEC-signed data.
Every name under a served zone that was never added answers NXDOMAIN (with the
zone's SOA, so negative caching works); a name that exists without the asked type
answers NODATA. By default the server serves the root zone, so *every* unknown name
is NXDOMAIN. Failures can be switched per name at run time:

    server.fail("d1.test", "servfail")   # SERVFAIL for every query of that name
    server.fail("d1.test", "timeout")    # no reply at all
    server.fail("d1.test", None)         # back to normal

The server answers UDP and TCP on the same port from two daemon threads, so it is
usable from synchronous pytest fixtures and from bench scripts alike:

    with DnsServer() as dns:
        dns.add_mx("d1.test", [(10, "mx.d1.test")], ttl=60)
        dns.add_a("mx.d1.test", "127.0.0.2")
        ... DnsConfig(nameservers=[dns.address]) ...

`python -m bench.rig.dns --listen 127.0.0.1:5300 --bench-domains 100` runs it standalone.
"""

from __future__ import annotations

import argparse
import errno
import signal
import socketserver
import threading
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from dnslib import (
    AAAA,
    CNAME,
    MX,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TLSA,
    TXT,
    A,
    DNSError,
    DNSHeader,
    DNSRecord,
)

from bench import net

Fault = Literal["servfail", "timeout"]
FAULTS: frozenset[str] = frozenset({"servfail", "timeout"})
MAX_CHASE = 16  # CNAME hops the server follows inside its own data
DEFAULT_TTL = 300
DEFAULT_NEGATIVE_TTL = 300
UDP_PLAIN_LIMIT = 512  # reply size limit for UDP queries without EDNS
BENCH_MX_HOSTS: tuple[str, ...] = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def canonical(name: str) -> str:
    """Lower case, no trailing dot; the root is ''."""
    return name.strip().rstrip(".").lower()


def parents(name: str) -> Iterable[str]:
    """'a.b.c' -> 'a.b.c', 'b.c', 'c', '' (the root)."""
    labels = name.split(".") if name else []
    for i in range(len(labels)):
        yield ".".join(labels[i:])
    yield ""


def split_txt(text: str | bytes) -> list[bytes]:
    """A TXT value as character-strings of at most 255 bytes (long DKIM keys)."""
    raw = text.encode() if isinstance(text, str) else text
    return [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]


@dataclass
class Zone:
    apex: str  # canonical
    negative_ttl: int = DEFAULT_NEGATIVE_TTL

    def soa(self) -> RR:
        # The SOA minimum and the SOA's own TTL both bound negative caching (RFC 2308).
        serial_refresh_retry_expire_min = (1, 3600, 600, 86400, self.negative_ttl)
        return RR(
            self.apex + ".",
            QTYPE.SOA,
            ttl=self.negative_ttl,
            rdata=SOA("ns.rig.invalid.", "hostmaster.rig.invalid.", serial_refresh_retry_expire_min),
        )


@dataclass
class ZoneStore:
    """The served data: zones, records by (name, type), faults by name. Thread-safe."""

    zones: dict[str, Zone] = field(default_factory=dict)
    records: dict[str, dict[int, list[RR]]] = field(default_factory=dict)
    existing: Counter[str] = field(default_factory=Counter)  # names and their ancestors
    faults: dict[tuple[str, int | None], Fault] = field(default_factory=dict)
    secure_names: set[str] = field(default_factory=set)  # answers get the AD flag
    secure_zones: set[str] = field(default_factory=set)  # ... and every name below these
    chase_cnames: bool = True
    lock: threading.RLock = field(default_factory=threading.RLock)

    def add_zone(self, apex: str, negative_ttl: int = DEFAULT_NEGATIVE_TTL) -> None:
        with self.lock:
            self.zones[canonical(apex)] = Zone(canonical(apex), negative_ttl)

    def zone_for(self, name: str) -> Zone | None:
        """The closest enclosing served zone of `name`, if any."""
        return next((self.zones[p] for p in parents(name) if p in self.zones), None)

    def add(self, name: str, rtype: int, rdata: object, ttl: int) -> None:
        key = canonical(name)
        rr = RR(key + ".", rtype, ttl=ttl, rdata=rdata)
        with self.lock:
            if key not in self.records:
                self.records[key] = {}
                self.existing.update(parents(key))
            self.records[key].setdefault(rtype, []).append(rr)

    def remove(self, name: str, rtype: int | None = None) -> None:
        """Forget `name`'s records of `rtype`, or all of them."""
        key = canonical(name)
        with self.lock:
            by_type = self.records.get(key)
            if by_type is None:
                return
            if rtype is None:
                by_type.clear()
            else:
                by_type.pop(rtype, None)
            if not by_type:
                del self.records[key]
                self.existing.subtract(parents(key))
                self.existing += Counter()  # drop zero counts

    def set_fault(self, name: str, fault: Fault | None, rtype: int | None = None) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault must be one of {sorted(FAULTS)} or None, got {fault!r}")
        key = (canonical(name), rtype)
        with self.lock:
            if fault is None:
                self.faults.pop(key, None)
            else:
                self.faults[key] = fault

    def is_secure(self, name: str) -> bool:
        with self.lock:
            return name in self.secure_names or any(p in self.secure_zones
                                                    for p in parents(name))

    def fault_for(self, name: str, rtype: int) -> Fault | None:
        return self.faults.get((name, rtype)) or self.faults.get((name, None))


def answer_query(store: ZoneStore, request: DNSRecord) -> DNSRecord | None:
    """The reply to `request` from `store`'s data, or None to stay silent (timeout fault)."""
    reply = request.reply()
    if len(request.questions) != 1:
        reply.header.rcode = RCODE.FORMERR
        return reply
    name, qtype = canonical(str(request.q.qname)), request.q.qtype
    with store.lock:
        for _ in range(MAX_CHASE):
            fault = store.fault_for(name, qtype)
            if fault == "timeout":
                return None
            if fault == "servfail":
                return _with_rcode(reply, RCODE.SERVFAIL)
            zone = store.zone_for(name)
            if zone is None:
                # Outside our zones: REFUSED if asked directly, stop chasing otherwise.
                return reply if reply.rr else _with_rcode(reply, RCODE.REFUSED)
            target = _answer_name(store, zone, name, qtype, reply)
            if target is None or not store.chase_cnames:
                return reply
            name = target
    return reply


def _answer_name(
    store: ZoneStore, zone: Zone, name: str, qtype: int, reply: DNSRecord
) -> str | None:
    """Add what `store` has for (name, qtype) to `reply`; return a CNAME target to chase."""
    by_type = store.records.get(name, {})
    if qtype in by_type:
        for rr in by_type[qtype]:
            reply.add_answer(rr)
        return None
    if qtype == QTYPE.SOA and name == zone.apex:
        reply.add_answer(zone.soa())
        return None
    if QTYPE.CNAME in by_type and qtype != QTYPE.CNAME:
        cname = by_type[QTYPE.CNAME][0]
        reply.add_answer(cname)
        return canonical(str(cname.rdata.label))
    if name not in store.existing and name != zone.apex:
        reply.header.rcode = RCODE.NXDOMAIN
    reply.add_auth(zone.soa())
    return None


def _with_rcode(reply: DNSRecord, rcode: int) -> DNSRecord:
    reply.header.rcode = rcode
    return reply


def udp_limit(request: DNSRecord) -> int:
    """The largest UDP reply the client accepts: its EDNS buffer size, else 512."""
    sizes = [rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT]
    return max(sizes[0], UDP_PLAIN_LIMIT) if sizes else UDP_PLAIN_LIMIT


def pack_reply(request: DNSRecord, reply: DNSRecord, *, udp: bool) -> bytes:
    """Wire form of `reply`, truncated (TC set, so the client retries over TCP) if too big."""
    wire = reply.pack()
    if udp and len(wire) > udp_limit(request):
        wire = truncated(reply).pack()
    return wire


def truncated(reply: DNSRecord) -> DNSRecord:
    """`reply` with TC set and no records, keeping the question (dnslib's drops it)."""
    header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap)
    header.tc = 1
    return DNSRecord(header, questions=list(reply.questions))


class _UdpHandler(socketserver.BaseRequestHandler):
    server: _UdpServer

    def handle(self) -> None:
        data, sock = self.request
        wire = self.server.rig.handle_packet(data, udp=True)
        if wire is not None:
            sock.sendto(wire, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    server: _TcpServer
    MAX_QUERIES_PER_CONNECTION = 1000
    IDLE_TIMEOUT = 10.0

    def handle(self) -> None:
        self.request.settimeout(self.IDLE_TIMEOUT)
        for _ in range(self.MAX_QUERIES_PER_CONNECTION):
            header = self._read_exactly(2)
            if header is None:
                return
            data = self._read_exactly(int.from_bytes(header, "big"))
            if data is None:
                return
            wire = self.server.rig.handle_packet(data, udp=False)
            if wire is not None:  # a timeout fault: say nothing, let the client give up
                self.request.sendall(len(wire).to_bytes(2, "big") + wire)

    def _read_exactly(self, size: int) -> bytes | None:
        buf = b""
        while len(buf) < size:
            try:
                chunk = self.request.recv(size - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf


class _UdpServer(socketserver.UDPServer):
    rig: DnsServer
    allow_reuse_address = False  # SO_REUSEADDR on UDP would let two servers share a port


class _TcpServer(socketserver.ThreadingTCPServer):
    rig: DnsServer
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False


class DnsServer:
    """An authoritative DNS server on loopback (UDP and TCP on one port), run from threads."""

    POLL_INTERVAL = 0.025
    BIND_ATTEMPTS = 20

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        zones: Sequence[str] = ("",),
        negative_ttl: int = DEFAULT_NEGATIVE_TTL,
        chase_cnames: bool = True,
        query_log_size: int = 100_000,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port = port
        self.store = ZoneStore(chase_cnames=chase_cnames)
        for apex in zones:
            self.store.add_zone(apex, negative_ttl)
        self.queries: deque[tuple[str, str]] = deque(maxlen=query_log_size)
        self._query_count = 0
        self._count_lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    # --- zone data ---------------------------------------------------------

    def add_zone(self, apex: str, negative_ttl: int = DEFAULT_NEGATIVE_TTL) -> None:
        """Serve `apex` (and everything below it) with this negative-caching TTL."""
        self.store.add_zone(apex, negative_ttl)

    def add_mx(self, domain: str, mxs: Sequence[tuple[int, str]], ttl: int = DEFAULT_TTL) -> None:
        """MX records; `[(0, ".")]` is a null MX (RFC 7505)."""
        for preference, host in mxs:
            self.store.add(domain, QTYPE.MX, MX(host if host.endswith(".") else host + ".", preference), ttl)

    def add_a(self, name: str, *addresses: str, ttl: int = DEFAULT_TTL) -> None:
        for address in addresses:
            self.store.add(name, QTYPE.A, A(address), ttl)

    def add_aaaa(self, name: str, *addresses: str, ttl: int = DEFAULT_TTL) -> None:
        for address in addresses:
            self.store.add(name, QTYPE.AAAA, AAAA(address), ttl)

    def add_cname(self, name: str, target: str, ttl: int = DEFAULT_TTL) -> None:
        self.store.add(name, QTYPE.CNAME, CNAME(target if target.endswith(".") else target + "."), ttl)

    def add_txt(self, name: str, text: str | bytes, ttl: int = DEFAULT_TTL) -> None:
        """One TXT record; values longer than 255 bytes are split into several strings."""
        self.store.add(name, QTYPE.TXT, TXT(split_txt(text)), ttl)

    def add_tlsa(self, name: str, usage: int, selector: int, mtype: int, data: bytes,
                 ttl: int = DEFAULT_TTL) -> None:
        """A TLSA record (RFC 6698), e.g. at _25._tcp.mx.example."""
        self.store.add(name, QTYPE.TLSA, TLSA(usage, selector, mtype, data), ttl)

    def secure(self, name: str, on: bool = True, *, subtree: bool = False) -> None:
        """Answers for `name` (with `subtree`: every name under it) carry the AD flag."""
        key = canonical(name)
        target = self.store.secure_zones if subtree else self.store.secure_names
        with self.store.lock:
            if on:
                target.add(key)
            else:
                target.discard(key)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove `name`'s records of type `rtype` ("MX", "A", ...), or all of them."""
        self.store.remove(name, None if rtype is None else getattr(QTYPE, rtype.upper()))

    def fail(self, name: str, fault: Fault | None, rtype: str | None = None) -> None:
        """Make queries for `name` (of `rtype`, or any type) fail; None restores answers."""
        self.store.set_fault(name, fault, None if rtype is None else getattr(QTYPE, rtype.upper()))

    # --- statistics --------------------------------------------------------

    @property
    def query_count(self) -> int:
        """Queries received (answered or not) since start or the last `reset_counts()`."""
        return self._query_count

    def count(self, name: str, rtype: str | None = None) -> int:
        """Queries received for `name` (and `rtype` if given)."""
        key = canonical(name)
        wanted = None if rtype is None else rtype.upper()
        return sum(1 for n, t in list(self.queries) if n == key and wanted in (None, t))

    def reset_counts(self) -> None:
        with self._count_lock:
            self._query_count = 0
            self.queries.clear()

    # --- I/O -----------------------------------------------------------------

    @property
    def address(self) -> str:
        """'host:port' for DnsConfig.nameservers."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def handle_packet(self, data: bytes, *, udp: bool) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except (DNSError, IndexError, ValueError):
            return None
        if request.questions:
            self._record(canonical(str(request.q.qname)), QTYPE[request.q.qtype])
        reply = answer_query(self.store, request)
        if reply is None:
            return None
        # AD only where the data is marked secure (dnslib's reply() copies the query's bit)
        reply.header.ad = int(bool(
            request.questions and reply.header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN)
            and self.store.is_secure(canonical(str(request.q.qname)))))
        return pack_reply(request, reply, udp=udp)

    def _record(self, name: str, rtype: str) -> None:
        with self._count_lock:
            self._query_count += 1
            self.queries.append((name, rtype))

    def start(self) -> DnsServer:
        if self._servers:
            return self
        udp, tcp = self._bind_pair()
        self.port = udp.server_address[1]
        for server in (udp, tcp):
            server.rig = self
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": self.POLL_INTERVAL},
                name=f"dns-rig-{type(server).__name__}-{self.port}",
                daemon=True,
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def _bind_pair(self) -> tuple[_UdpServer, _TcpServer]:
        """Bind UDP and TCP to the same port (retrying when port 0 picked a TCP-busy one)."""
        family = net.family(self.host)
        udp_cls = type("UdpServer", (_UdpServer,), {"address_family": family})
        tcp_cls = type("TcpServer", (_TcpServer,), {"address_family": family})
        for _ in range(self.BIND_ATTEMPTS):
            udp = udp_cls((self.host, self._requested_port), _UdpHandler)
            try:
                return udp, tcp_cls((self.host, udp.server_address[1]), _TcpHandler)
            except OSError as exc:
                udp.server_close()
                if exc.errno != errno.EADDRINUSE or self._requested_port:
                    raise
        raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {self.host}")

    def stop(self) -> None:
        # shutdown() waits for the serve loop's next poll: wait for both at once.
        stoppers = [threading.Thread(target=server.shutdown) for server in self._servers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(timeout=5)
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bench_domain_names(count: int, suffix: str = "bench.test") -> list[str]:
    return [f"d{i:04d}.{suffix}" for i in range(count)]


def add_bench_domains(
    server: DnsServer,
    count: int = 100,
    *,
    mx_addresses: Sequence[str] = BENCH_MX_HOSTS,
    suffix: str = "bench.test",
    ttl: int = 3600,
) -> dict[str, str]:
    """`count` domains d0000.<suffix>..., each with one MX spread over `mx_addresses`.

    MX host i is mx<i>.<suffix> with the A record mx_addresses[i]; domain n uses
    MX host n % len(mx_addresses). Returns {domain: MX address}.
    """
    hosts = [f"mx{i}.{suffix}" for i in range(len(mx_addresses))]
    for host, address in zip(hosts, mx_addresses, strict=True):
        server.add_a(host, address, ttl=ttl)
    routes: dict[str, str] = {}
    for n, domain in enumerate(bench_domain_names(count, suffix)):
        index = n % len(hosts)
        server.add_mx(domain, [(10, hosts[index])], ttl=ttl)
        routes[domain] = mx_addresses[index]
    return routes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback authoritative DNS for the bench rig")
    parser.add_argument("--listen", default="127.0.0.1:5300", help="host:port (UDP and TCP)")
    parser.add_argument("--bench-domains", type=int, default=100)
    parser.add_argument("--suffix", default="bench.test")
    parser.add_argument("--mx", default=",".join(BENCH_MX_HOSTS), help="MX addresses, comma-separated")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = DnsServer(host.strip("[]"), int(port))
    add_bench_domains(server, args.bench_domains, mx_addresses=args.mx.split(","), suffix=args.suffix)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(f"dns rig listening on {server.address}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
