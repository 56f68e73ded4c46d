"""Events to an AMQP 0-9-1 exchange (RabbitMQ), through aio-pika, with publisher confirms.

One persistent message per event: the event as a JSON object for body, the event's `id`
as message_id (consumers deduplicate on it: delivery is at least once), its type as the
message's `type`, its type and account as headers (for a headers exchange), its time as
timestamp, and a routing key from the `routing_key` template ({type}, {account}).

`deliver` publishes a whole batch on one channel in confirm mode (pipelined, in order)
and returns only once the broker confirmed every message of it; a nack, an unroutable
message (with `mandatory`), a lost connection or no confirm within `timeout` raise
SinkFailed, and the outbox dispatcher retries the batch later. The connection is opened
on first use and again after any failure (a broker restart), so nothing waits on a
background reconnect: each `deliver` either succeeds or fails within `timeout`.

The URL's password is never shown: `where` (in every SinkFailed and log line) is the URL
with the password replaced.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from mta.config import AmqpConfig
from mta.outbox import codec
from mta.outbox.sink import EventFilter, SinkFailed
from mta.text import without_password

log = logging.getLogger(__name__)

_UNSAFE_WORD = re.compile(r"[^A-Za-z0-9_-]")  # a dot would add a word to a topic key
CLOSE_TIMEOUT = 2.0  # seconds a failed connection is given to close
REASON_LENGTH = 300


def routing_word(value: Any) -> str:
    """An event field as one word of a routing key ("" -> "_")."""
    return _UNSAFE_WORD.sub("_", str(value or "")) or "_"


def routing_key(template: str, event: dict[str, Any]) -> str:
    return template.format(type=routing_word(event.get("type")),
                           account=routing_word(event.get("account")))[:255]


def message_for(event: dict[str, Any]) -> aio_pika.Message:
    """The persistent AMQP message of one event."""
    event_type = str(event.get("type", ""))[:255]
    when = event.get("time")
    return aio_pika.Message(
        codec.encode(event),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(event["id"]),
        type=event_type,
        timestamp=when if isinstance(when, int | float) and not isinstance(when, bool) else None,
        headers={"type": event_type, "account": str(event.get("account") or "")},
        app_id="mta",
    )


class AmqpSink:
    """An EventSink (mta/outbox/sink.py) for one [[amqp]] table."""

    def __init__(self, cfg: AmqpConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.batch_size = cfg.batch_size
        self.batch_wait = cfg.batch_wait
        self.max_age = cfg.max_age
        self.timeout = cfg.timeout
        self.where = without_password(cfg.url)
        self.filter = EventFilter.of(cfg.events, cfg.accounts)
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._closing: set[asyncio.Task[None]] = set()  # connections being closed
        self.connects = 0  # connections opened so far (the first one and reconnections)

    def __repr__(self) -> str:  # never the password
        return f"AmqpSink({self.name!r}, {self.where!r})"

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"kind": "amqp", "url": self.where, "exchange": cfg.exchange,
                "exchange_type": cfg.exchange_type, "routing_key": cfg.routing_key,
                **self.filter.describe(),
                "batch_size": self.batch_size, "batch_wait": self.batch_wait,
                "max_age": self.max_age}

    def wants(self, event: dict[str, Any]) -> bool:
        return self.filter.wants(event)

    async def deliver(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        try:
            async with asyncio.timeout(self.cfg.timeout):
                exchange = await self._ready_exchange()
                await self._publish(exchange, events)
        except asyncio.CancelledError:
            self._drop()  # confirms may still be pending on it: start afresh next time
            raise
        except Exception as exc:  # every failure is the dispatcher's retry
            self._drop()
            raise SinkFailed(f"{self.name} ({self.where}): {self._reason(exc)}") from None

    async def close(self) -> None:
        self._drop()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _publish(self, exchange: AbstractExchange, events: list[dict[str, Any]]) -> None:
        """Every message written in order (aiormq's channel lock is FIFO and each publish
        reaches it without suspending), then all confirms awaited together."""
        publishes = [exchange.publish(message_for(event),
                                      routing_key(self.cfg.routing_key, event),
                                      mandatory=self.cfg.mandatory)
                     for event in events]
        results = await asyncio.gather(*publishes, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _ready_exchange(self) -> AbstractExchange:
        if (self._exchange is not None and self._connection is not None
                and self._channel is not None and not self._connection.is_closed
                and not self._channel.is_closed):
            return self._exchange
        self._drop()
        connection = await aio_pika.connect(
            self.cfg.url, timeout=self.cfg.timeout, ssl_context=self._ssl_context(),
            client_properties={"connection_name": f"mta outbox {self.name}"})
        self._connection = connection  # closed by _drop if what follows fails
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await self._exchange_of(channel)
        self._channel, self._exchange = channel, exchange
        self.connects += 1
        if self.connects > 1:
            log.info("amqp %s: connected again to %s", self.name, self.where)
        return exchange

    def _ssl_context(self) -> ssl.SSLContext | None:
        """amqps: the system's CA store, plus `ca_file`; the broker's name is checked."""
        if not self.cfg.url.startswith("amqps:"):
            return None
        context = ssl.create_default_context()
        if self.cfg.ca_file:
            context.load_verify_locations(self.cfg.ca_file)
        return context

    async def _exchange_of(self, channel: AbstractChannel) -> AbstractExchange:
        cfg = self.cfg
        if not cfg.exchange:
            return channel.default_exchange
        if cfg.declare_exchange:
            return await channel.declare_exchange(
                cfg.exchange, aio_pika.ExchangeType(cfg.exchange_type), durable=True)
        return await channel.get_exchange(cfg.exchange, ensure=True)

    def _drop(self) -> None:
        """Forget the connection and close it in the background (a hung broker would
        keep a close waiting), so a failed `deliver` returns at its timeout."""
        connection = self._connection
        self._connection = self._channel = self._exchange = None
        if connection is not None:
            task = asyncio.get_running_loop().create_task(self._close_quietly(connection))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_quietly(connection: AbstractConnection) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await connection.close()
        except Exception:  # already broken; the next deliver reconnects
            pass

    def _reason(self, exc: BaseException) -> str:
        """One line for the operator, the URL's password scrubbed out of it."""
        if isinstance(exc, TimeoutError):
            text = f"no answer or confirm within {self.cfg.timeout:g} s"
        else:
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        password = urlsplit(self.cfg.url).password
        if password:
            text = text.replace(password, "***")
        return " ".join(text.split())[:REASON_LENGTH]
