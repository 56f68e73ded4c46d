"""The sinks of the configuration, built in one place for the outbox (mta.outbox.wiring)."""

from __future__ import annotations

from typing import Any

from mta.outbox.amqp import AmqpSink
from mta.outbox.sink import EventSink
from mta.outbox.webhook import WebhookSink


def build_sinks(cfg: Any) -> list[EventSink]:
    """Every configured sink; [] when none is (then nothing is written to the outbox)."""
    sinks: list[EventSink] = [WebhookSink(hook) for hook in cfg.webhooks]
    sinks += [AmqpSink(exchange) for exchange in cfg.amqp]
    return sinks
