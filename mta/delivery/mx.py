"""Where to deliver mail for a domain: MX resolution with dnspython's asynchronous resolver.

`MxResolver.route(domain)` returns a `Route` (MX hosts with their addresses, in the
order to try, at most `max_addresses` addresses in all) or a `RouteError` with an
enhanced status code:

- 5.1.10 permanent: null MX (RFC 7505, the single record `0 .`); never connect.
- 5.1.2  permanent: the domain does not exist (NXDOMAIN), or has neither MX nor address.
- 5.4.4  permanent: no MX host of the domain has an address.
- 5.4.6  permanent: the MX is this engine (own address, loopback or unspecified).
- 4.4.3  temporary: SERVFAIL, timeout, CNAME chain too long: DNS trouble never bounces.

The decisions (ordering, null MX, the loop check, address selection) are plain
functions below; the resolver class does the DNS I/O around them. Answers are cached
for their TTL by dnspython's LRU cache, negative ones too (SOA minimum, capped by
`DnsConfig.negative_ttl_max`). A route made only of answers (no DNS failure on the way)
is kept too, until the first of those answers expires (`RouteCache`): a delivery to a
known destination costs no lookup work at all, and the order among MX hosts of equal
preference is drawn again at each use. A route used in the last tenth of its life is
looked up again in the background, past the answer cache (`prefetch`), so that the
destinations in use never wait for their lookup when their answers expire. Identical
queries in flight at once share one (`MxResolver.lookup`), as routes of one domain do.
A route whose answers expire at once (TTL 0) is not kept; when nothing failed on the way
it says it may serve the connections it opens (`Route.reuse_while_connected`), which the
deliverer does (mta.delivery.deliverer).
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mta.config import DnsConfig, parse_hostport

log = logging.getLogger("mta.delivery.mx")

NULL_MX = "5.1.10"
NO_SUCH_DOMAIN = "5.1.2"
BAD_SYNTAX = "5.1.3"
NO_ROUTE = "5.4.4"
LOOP = "5.4.6"
DNS_TEMPFAIL = "4.4.3"

MAX_MX_HOSTS = 20  # MX hosts whose addresses are looked up, at most
EDNS_PAYLOAD = 1232
MAX_ATTEMPT_TIMEOUT = 2.0  # one query's wait; the config timeout bounds the whole lookup
PREFETCH_SHARE = 0.1  # a route used in this last share of its life is looked up again
MIN_ROUTE_LIFE = 1.0  # a route whose answers expire sooner than this is not kept


# --- results ----------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One MX host (or the domain itself for an implicit MX) and its addresses."""

    name: str
    addresses: tuple[str, ...]
    preference: int = 0


@dataclass(frozen=True)
class Route:
    """Where to deliver: hosts in the order to try, each with its addresses in order."""

    domain: str
    hosts: tuple[Host, ...]
    implicit: bool = False  # no MX records: the domain's own A/AAAA
    secure: bool = False  # the MX answer was authenticated (AD from a validating resolver)
    # answers that expire at once (TTL 0), none failed: not kept by the resolver, but good
    # for the connections they open (mta.delivery.deliverer)
    reuse_while_connected: bool = False

    def targets(self) -> list[tuple[Host, str]]:
        """(host, address) pairs in the order to try them."""
        return [(host, address) for host in self.hosts for address in host.addresses]

    @property
    def addresses(self) -> list[str]:
        return [address for host in self.hosts for address in host.addresses]


@dataclass(frozen=True)
class RouteError:
    """No route: bounce (permanent) or retry later (temporary)."""

    domain: str
    status: str  # enhanced status code, e.g. "5.1.10"
    text: str
    permanent: bool

    @property
    def code(self) -> int:
        """A basic SMTP reply code to go with the status (for DSNs and events)."""
        if not self.permanent:
            return 451
        return 556 if self.status == NULL_MX else 550


def permanent(domain: str, status: str, text: str) -> RouteError:
    return RouteError(domain, status, text, permanent=True)


def temporary(domain: str, text: str) -> RouteError:
    return RouteError(domain, DNS_TEMPFAIL, text, permanent=False)


# --- plain decision functions ----------------------------------------------


def normalize_domain(domain: str) -> str:
    """Lower case, no surrounding spaces, no trailing dot."""
    return domain.strip().rstrip(".").lower()


def address_literal(domain: str) -> str | None:
    """The IP of an address literal ('[192.0.2.1]', '[IPv6:2001:db8::1]'), None if not one.

    Raises ValueError for a bracketed domain that is not a valid address literal.
    """
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        return str(ipaddress.IPv6Address(inner[5:]))
    return str(ipaddress.IPv4Address(inner))


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """RFC 7505: exactly one MX record, whose exchange is the root ('.' or '')."""
    return len(records) == 1 and records[0][1].strip(".") == ""


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """By preference, random among equal ones; root exchanges and repeated hosts dropped."""
    keyed = sorted((pref, rng.random(), normalize_domain(host)) for pref, host in records)
    ordered: list[tuple[int, str]] = []
    seen: set[str] = set()
    for pref, _, host in keyed:
        if host and host not in seen:
            seen.add(host)
            ordered.append((pref, host))
    return ordered


def is_loop_address(address: str, own_addresses: frozenset[str], allow_loopback: bool) -> bool:
    """True if delivering to `address` would mean delivering to ourselves."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if str(ip) in own_addresses:
        return True
    return not allow_loopback and (ip.is_loopback or ip.is_unspecified)


def cut_at_self(
    hosts: Sequence[Host], own_addresses: frozenset[str], allow_loopback: bool
) -> list[Host]:
    """Postfix's rule: drop every MX host as preferred as, or less than, the first one that is us.

    Hosts better than us are still used (we are then a backup MX); if we are the best,
    nothing remains: the mail loops.
    """
    for index, host in enumerate(hosts):
        if any(is_loop_address(a, own_addresses, allow_loopback) for a in host.addresses):
            kept = hosts[:index]
            return [h for h in kept if h.preference < host.preference]
    return list(hosts)


def limit_addresses(hosts: Sequence[Host], max_addresses: int) -> list[Host]:
    """Keep at most `max_addresses` distinct addresses in total, in order; drop empty hosts."""
    seen: set[str] = set()
    limited: list[Host] = []
    for host in hosts:
        room = max_addresses - len(seen)
        if room <= 0:
            break
        fresh = [a for a in dict.fromkeys(host.addresses) if a not in seen][:room]
        if fresh:
            seen.update(fresh)
            limited.append(Host(host.name, tuple(fresh), host.preference))
    return limited


def choose_route(
    domain: str,
    hosts: Sequence[Host],
    *,
    implicit: bool,
    had_tempfail: bool,
    own_addresses: frozenset[str],
    allow_loopback: bool,
    max_addresses: int,
) -> Route | RouteError:
    """The route from resolved hosts (in preference order), or why there is none."""
    usable = [h for h in hosts if h.addresses]
    if not usable:
        if had_tempfail:
            return temporary(domain, f"temporary DNS failure resolving the mail hosts of {domain}")
        if implicit:
            return permanent(domain, NO_SUCH_DOMAIN, f"{domain} has no MX and no address records")
        return permanent(domain, NO_ROUTE, f"no MX host of {domain} has an address")
    kept = cut_at_self(usable, own_addresses, allow_loopback)
    if not kept:
        return permanent(domain, LOOP, f"mail for {domain} loops back to myself")
    return Route(domain, tuple(limit_addresses(kept, max_addresses)), implicit=implicit)


def reshuffle_equal(route: Route, rng: random.Random) -> Route:
    """The route with its hosts of equal preference in a new random order (as `order_mx`
    draws them for each lookup), the preference order kept."""
    hosts = route.hosts
    if len({host.preference for host in hosts}) == len(hosts):
        return route
    shuffled = sorted(hosts, key=lambda host: (host.preference, rng.random()))
    return replace(route, hosts=tuple(shuffled))


@dataclass(frozen=True)
class KeptRoute:
    route: Route
    resolved: float  # when its lookup ended (time.time())
    expires: float  # when the first answer it rests on expires

    def refresh_due(self, now: float) -> bool:
        """In the last `PREFETCH_SHARE` of its life: time to look it up again."""
        return now >= self.expires - PREFETCH_SHARE * (self.expires - self.resolved)


class RouteCache:
    """Routes by domain, each until the first DNS answer it rests on expires; at most
    `max_size` (the expired ones go first, then the oldest)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max(1, max_size)
        self._routes: dict[str, KeptRoute] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def get(self, domain: str, now: float) -> KeptRoute | None:
        kept = self._routes.get(domain)
        if kept is not None and now >= kept.expires:
            del self._routes[domain]
            return None
        return kept

    def put(self, domain: str, route: Route, now: float, expires: float) -> bool:
        """Keep `route` until `expires`; not at all when that is too close (TTL 0):
        False."""
        if expires - now < MIN_ROUTE_LIFE:
            self._routes.pop(domain, None)
            return False
        if domain not in self._routes and len(self._routes) >= self.max_size:
            self._routes = {d: k for d, k in self._routes.items() if k.expires > now}
            while len(self._routes) >= self.max_size:
                del self._routes[next(iter(self._routes))]
        self._routes.pop(domain, None)  # re-inserted: the newest
        self._routes[domain] = KeptRoute(route, now, expires)
        return True


# --- DNS I/O ------------------------------------------------------------------

Outcome = Literal["answer", "nodata", "nxdomain", "tempfail"]


@dataclass(frozen=True)
class Lookup:
    """One lookup's result after following CNAMEs."""

    outcome: Outcome
    records: tuple[Any, ...] = ()
    detail: str = ""
    secure: bool = False  # every answer on the way had the AD flag (DNSSEC-validated)
    expires: float = 0.0  # when the first answer on the way expires (time.time()); 0: unknown


class NegativeCappedCache(dns.resolver.LRUCache):
    """dnspython's LRU answer cache, with negative answers kept at most `negative_ttl_max`."""

    def __init__(self, max_size: int, negative_ttl_max: float) -> None:
        super().__init__(max_size)
        self.negative_ttl_max = negative_ttl_max

    def put(self, key: Any, value: dns.resolver.Answer) -> None:
        if value.rrset is None:  # NODATA or NXDOMAIN
            value.expiration = min(value.expiration, time.time() + self.negative_ttl_max)
        super().put(key, value)


def build_resolver(config: DnsConfig) -> dns.asyncresolver.Resolver:
    """A stub resolver: `config.nameservers` ("host:port") or the system's, with our cache."""
    if config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(*parse_hostport(ns, 53)) for ns in config.nameservers
        ]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.lifetime = config.timeout
    resolver.timeout = min(config.timeout, MAX_ATTEMPT_TIMEOUT)
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    if config.dnssec_validating:  # ask for the AD bit (RFC 6840 5.7): DANE needs it
        resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.cache = NegativeCappedCache(config.cache_size, config.negative_ttl_max)
    return resolver


class MxResolver:
    """Resolves a destination domain to a `Route` or a `RouteError`.

    `own_addresses` are the IPs on which this engine accepts mail at the delivery
    port; an MX resolving to one of them is a loop even when `allow_loopback_mx` is
    set (which only lifts the ban on loopback and unspecified addresses).
    """

    def __init__(
        self,
        dns_config: DnsConfig,
        *,
        allow_loopback_mx: bool = False,
        max_addresses: int = 5,
        own_addresses: Iterable[str] = (),
        rng: random.Random | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        self.config = dns_config
        self.allow_loopback_mx = allow_loopback_mx
        self.max_addresses = max(1, max_addresses)
        self.own_addresses = frozenset(str(ipaddress.ip_address(a)) for a in own_addresses)
        self.rng = rng or random.Random()
        self.resolver = resolver or build_resolver(dns_config)
        self._fresh = uncached(self.resolver)  # prefetching: past the answer cache
        self.routes = RouteCache(dns_config.cache_size)
        self._inflight: dict[str, asyncio.Future[Route | RouteError]] = {}
        self._queries: dict[tuple[dns.name.Name, int, bool], asyncio.Future[Any]] = {}
        self.prefetches = 0

    async def route(self, domain: str) -> Route | RouteError:
        """Where to deliver mail for `domain`: a kept route at once (looked up again in
        the background near its end), else a lookup; concurrent calls share one."""
        key = normalize_domain(domain)
        kept = self.routes.get(key, time.time())
        if kept is None:
            return await asyncio.shield(self._start(key, fresh=False))
        if kept.refresh_due(time.time()) and key not in self._inflight:
            self.prefetches += 1
            self._start(key, fresh=True).add_done_callback(_log_failure)
        return reshuffle_equal(kept.route, self.rng)

    def _start(self, key: str, fresh: bool) -> asyncio.Future[Route | RouteError]:
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._route_and_keep(key, fresh))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        return pending

    async def _route_and_keep(self, domain: str, fresh: bool) -> Route | RouteError:
        result, expires = await self._route(domain, fresh)
        if isinstance(result, Route):
            kept = self.routes.put(domain, result, time.time(), expires)
            if not kept and expires > 0:  # 0: a literal, or a DNS failure on the way
                result = replace(result, reuse_while_connected=True)
        return result

    async def _route(self, domain: str, fresh: bool = False
                     ) -> tuple[Route | RouteError, float]:
        """The route or why there is none, and when the answers it rests on expire (0:
        not to be kept: a literal, or a DNS failure on the way)."""
        try:
            literal = address_literal(domain)
        except ValueError:
            return permanent(domain, BAD_SYNTAX, f"{domain} is not a valid address literal"), 0.0
        if literal is not None:
            return self._choose(domain, [Host(domain, (literal,))], implicit=True), 0.0
        try:
            name = dns.name.from_text(domain)
        except (dns.exception.DNSException, UnicodeError):
            return permanent(domain, BAD_SYNTAX, f"{domain!r} is not a valid domain name"), 0.0
        mx = await self.lookup(name, dns.rdatatype.MX, fresh)
        if mx.outcome == "tempfail":
            return temporary(domain, f"temporary DNS failure looking up MX for {domain}: "
                                     f"{mx.detail}"), 0.0
        if mx.outcome == "nxdomain":
            return permanent(domain, NO_SUCH_DOMAIN,
                             f"domain {domain} does not exist (NXDOMAIN)"), 0.0
        if mx.outcome == "nodata":
            host, failed, expires = await self._resolve_host(name, 0, fresh)
            return self._choose(domain, [host], implicit=True, had_tempfail=failed,
                                secure=mx.secure), min(mx.expires, expires)
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in mx.records]
        if is_null_mx(records):
            return permanent(domain, NULL_MX, f"{domain} does not accept mail (null MX)"), 0.0
        ordered = order_mx(records, self.rng)[:MAX_MX_HOSTS]
        if not ordered:
            return permanent(domain, NULL_MX, f"{domain} does not accept mail (null MX)"), 0.0
        resolved = await asyncio.gather(
            *(self._resolve_host(dns.name.from_text(host), pref, fresh) for pref, host in ordered)
        )
        hosts = [host for host, _, _ in resolved]
        expires = min([mx.expires, *(e for _, _, e in resolved)])
        return self._choose(domain, hosts, implicit=False,
                            had_tempfail=any(f for _, f, _ in resolved),
                            secure=mx.secure), expires

    def _choose(
        self, domain: str, hosts: list[Host], *, implicit: bool, had_tempfail: bool = False,
        secure: bool = False,
    ) -> Route | RouteError:
        route = choose_route(
            domain,
            hosts,
            implicit=implicit,
            had_tempfail=had_tempfail,
            own_addresses=self.own_addresses,
            allow_loopback=self.allow_loopback_mx,
            max_addresses=self.max_addresses,
        )
        if secure and isinstance(route, Route):
            route = Route(route.domain, route.hosts, route.implicit, secure=True)
        return route

    async def _resolve_host(self, name: dns.name.Name, preference: int, fresh: bool = False
                            ) -> tuple[Host, bool, float]:
        """The host's IPv4 then IPv6 addresses, whether a lookup failed temporarily, and
        when the first of the two answers expires."""
        v4, v6 = await asyncio.gather(
            self.lookup(name, dns.rdatatype.A, fresh), self.lookup(name, dns.rdatatype.AAAA, fresh)
        )
        addresses = tuple(r.address for r in v4.records + v6.records)
        failed = "tempfail" in (v4.outcome, v6.outcome)
        host = Host(name.to_text(omit_final_dot=True), addresses, preference)
        return host, failed, min(v4.expires, v6.expires)

    async def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                     fresh: bool = False) -> Lookup:
        """Records of `rdtype` at `name`, following at most `max_cname_depth` CNAMEs
        (`fresh`: asked of the nameservers, whatever the answer cache holds)."""
        return await follow_cnames(lambda n, t: self._query(n, t, fresh), name, rdtype,
                                   self.config.max_cname_depth)

    async def _query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                     fresh: bool = False) -> Any:
        """One query; the same query already in flight is shared, not sent again."""
        key = (name, int(rdtype), fresh)
        pending = self._queries.get(key)
        if pending is None:
            resolver = self._fresh if fresh else self.resolver
            pending = asyncio.ensure_future(
                resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False))
            self._queries[key] = pending
            pending.add_done_callback(lambda _: self._queries.pop(key, None))
        return await asyncio.shield(pending)


def uncached(resolver: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
    """The same resolver (nameservers, timeouts, EDNS, flags) without an answer cache."""
    fresh = copy.copy(resolver)
    fresh.cache = None
    return fresh


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("prefetching a route failed", exc_info=task.exception())


async def follow_cnames(
    query: Callable[[dns.name.Name, dns.rdatatype.RdataType], Awaitable[Any]],
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    max_depth: int,
) -> Lookup:
    """Run `query`, asking again for the CNAME target when an answer stops at a CNAME.

    Hops are counted across the chain, whether one answer holds it all (a recursive
    resolver) or each query adds one link (an authoritative server that does not chase).
    """
    hops = 0
    secure = True
    expires = float("inf")
    for _ in range(max_depth + 1):
        try:
            answer = await query(name, rdtype)
        except dns.resolver.NXDOMAIN:
            return Lookup("nxdomain")
        except dns.exception.DNSException as exc:
            return Lookup("tempfail", detail=str(exc) or type(exc).__name__)
        hops += len(answer.chaining_result.cnames)
        if hops > max_depth:
            return Lookup("tempfail", detail=f"CNAME chain longer than {max_depth} at {name}")
        response = getattr(answer, "response", None)
        secure = secure and response is not None and bool(response.flags & dns.flags.AD)
        expires = min(expires, getattr(answer, "expiration", 0.0))
        if answer.rrset is not None:
            return Lookup("answer", tuple(answer.rrset), secure=secure, expires=expires)
        if answer.canonical_name == name:
            return Lookup("nodata", secure=secure, expires=expires)
        name = answer.canonical_name
    return Lookup("tempfail", detail=f"CNAME chain longer than {max_depth} at {name}")
