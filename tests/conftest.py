"""Shared fixtures: a loopback DNS server and sink MX servers (see bench/rig)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.rig.dns import DnsServer
from bench.rig.sinks import AsyncioSink, SinkFaults, SmtpSink


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """An authoritative DNS server on 127.0.0.1 (a free port), empty: every name is NXDOMAIN.

    Point the engine at it with `DnsConfig(nameservers=[dns_server.address])`.
    """
    with DnsServer() as server:
        yield server


@pytest.fixture
def smtp_sink_factory() -> Iterator[Callable[..., SmtpSink]]:
    """Start Postfix smtp-sink instances: `smtp_sink_factory(host="127.0.0.2", **options)`.

    Options are SmtpSink's (hard_reject=["RCPT"], delays={".": 1}, capture=True, ...);
    every sink started is stopped after the test.
    """
    started: list[SmtpSink] = []

    def start(host: str = "127.0.0.2", port: int = 0, **options: Any) -> SmtpSink:
        sink = SmtpSink(host, port, **options)
        started.append(sink)
        return sink.start()

    yield start
    for sink in started:
        sink.stop()


@pytest.fixture
def asyncio_sink_factory() -> Iterator[Callable[..., AsyncioSink]]:
    """Start in-process asyncio sinks (each on its own thread and event loop):
    `asyncio_sink_factory(host="127.0.0.2", faults=SinkFaults(...), record=True)`.
    """
    started: list[AsyncioSink] = []

    def start(host: str = "127.0.0.2", port: int = 0, **options: Any) -> AsyncioSink:
        sink = AsyncioSink(host, port, **options)
        started.append(sink)
        return sink.start()

    yield start
    for sink in started:
        sink.stop()


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """Debian's redis-server on 127.0.0.1 (a free port, append-only file on);
    `redis_server.url` for `[cluster] redis`, `.stop()` / `.start()` to restart it."""
    from bench.rig.redis import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture
def route(dns_server: DnsServer, asyncio_sink_factory: Callable[..., AsyncioSink]) -> Any:
    """route(domain, host, faults) -> a recording sink as the domain's MX (one shared port)."""
    port: list[int] = []

    def add(domain: str, host: str, faults: SinkFaults | None = None) -> AsyncioSink:
        sink = asyncio_sink_factory(host=host, port=port[0] if port else 0, faults=faults,
                                    record=True)
        port[:1] = [sink.port]
        dns_server.add_mx(domain, [(10, f"mx.{domain}")])
        dns_server.add_a(f"mx.{domain}", host)
        return sink

    return add
