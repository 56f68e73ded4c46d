"""MX resolution: the decision functions without sockets, the resolver against loopback DNS.

DNS answers use documentation addresses (192.0.2.0/24, 2001:db8::/32): nothing ever
connects to them, they only flow through the resolver.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import dns.name
import dns.rdatatype
import pytest

from bench.rig.dns import DnsServer
from mta.config import DnsConfig
from mta.delivery.mx import (
    Host,
    MxResolver,
    Route,
    RouteCache,
    RouteError,
    address_literal,
    choose_route,
    cut_at_self,
    is_loop_address,
    is_null_mx,
    limit_addresses,
    order_mx,
    reshuffle_equal,
)

NONE: frozenset[str] = frozenset()


def make_resolver(server: DnsServer, **options: Any) -> MxResolver:
    dns = DnsConfig(
        nameservers=[server.address],
        timeout=options.pop("timeout", 5.0),  # generous: a loaded machine answers late
        max_cname_depth=options.pop("max_cname_depth", 8),
        negative_ttl_max=options.pop("negative_ttl_max", 3600.0),
    )
    options.setdefault("rng", random.Random(7))
    return MxResolver(dns, **options)


def route(resolver: MxResolver, domain: str) -> Route | RouteError:
    return asyncio.run(resolver.route(domain))


def ok(result: Route | RouteError) -> Route:
    assert isinstance(result, Route), result
    return result


def err(result: Route | RouteError) -> RouteError:
    assert isinstance(result, RouteError), result
    return result


# --- plain functions -------------------------------------------------------


class TestNullMx:
    def test_single_root_exchange_is_null(self) -> None:
        assert is_null_mx([(0, ".")])
        assert is_null_mx([(0, "")])

    def test_root_among_others_is_not_null(self) -> None:
        assert not is_null_mx([(0, "."), (10, "mx.example")])
        assert not is_null_mx([(10, "mx.example")])
        assert not is_null_mx([])


class TestOrderMx:
    def test_sorted_by_preference(self) -> None:
        records = [(30, "c.example"), (10, "a.example"), (20, "b.example")]
        assert order_mx(records, random.Random(1)) == [
            (10, "a.example"), (20, "b.example"), (30, "c.example")
        ]

    def test_drops_root_and_repeated_hosts(self) -> None:
        records = [(10, "A.example."), (0, "."), (20, "a.example")]
        assert order_mx(records, random.Random(1)) == [(10, "a.example")]

    def test_equal_preference_is_shuffled_evenly_and_deterministically(self) -> None:
        records = [(10, "a.example"), (10, "b.example"), (10, "c.example"), (20, "z.example")]
        rng = random.Random(42)
        firsts = Counter(order_mx(records, rng)[0][1] for _ in range(600))
        assert set(firsts) == {"a.example", "b.example", "c.example"}
        assert all(150 <= n <= 250 for n in firsts.values()), firsts
        again = random.Random(42)
        replay = Counter(order_mx(records, again)[0][1] for _ in range(600))
        assert replay == firsts
        assert all(order_mx(records, rng)[-1] == (20, "z.example") for _ in range(50))


class TestLoopCheck:
    @pytest.mark.parametrize("address", ["127.0.0.1", "127.9.9.9", "::1", "0.0.0.0", "::",
                                         "::ffff:127.0.0.1"])
    def test_loopback_and_unspecified_are_loops_unless_allowed(self, address: str) -> None:
        assert is_loop_address(address, NONE, allow_loopback=False)
        assert not is_loop_address(address, NONE, allow_loopback=True)

    def test_own_address_is_a_loop_even_when_loopback_is_allowed(self) -> None:
        own = frozenset({"192.0.2.25"})
        assert is_loop_address("192.0.2.25", own, allow_loopback=True)
        assert not is_loop_address("192.0.2.26", own, allow_loopback=False)

    def test_self_as_backup_mx_keeps_only_better_hosts(self) -> None:
        hosts = [Host("primary", ("192.0.2.1",), 10), Host("same", ("192.0.2.2",), 20),
                 Host("self", ("127.0.0.1",), 20), Host("worse", ("192.0.2.3",), 30)]
        kept = cut_at_self(hosts, NONE, allow_loopback=False)
        assert [h.name for h in kept] == ["primary"]

    def test_self_as_best_mx_leaves_nothing(self) -> None:
        hosts = [Host("self", ("192.0.2.9", "0.0.0.0"), 10), Host("other", ("192.0.2.1",), 20)]
        assert cut_at_self(hosts, NONE, allow_loopback=False) == []


class TestLimitAddresses:
    def test_total_is_capped_in_order(self) -> None:
        hosts = [Host("a", ("192.0.2.1", "192.0.2.2", "192.0.2.3"), 10),
                 Host("b", ("192.0.2.4", "192.0.2.5", "192.0.2.6"), 20),
                 Host("c", ("192.0.2.7",), 30)]
        limited = limit_addresses(hosts, 5)
        assert [(h.name, h.addresses) for h in limited] == [
            ("a", ("192.0.2.1", "192.0.2.2", "192.0.2.3")), ("b", ("192.0.2.4", "192.0.2.5"))
        ]

    def test_repeated_addresses_are_tried_once(self) -> None:
        hosts = [Host("a", ("192.0.2.1",), 10), Host("b", ("192.0.2.1", "192.0.2.2"), 20)]
        route_ = Route("d", tuple(limit_addresses(hosts, 5)))
        assert route_.addresses == ["192.0.2.1", "192.0.2.2"]
        assert [(h.name, a) for h, a in route_.targets()] == [("a", "192.0.2.1"), ("b", "192.0.2.2")]


class TestChooseRoute:
    def choose(self, hosts: list[Host], **kw: Any) -> Route | RouteError:
        options: dict[str, Any] = {"implicit": False, "had_tempfail": False,
                                   "own_addresses": NONE, "allow_loopback": False,
                                   "max_addresses": 5}
        options.update(kw)
        return choose_route("d.example", hosts, **options)

    def test_no_address_after_a_temporary_failure_defers(self) -> None:
        result = err(self.choose([Host("mx", ())], had_tempfail=True))
        assert (result.status, result.permanent, result.code) == ("4.4.3", False, 451)

    def test_no_address_anywhere_bounces(self) -> None:
        assert err(self.choose([Host("mx", ())])).status == "5.4.4"
        implicit = err(self.choose([Host("d.example", ())], implicit=True))
        assert (implicit.status, implicit.permanent) == ("5.1.2", True)

    def test_loop_bounces_with_5_4_6(self) -> None:
        result = err(self.choose([Host("mx", ("127.0.0.1",))]))
        assert (result.status, result.permanent) == ("5.4.6", True)
        assert result.text == "mail for d.example loops back to myself"

    def test_hosts_without_addresses_are_skipped(self) -> None:
        result = ok(self.choose([Host("gone", ()), Host("mx", ("192.0.2.1",), 20)]))
        assert result.addresses == ["192.0.2.1"]


class TestAddressLiteral:
    def test_literals(self) -> None:
        assert address_literal("[192.0.2.1]") == "192.0.2.1"
        assert address_literal("[IPv6:2001:DB8::1]") == "2001:db8::1"
        assert address_literal("example.com") is None

    @pytest.mark.parametrize("bad", ["[300.1.1.1]", "[example.com]", "[2001:db8::1]"])
    def test_bad_literals_raise(self, bad: str) -> None:
        with pytest.raises(ValueError):
            address_literal(bad)


# --- against the loopback DNS server --------------------------------------


class TestResolution:
    def test_mx_by_preference_with_addresses(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(20, "mx2.d.test"), (10, "mx1.d.test")])
        dns_server.add_a("mx1.d.test", "192.0.2.1")
        dns_server.add_aaaa("mx1.d.test", "2001:db8::1")
        dns_server.add_a("mx2.d.test", "192.0.2.2")
        result = ok(route(make_resolver(dns_server), "D.test."))
        assert [(h.name, h.preference, h.addresses) for h in result.hosts] == [
            ("mx1.d.test", 10, ("192.0.2.1", "2001:db8::1")), ("mx2.d.test", 20, ("192.0.2.2",))
        ]
        assert not result.implicit

    def test_equal_preference_order_varies_but_is_reproducible(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "a.d.test"), (10, "b.d.test")])
        dns_server.add_a("a.d.test", "192.0.2.1")
        dns_server.add_a("b.d.test", "192.0.2.2")

        async def firsts(seed: int) -> list[str]:
            resolver = make_resolver(dns_server, rng=random.Random(seed))
            return [ok(await resolver.route("d.test")).hosts[0].name for _ in range(100)]

        first = asyncio.run(firsts(3))
        assert 30 <= first.count("a.d.test") <= 70
        assert asyncio.run(firsts(3)) == first

    def test_implicit_mx_uses_the_domains_addresses(self, dns_server: DnsServer) -> None:
        dns_server.add_a("plain.test", "192.0.2.7")
        dns_server.add_aaaa("plain.test", "2001:db8::7")
        result = ok(route(make_resolver(dns_server), "plain.test"))
        assert result.implicit
        assert result.hosts == (Host("plain.test", ("192.0.2.7", "2001:db8::7"), 0),)

    def test_no_mx_and_no_address_bounces(self, dns_server: DnsServer) -> None:
        dns_server.add_txt("bare.test", "v=spf1 -all")
        result = err(route(make_resolver(dns_server), "bare.test"))
        assert (result.status, result.permanent) == ("5.1.2", True)

    def test_null_mx_bounces_without_address_lookups(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("null.test", [(0, ".")])
        dns_server.add_a("null.test", "192.0.2.9")
        result = err(route(make_resolver(dns_server), "null.test"))
        assert (result.status, result.permanent, result.code) == ("5.1.10", True, 556)
        assert "null MX" in result.text
        assert dns_server.queries and list(dns_server.queries) == [("null.test", "MX")]

    def test_nxdomain_bounces(self, dns_server: DnsServer) -> None:
        result = err(route(make_resolver(dns_server), "nowhere.test"))
        assert (result.status, result.permanent) == ("5.1.2", True)

    def test_mx_host_without_address_is_skipped(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "gone.d.test"), (20, "mx.d.test")])
        dns_server.add_a("mx.d.test", "192.0.2.2")
        assert ok(route(make_resolver(dns_server), "d.test")).addresses == ["192.0.2.2"]

    def test_address_literal_routes_without_dns(self, dns_server: DnsServer) -> None:
        result = ok(route(make_resolver(dns_server), "[192.0.2.5]"))
        assert result.addresses == ["192.0.2.5"]
        assert dns_server.query_count == 0

    def test_max_addresses_in_order(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "a.d.test"), (20, "b.d.test")])
        dns_server.add_a("a.d.test", "192.0.2.1", "192.0.2.2", "192.0.2.3")
        dns_server.add_a("b.d.test", "192.0.2.4", "192.0.2.5", "192.0.2.6")
        result = ok(route(make_resolver(dns_server, max_addresses=4), "d.test"))
        assert len(result.addresses) == 4
        assert result.addresses[3] in {"192.0.2.4", "192.0.2.5", "192.0.2.6"}
        assert set(result.addresses[:3]) == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}

    def test_concurrent_routes_share_one_lookup(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "mx.d.test")])
        dns_server.add_a("mx.d.test", "192.0.2.1")
        resolver = make_resolver(dns_server)

        async def many() -> list[Route | RouteError]:
            return await asyncio.gather(*(resolver.route("d.test") for _ in range(20)))

        results = asyncio.run(many())
        assert all(ok(r).addresses == ["192.0.2.1"] for r in results)
        assert dns_server.count("d.test", "MX") == 1


class TestDnsFailures:
    def test_servfail_defers_and_is_not_cached(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "mx.d.test")])
        dns_server.add_a("mx.d.test", "192.0.2.1")
        dns_server.fail("d.test", "servfail")
        resolver = make_resolver(dns_server)
        result = err(route(resolver, "d.test"))
        assert (result.status, result.permanent) == ("4.4.3", False)
        dns_server.fail("d.test", None)
        assert ok(route(resolver, "d.test")).addresses == ["192.0.2.1"]

    def test_timeout_defers(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "mx.d.test")])
        dns_server.fail("d.test", "timeout")
        result = err(route(make_resolver(dns_server, timeout=0.3), "d.test"))
        assert (result.status, result.permanent) == ("4.4.3", False)
        assert dns_server.count("d.test", "MX") >= 1

    def test_failing_host_lookup_falls_back_to_other_mx(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "bad.d.test"), (20, "good.d.test")])
        dns_server.add_a("bad.d.test", "192.0.2.1")
        dns_server.add_a("good.d.test", "192.0.2.2")
        dns_server.fail("bad.d.test", "servfail")
        assert ok(route(make_resolver(dns_server), "d.test")).addresses == ["192.0.2.2"]

    def test_all_host_lookups_failing_defers(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "bad.d.test")])
        dns_server.add_a("bad.d.test", "192.0.2.1")
        dns_server.fail("bad.d.test", "servfail", rtype="A")
        dns_server.fail("bad.d.test", "servfail", rtype="AAAA")
        result = err(route(make_resolver(dns_server), "d.test"))
        assert (result.status, result.permanent) == ("4.4.3", False)


class TestCnames:
    def chain(self, server: DnsServer, links: int) -> None:
        """alias0.test -> alias1.test -> ... -> real.test (MX)."""
        names = [f"alias{i}.test" for i in range(links)] + ["real.test"]
        for name, target in zip(names, names[1:], strict=False):
            server.add_cname(name, target)
        server.add_mx("real.test", [(10, "mx.real.test")])
        server.add_a("mx.real.test", "192.0.2.3")

    @pytest.mark.parametrize("chase", [True, False], ids=["one-answer", "query-per-link"])
    def test_chain_within_limit_is_followed(self, chase: bool) -> None:
        with DnsServer(chase_cnames=chase) as server:
            self.chain(server, 3)
            result = ok(route(make_resolver(server, max_cname_depth=3), "alias0.test"))
        assert result.addresses == ["192.0.2.3"]

    @pytest.mark.parametrize("chase", [True, False], ids=["one-answer", "query-per-link"])
    def test_chain_past_limit_defers(self, chase: bool) -> None:
        with DnsServer(chase_cnames=chase) as server:
            self.chain(server, 3)
            result = err(route(make_resolver(server, max_cname_depth=2), "alias0.test"))
        assert (result.status, result.permanent) == ("4.4.3", False)
        assert "CNAME" in result.text

    def test_cname_loop_defers(self, dns_server: DnsServer) -> None:
        dns_server.add_cname("a.test", "b.test")
        dns_server.add_cname("b.test", "a.test")
        result = err(route(make_resolver(dns_server), "a.test"))
        assert not result.permanent

    def test_mx_host_behind_cname(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "mx.d.test")])
        dns_server.add_cname("mx.d.test", "real-mx.d.test")
        dns_server.add_a("real-mx.d.test", "192.0.2.4")
        assert ok(route(make_resolver(dns_server), "d.test")).addresses == ["192.0.2.4"]


class TestCache:
    def test_positive_answers_are_cached_for_their_ttl(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "mx.d.test")], ttl=1)
        dns_server.add_a("mx.d.test", "192.0.2.1", ttl=1)
        resolver = make_resolver(dns_server)
        ok(route(resolver, "d.test"))
        after_first = dns_server.query_count
        ok(route(resolver, "d.test"))
        assert dns_server.query_count == after_first
        time.sleep(1.1)
        ok(route(resolver, "d.test"))
        assert dns_server.count("d.test", "MX") == 2

    def test_nxdomain_is_cached(self, dns_server: DnsServer) -> None:
        resolver = make_resolver(dns_server)
        for _ in range(3):
            assert err(route(resolver, "nowhere.test")).status == "5.1.2"
        assert dns_server.query_count == 1

    def test_nodata_is_cached(self, dns_server: DnsServer) -> None:
        dns_server.add_a("plain.test", "192.0.2.7")
        resolver = make_resolver(dns_server)
        ok(route(resolver, "plain.test"))
        ok(route(resolver, "plain.test"))
        assert dns_server.count("plain.test", "MX") == 1
        assert dns_server.count("plain.test", "AAAA") == 1

    def test_negative_ttl_is_capped(self) -> None:
        with DnsServer(negative_ttl=3600) as server:
            resolver = make_resolver(server, negative_ttl_max=0.3)
            route(resolver, "nowhere.test")
            route(resolver, "nowhere.test")
            assert server.query_count == 1
            time.sleep(0.4)
            route(resolver, "nowhere.test")
            assert server.query_count == 2

    def test_cache_is_bounded(self, dns_server: DnsServer) -> None:
        resolver = MxResolver(DnsConfig(nameservers=[dns_server.address], cache_size=2))
        for name in ("a.test", "b.test", "c.test", "a.test"):
            route(resolver, name)
        assert dns_server.count("a.test") == 2  # evicted by b and c, then asked again


class TestLoopRoutes:
    def test_loopback_mx_is_a_loop(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "mx.d.test")])
        dns_server.add_a("mx.d.test", "127.0.0.1")
        result = err(route(make_resolver(dns_server), "d.test"))
        assert (result.status, result.permanent) == ("5.4.6", True)
        assert result.text == "mail for d.test loops back to myself"

    def test_loopback_allowed_for_tests(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "mx.d.test")])
        dns_server.add_a("mx.d.test", "127.0.0.2")
        result = ok(route(make_resolver(dns_server, allow_loopback_mx=True), "d.test"))
        assert result.addresses == ["127.0.0.2"]

    def test_own_listener_address_is_a_loop_even_if_loopback_allowed(
        self, dns_server: DnsServer
    ) -> None:
        dns_server.add_mx("d.test", [(10, "mx.d.test")])
        dns_server.add_a("mx.d.test", "127.0.0.2")
        resolver = make_resolver(dns_server, allow_loopback_mx=True, own_addresses={"127.0.0.2"})
        assert err(route(resolver, "d.test")).status == "5.4.6"

    def test_unspecified_implicit_mx_is_a_loop(self, dns_server: DnsServer) -> None:
        dns_server.add_a("zero.test", "0.0.0.0")
        assert err(route(make_resolver(dns_server), "zero.test")).status == "5.4.6"

    def test_loopback_address_literal_is_a_loop(self, dns_server: DnsServer) -> None:
        assert err(route(make_resolver(dns_server), "[127.0.0.1]")).status == "5.4.6"

    def test_backup_mx_delivers_to_the_better_host(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "primary.d.test"), (20, "me.d.test")])
        dns_server.add_a("primary.d.test", "192.0.2.1")
        dns_server.add_a("me.d.test", "192.0.2.25")
        resolver = make_resolver(dns_server, own_addresses={"192.0.2.25"})
        assert ok(route(resolver, "d.test")).addresses == ["192.0.2.1"]


class TestKeptRoutes:
    """Routes kept for their answers' TTL, looked up again near their end (issue 21)."""

    def serve(self, server: DnsServer, ttl: int) -> None:
        server.add_mx("d.test", [(10, "mx.d.test")], ttl=ttl)
        server.add_a("mx.d.test", "192.0.2.1", ttl=ttl)

    def test_route_is_kept_for_its_ttl(self, dns_server: DnsServer) -> None:
        self.serve(dns_server, 300)
        resolver = make_resolver(dns_server)

        async def twice() -> tuple[Route | RouteError, Route | RouteError, int]:
            first = await resolver.route("d.test")
            asked = dns_server.query_count
            return first, await resolver.route("D.test."), asked

        first, second, asked = asyncio.run(twice())
        assert ok(first).addresses == ok(second).addresses == ["192.0.2.1"]
        assert dns_server.query_count == asked  # the second one asked nothing
        assert len(resolver.routes) == 1

    def test_ttl_zero_is_looked_up_every_time(self, dns_server: DnsServer) -> None:
        self.serve(dns_server, 0)
        resolver = make_resolver(dns_server)
        for _ in range(3):
            assert ok(route(resolver, "d.test")).addresses == ["192.0.2.1"]
        assert dns_server.count("d.test", "MX") == 3
        assert len(resolver.routes) == 0

    def test_route_with_a_failed_host_lookup_is_not_kept(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "bad.d.test"), (20, "good.d.test")])
        dns_server.add_a("bad.d.test", "192.0.2.1")
        dns_server.add_a("good.d.test", "192.0.2.2")
        dns_server.fail("bad.d.test", "servfail")
        resolver = make_resolver(dns_server)
        assert ok(route(resolver, "d.test")).addresses == ["192.0.2.2"]
        dns_server.fail("bad.d.test", None)
        assert ok(route(resolver, "d.test")).addresses == ["192.0.2.1", "192.0.2.2"]

    def test_route_near_its_end_is_prefetched_past_the_cache(self, dns_server: DnsServer
                                                              ) -> None:
        self.serve(dns_server, 300)
        resolver = make_resolver(dns_server)

        async def run() -> tuple[Route | RouteError, float]:
            first = ok(await resolver.route("d.test"))
            now = time.time()  # pretend it was resolved 290 s ago: 10 s of 300 left
            resolver.routes.put("d.test", first, now - 290, now + 10)
            kept = await resolver.route("d.test")  # at once, from what is kept
            deadline = time.monotonic() + 10
            while resolver._inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            entry = resolver.routes.get("d.test", time.time())
            assert entry is not None
            return kept, entry.expires - time.time()

        kept, life = asyncio.run(run())
        assert ok(kept).addresses == ["192.0.2.1"]
        assert dns_server.count("d.test", "MX") == 2  # asked again despite the answer cache
        assert life > 250  # the kept route now rests on the new answers
        assert resolver.prefetches == 1

    def test_equal_preference_hosts_are_drawn_again_at_each_use(self) -> None:
        hosts = (Host("a", ("192.0.2.1",), 10), Host("b", ("192.0.2.2",), 10),
                 Host("z", ("192.0.2.9",), 20))
        kept = Route("d.test", hosts)
        rng = random.Random(3)
        firsts = Counter(reshuffle_equal(kept, rng).hosts[0].name for _ in range(200))
        assert set(firsts) == {"a", "b"}
        assert all(reshuffle_equal(kept, rng).hosts[-1].name == "z" for _ in range(20))
        single = Route("d.test", hosts[:1])
        assert reshuffle_equal(single, rng) is single

    def test_route_cache_is_bounded_and_drops_short_lives(self) -> None:
        cache = RouteCache(2)
        kept = Route("d.test", (Host("a", ("192.0.2.1",), 10),))
        cache.put("a.test", kept, 100.0, 400.0)
        cache.put("b.test", kept, 100.0, 100.5)  # TTL under a second: not kept
        cache.put("c.test", kept, 100.0, 400.0)
        cache.put("d.test", kept, 100.0, 400.0)  # the oldest goes
        assert cache.get("a.test", 101.0) is None and cache.get("b.test", 101.0) is None
        assert cache.get("c.test", 101.0) is not None
        assert cache.get("c.test", 400.0) is None  # expired

    def test_identical_queries_in_flight_share_one(self, dns_server: DnsServer) -> None:
        dns_server.add_a("mx.shared.test", "192.0.2.7", ttl=0)
        resolver = make_resolver(dns_server)
        name = dns.name.from_text("mx.shared.test")

        async def many() -> list[Any]:
            return await asyncio.gather(*(resolver.lookup(name, dns.rdatatype.A)
                                          for _ in range(10)))

        found = asyncio.run(many())
        assert all([r.address for r in f.records] == ["192.0.2.7"] for f in found)
        assert dns_server.count("mx.shared.test", "A") == 1


def test_only_a_complete_route_with_ttl_0_serves_the_connections_it_opens(
        dns_server: DnsServer) -> None:
    """Answers with TTL 0 and nothing failed: the route says it may serve the connections
    it opens (the deliverer keeps it for them); answers with a TTL are the resolver's to
    keep, and a route with a failed lookup on the way is looked up again each time."""
    dns_server.add_mx("zero.test", [(10, "mx.zero.test")], ttl=0)
    dns_server.add_a("mx.zero.test", "192.0.2.1", ttl=0)
    dns_server.add_mx("kept.test", [(10, "mx.kept.test")], ttl=300)
    dns_server.add_a("mx.kept.test", "192.0.2.2", ttl=300)
    dns_server.add_mx("part.test", [(10, "bad.part.test"), (20, "mx.zero.test")], ttl=0)
    dns_server.fail("bad.part.test", "servfail")
    resolver = make_resolver(dns_server)
    assert ok(route(resolver, "zero.test")).reuse_while_connected
    assert not ok(route(resolver, "kept.test")).reuse_while_connected
    partial = ok(route(resolver, "part.test"))
    assert partial.addresses == ["192.0.2.1"] and not partial.reuse_while_connected
    assert not ok(route(resolver, "[192.0.2.3]")).reuse_while_connected
