"""The AMQP event sink (mta.outbox.amqp) against a real, private RabbitMQ on loopback.

- units without a broker: routing keys, message properties, filters, the URL's password
  never shown, the [[amqp]] config checks;
- with the broker (tests/helpers/rabbitmq.py): a batch is published persistent and
  confirmed, and a bound queue holds every event in order; a broker that is down, or that
  accepts TCP and never answers, gives SinkFailed within the timeout, not a hang; an event
  no queue is bound for is refused with `mandatory`; a broker restarted (or killed -9) in
  the middle of a stream of batches: after reconnection every event is in the queue,
  duplicates allowed and counted; amqps with a CA of `ca_file`;
- the engine with a sink MX and [[amqp]]: the broker stopped mid-run, delivery goes on,
  and after its start every Delivery event of the event log is in the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import smtplib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import trustme

from bench.engine_proc import read_events
from mta.config import AmqpConfig, ConfigError, load_config
from mta.outbox.amqp import AmqpSink, message_for, routing_key
from mta.outbox.sink import SinkFailed
from mta.text import without_password as shown_url
from tests.helpers.engine import start_engine, wait_until
from tests.helpers.rabbitmq import RabbitMqServer

# --- units ------------------------------------------------------------------------------


def event(n: int, type_: str = "Delivery", account: str = "shop") -> dict[str, Any]:
    return {"id": f"ev-{n:06d}", "schema": 1, "type": type_, "account": account,
            "campaign": "spring", "to": f"user{n}@example.com", "time": 1_790_000_000.5 + n}


def test_routing_key_template_fills_type_and_account_as_single_words() -> None:
    assert routing_key("mta.{type}", event(1)) == "mta.Delivery"
    assert routing_key("{account}.{type}", event(1, account="a.b*c")) == "a_b_c.Delivery"
    assert routing_key("mta.{type}.{account}", {"id": "x", "type": "ThrottleChange"}) == \
        "mta.ThrottleChange._"


def test_message_is_persistent_json_with_the_event_id() -> None:
    message = message_for(event(7, "Bounce"))
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == "ev-000007"
    assert message.content_type == "application/json"
    assert message.type == "Bounce"
    assert message.headers == {"type": "Bounce", "account": "shop"}
    assert message.timestamp is not None and int(message.timestamp.timestamp()) == 1_790_000_007
    assert json.loads(message.body) == event(7, "Bounce")


def test_filters_by_type_and_account() -> None:
    sink = AmqpSink(AmqpConfig(name="app", url="amqp://127.0.0.1/",
                               events=["Bounce", "Complaint"], accounts=["shop"]))
    assert sink.wants(event(1, "Bounce"))
    assert not sink.wants(event(1, "Delivery"))
    assert not sink.wants(event(1, "Bounce", account="other"))
    everything = AmqpSink(AmqpConfig(name="all", url="amqp://127.0.0.1/"))
    assert everything.wants(event(1, "Delivery", account="any"))


def test_password_is_never_shown() -> None:
    url = "amqp://mta:s3cr%40t-pw@broker.example:5671/prod"
    assert shown_url(url) == "amqp://mta:***@broker.example:5671/prod"
    assert shown_url("amqp://127.0.0.1/") == "amqp://127.0.0.1/"
    assert "s3cr" not in AmqpSink(AmqpConfig(name="x", url=url)).where


def write_config(tmp_path: Path, amqp: str) -> Path:
    path = tmp_path / "mta.toml"
    path.write_text(amqp)
    return path


@pytest.mark.parametrize(("table", "message"), [
    ('url = "http://u:topsecret@h/"', "must be amqp://"),
    ('url = "amqp://u:topsecret@/"', "must be amqp://"),
    ('url = "amqp://u:topsecret@h:99999/"', "must be amqp://"),
    ('url = "amqp://h/"\nexchange_type = "fan"', "direct, fanout, topic or headers"),
    ('url = "amqp://h/"\nrouting_key = "mta.{campaign}"', "only {type} and {account}"),
    ('url = "amqp://h/"\nrouting_key = "mta.{type!r}"', "only {type} and {account}"),
    ('url = "amqp://h/"\nexchange = "bad name"', "not an exchange name"),
    ('url = "amqp://h/"\nbatch_size = 0', "within 1-10000"),
    ('url = "amqp://h/"\ntimeout = 0', "positive"),
    ('url = "amqp://h/"\nevents = ["Delivery", "no-such type"]', "not an event type"),
    ('url = "amqp://h/"\nexchange = ""', "cannot be declared"),
])
def test_bad_amqp_config_is_one_line_without_the_password(
        tmp_path: Path, table: str, message: str) -> None:
    path = write_config(tmp_path, f'[[amqp]]\nname = "app"\n{table}\n')
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert "topsecret" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_amqp_names_are_unique(tmp_path: Path) -> None:
    table = '[[amqp]]\nname = "app"\nurl = "amqp://127.0.0.1/"\n'
    with pytest.raises(ConfigError, match="defined twice"):
        load_config(write_config(tmp_path, table + table))


def test_amqp_config_loads(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, (
        '[[amqp]]\nname = "app"\nurl = "amqps://mta:pw@rabbit.example:5671/mta"\n'
        'exchange = "mta.events"\nexchange_type = "direct"\nrouting_key = "{account}.{type}"\n'
        'events = ["Bounce"]\naccounts = ["shop"]\nbatch_size = 500\nbatch_wait = 0.2\n')))
    (amqp,) = cfg.amqp
    assert (amqp.name, amqp.exchange_type, amqp.batch_size, amqp.mandatory) == \
        ("app", "direct", 500, True)


# --- against a real broker --------------------------------------------------------------

@pytest.fixture(scope="module")
def broker() -> Iterator[RabbitMqServer]:
    with RabbitMqServer() as server:
        yield server


class Queue:
    """A durable queue bound to the sink's exchange: what a consuming app would read."""

    def __init__(self, url: str, exchange: str, binding: str = "#",
                 exchange_type: str = "topic") -> None:
        self.url, self.exchange, self.binding = url, exchange, binding
        self.exchange_type = exchange_type
        self.name = f"q-{exchange}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", binding)

    async def declare(self) -> Queue:
        async with await aio_pika.connect(self.url, timeout=30) as connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType(self.exchange_type), durable=True)
            queue = await channel.declare_queue(self.name, durable=True)
            await queue.bind(exchange, self.binding)
        return self

    async def drain(self, limit: int = 100_000) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Every message in the queue, in queue order (acknowledged: taken out)."""
        messages = []
        async with await aio_pika.connect(self.url, timeout=30) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(self.name, durable=True)
            for _ in range(limit):
                message = await queue.get(no_ack=True, fail=False, timeout=10)
                if message is None:
                    break
                messages.append(message)
        return messages


def sink_for(url: str, exchange: str, **settings: Any) -> AmqpSink:
    settings.setdefault("timeout", 10.0)
    return AmqpSink(AmqpConfig(name="app", url=url, exchange=exchange, **settings))


def test_batch_is_confirmed_persistent_and_in_order(broker: RabbitMqServer) -> None:
    async def run() -> list[Any]:
        queue = await Queue(broker.url, "ex-order", "mta.#").declare()
        sink = sink_for(broker.url, "ex-order", batch_size=100)
        try:
            for start in range(0, 250, 100):
                await sink.deliver([event(n) for n in range(start, min(start + 100, 250))])
        finally:
            await sink.close()
        assert sink.connects == 1  # one connection for every batch
        return await queue.drain()

    messages = asyncio.run(run())
    assert [m.message_id for m in messages] == [f"ev-{n:06d}" for n in range(250)]
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in messages)
    assert {m.routing_key for m in messages} == {"mta.Delivery"}
    assert json.loads(messages[42].body) == event(42)


def test_routing_key_template_routes_by_type_and_account(broker: RabbitMqServer) -> None:
    async def run() -> tuple[list[Any], list[Any]]:
        bounces = await Queue(broker.url, "ex-route", "bounce.*.Bounce").declare()
        shop = await Queue(broker.url, "ex-route", "bounce.shop.*").declare()
        sink = sink_for(broker.url, "ex-route", routing_key="bounce.{account}.{type}")
        try:
            await sink.deliver([event(1, "Bounce", "shop"), event(2, "Bounce", "news"),
                                event(3, "Complaint", "shop")])
        finally:
            await sink.close()
        return await bounces.drain(), await shop.drain()

    bounces, shop = asyncio.run(run())
    assert [m.message_id for m in bounces] == ["ev-000001", "ev-000002"]
    assert [m.message_id for m in shop] == ["ev-000001", "ev-000003"]


def test_unroutable_event_is_refused_with_mandatory(broker: RabbitMqServer) -> None:
    """No queue bound for Delivery: with `mandatory` (the default) the batch fails (the
    outbox keeps it) instead of the broker dropping it; without, it is confirmed."""

    async def run() -> None:
        queue = await Queue(broker.url, "ex-mandatory", "mta.Bounce").declare()
        sink = sink_for(broker.url, "ex-mandatory")
        try:
            with pytest.raises(SinkFailed, match="NO_ROUTE|PublishError"):
                await sink.deliver([event(1, "Bounce"), event(2, "Delivery")])
            dropping = sink_for(broker.url, "ex-mandatory", mandatory=False)
            await dropping.deliver([event(3, "Delivery")])
            await dropping.close()
            await sink.deliver([event(4, "Bounce")])  # the sink works again after a failure
        finally:
            await sink.close()
        assert [m.message_id for m in await queue.drain()] == ["ev-000001", "ev-000004"]

    asyncio.run(run())


def test_missing_exchange_fails_when_not_declared(broker: RabbitMqServer) -> None:
    async def run() -> None:
        sink = sink_for(broker.url, "ex-nobody-made", declare_exchange=False)
        with pytest.raises(SinkFailed, match="NOT_FOUND"):
            await sink.deliver([event(1)])
        await sink.close()

    asyncio.run(run())


def test_wrong_password_fails_without_showing_it(
        broker: RabbitMqServer, caplog: pytest.LogCaptureFixture) -> None:
    url = f"amqp://guest:wr0ng-s3cret@127.0.0.1:{broker.port}/"

    async def run() -> str:
        sink = sink_for(url, "ex-auth")
        with pytest.raises(SinkFailed) as caught:
            await sink.deliver([event(1)])
        await sink.close()
        return str(caught.value)

    with caplog.at_level(logging.DEBUG):
        reason = asyncio.run(run())
    assert "guest:***@127.0.0.1" in reason
    assert "wr0ng-s3cret" not in reason + caplog.text


def test_broker_down_is_sink_failed_not_a_hang() -> None:
    """Nothing listening: refused at once. A peer that accepts TCP and never answers
    (a hung broker): SinkFailed once `timeout` has passed, not later."""
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        refused_url = f"amqp://guest:guest@127.0.0.1:{closed_port.getsockname()[1]}/"
    mute = socket.create_server(("127.0.0.1", 0))
    mute_url = f"amqp://guest:guest@127.0.0.1:{mute.getsockname()[1]}/"

    async def attempt(url: str) -> float:
        sink = sink_for(url, "ex-down", timeout=1.0)
        started = time.monotonic()
        with pytest.raises(SinkFailed):
            await sink.deliver([event(1)])
        await sink.close()
        return time.monotonic() - started

    try:
        assert asyncio.run(attempt(refused_url)) < 1.5
        assert 0.9 < asyncio.run(attempt(mute_url)) < 4.0
    finally:
        mute.close()


def test_broker_that_stops_confirming_is_sink_failed_then_recovers(
        broker: RabbitMqServer) -> None:
    """The connection is open and the broker hangs (SIGSTOP): the batch fails once
    `timeout` has passed; once it answers again the next batch goes on a new connection."""

    async def run() -> tuple[float, int]:
        queue = await Queue(broker.url, "ex-hang").declare()
        sink = sink_for(broker.url, "ex-hang", timeout=1.5)
        try:
            await sink.deliver([event(1)])
            broker.pause()
            try:
                started = time.monotonic()
                with pytest.raises(SinkFailed, match="no answer or confirm within 1.5 s"):
                    await sink.deliver([event(2)])
                took = time.monotonic() - started
            finally:
                broker.resume()
            deadline = time.monotonic() + 60
            while True:  # the broker catches up after SIGCONT
                try:
                    await sink.deliver([event(2), event(3)])
                    break
                except SinkFailed:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.5)
        finally:
            await sink.close()
        ids = [m.message_id for m in await queue.drain()]
        assert set(ids) == {"ev-000001", "ev-000002", "ev-000003"}
        return took, sink.connects

    took, connects = asyncio.run(run())
    assert 1.4 < took < 3.5
    assert connects >= 2


async def stream_with_retries(sink: AmqpSink, total: int, batch: int,
                              after_batch: threading.Event, trigger_at: int,
                              deadline: float) -> int:
    """Deliver events 0..total-1 in batches like the outbox dispatcher: a batch that
    failed is delivered again (same events, same ids) until it is confirmed. Returns the
    number of failed attempts."""
    failures = 0
    for number, start in enumerate(range(0, total, batch)):
        events = [event(n) for n in range(start, min(start + batch, total))]
        while True:
            assert time.monotonic() < deadline, f"batch {number} never confirmed"
            try:
                await sink.deliver(events)
                break
            except SinkFailed:
                failures += 1
                await asyncio.sleep(0.1)
        if number == trigger_at:
            after_batch.set()
        await asyncio.sleep(0.05)  # a steady stream, so the restart falls in its middle
    return failures


@pytest.mark.parametrize("how", ["restart", "kill -9"])
def test_broker_restart_mid_stream_loses_no_event(broker: RabbitMqServer, how: str) -> None:
    total, batch = 3000, 50
    exchange = f"ex-restart-{how.split()[0]}"
    asyncio.run(Queue(broker.url, exchange).declare())
    trigger = threading.Event()
    restarted = threading.Event()

    def restart_broker() -> None:
        if trigger.wait(timeout=120):
            broker.kill() if how == "kill -9" else broker.stop()
            broker.start()
            restarted.set()

    restarter = threading.Thread(target=restart_broker)
    restarter.start()

    async def run() -> tuple[int, int]:
        sink = sink_for(broker.url, exchange, timeout=5.0)
        try:
            failures = await stream_with_retries(sink, total, batch, trigger, trigger_at=5,
                                                 deadline=time.monotonic() + 240)
        finally:
            await sink.close()
        return failures, sink.connects

    try:
        failures, connects = asyncio.run(run())
    finally:
        trigger.set()
        restarter.join(timeout=240)
    assert restarted.is_set()
    messages = asyncio.run(Queue(broker.url, exchange).drain())
    ids = Counter(m.message_id for m in messages)
    duplicates = sum(ids.values()) - len(ids)
    print(f"{how}: {total} events, {failures} failed attempts, {connects} connections, "
          f"{len(messages)} messages in the queue, {duplicates} duplicates")
    assert set(ids) == {f"ev-{n:06d}" for n in range(total)}  # nothing lost
    assert failures >= 1 and connects >= 2  # the restart did fall in the stream
    assert duplicates <= batch * failures  # only unconfirmed batches came again


# --- the engine: outbox, dispatcher and AMQP sink together -------------------------------

class Collected:
    """Messages read from a queue so far, over several drains."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.ids: Counter[str] = Counter()
        self.bodies: dict[str, dict[str, Any]] = {}

    def poll(self) -> Counter[str]:
        for message in asyncio.run(self.queue.drain()):
            body = json.loads(message.body)
            assert message.message_id == body["id"]
            self.ids[body["id"]] += 1
            self.bodies[body["id"]] = body
        return self.ids


def submit(engine: Any, recipients: list[str]) -> None:
    with smtplib.SMTP(engine.host, engine.port, timeout=30) as client:
        for rcpt in recipients:
            client.sendmail("news@shop.test", [rcpt],
                            f"From: <news@shop.test>\r\nTo: <{rcpt}>\r\nSubject: hi\r\n"
                            f"\r\nbody\r\n".encode())


def test_engine_events_reach_the_queue_across_a_broker_restart(
        tmp_path: Path, broker: RabbitMqServer, dns_server: Any,
        asyncio_sink_factory: Any) -> None:
    """Engine + sink MX + [[amqp]]: 150 messages, the broker stopped (delivery goes on:
    150 more are delivered while it is down), started again: every Delivery event of the
    event log is in the queue, with its id, duplicates counted."""
    mx = asyncio_sink_factory(host="127.0.0.2")
    dns_server.add_mx("a.test", [(10, "mx.a.test")])
    dns_server.add_a("mx.a.test", "127.0.0.2")
    queue = asyncio.run(Queue(broker.url, "ex-engine", "mta.Delivery").declare())
    collected = Collected(queue)
    engine = start_engine(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": mx.port, "allow_loopback_mx": True,
                  "retry_initial": 1.0, "retry_max": 2.0, "retry_jitter": 0.0},
        outbox={"retry_initial": 0.2, "retry_max": 1.0},
        amqp=[{"name": "app", "url": broker.url, "exchange": "ex-engine",
               "events": ["Delivery"], "batch_size": 40, "batch_wait": 0.2,
               "timeout": 5.0}])
    delivered = lambda: read_events(tmp_path / "events.jsonl", "Delivery")  # noqa: E731
    try:
        submit(engine, [f"user{n}@a.test" for n in range(150)])
        assert wait_until(lambda: len(delivered()) == 150, timeout=60)
        assert wait_until(lambda: len(collected.poll()) >= 40, timeout=30)
        broker.stop()
        submit(engine, [f"user{n}@a.test" for n in range(150, 300)])
        assert wait_until(lambda: len(delivered()) == 300, timeout=60)  # not held up
        broker.start()
        expected = {e["event_id"] for e in delivered()}
        assert len(expected) == 300
        assert wait_until(lambda: expected <= set(collected.poll()), timeout=90, interval=1.0)
    finally:
        engine.stop()
    ids = collected.ids
    duplicates = sum(ids.values()) - len(ids)
    print(f"engine: 300 Delivery events, {len(ids)} in the queue, {duplicates} duplicates")
    assert set(ids) == expected  # the binding takes Delivery only: nothing else, nothing lost
    body = collected.bodies[next(iter(expected))]
    assert body["type"] == "Delivery" and body["recipient"].endswith("@a.test")
    assert body["schema"] == 1 and body["message_id"]


# --- amqps --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RabbitMqServer, Path]]:
    """A broker with an amqps listener, its certificate from a test CA: (broker, CA file)."""

    where = tmp_path_factory.mktemp("amqps")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key, ca_file = where / "chain.pem", where / "key.pem", where / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    with chain.open("wb") as out:
        for blob in cert.cert_chain_pems:
            out.write(blob.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    with RabbitMqServer(tls=(chain, key)) as server:
        yield server, ca_file


def test_amqps_with_ca_file(tls_broker: tuple[RabbitMqServer, Path]) -> None:
    """amqps checks the broker's certificate: trusted through ca_file it delivers; without
    it (the system's CAs do not know the test CA) the batch fails, nothing sent."""
    broker, ca_file = tls_broker

    async def run() -> list[Any]:
        queue = await Queue(broker.url, "ex-tls").declare()
        untrusted = sink_for(broker.tls_url, "ex-tls", timeout=5.0)
        with pytest.raises(SinkFailed, match="CERTIFICATE_VERIFY_FAILED|certificate"):
            await untrusted.deliver([event(1)])
        await untrusted.close()
        sink = sink_for(broker.tls_url, "ex-tls", ca_file=str(ca_file))
        try:
            await sink.deliver([event(2), event(3)])
        finally:
            await sink.close()
        return await queue.drain()

    assert [m.message_id for m in asyncio.run(run())] == ["ev-000002", "ev-000003"]
