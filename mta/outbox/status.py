"""What operators see of the outbox: each sink's backlog and dead letters, the outbox's depth
and age (for `mta webhook`, the admin API, the dashboard and /metrics). Reads only,
except `replay_op`; the secret of a webhook never appears here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from mta.outbox import store
from mta.outbox.dispatch import SinkStatus, over_limits
from mta.outbox.webhook import shown_url

DEAD_LIMIT = 1000


class UnknownSink(Exception):
    """No [[webhooks]] or [[amqp]] sink has that name."""


def configured(cfg: Any) -> list[dict[str, Any]]:
    """name, kind and where of every configured sink (never a secret or password)."""
    rows = [{"name": h.name, "kind": "webhook", "target": shown_url(h.url),
             "events": list(h.events), "accounts": list(h.accounts),
             "batch_size": h.batch_size, "max_age": h.max_age} for h in cfg.webhooks]
    rows += [{"name": a.name, "kind": "amqp", "target": f"exchange {a.exchange or '(default)'}",
              "events": list(a.events), "accounts": list(a.accounts),
              "batch_size": a.batch_size, "max_age": a.max_age}
             for a in getattr(cfg, "amqp", [])]
    return rows


def require_sink(cfg: Any, name: str) -> None:
    if name not in {row["name"] for row in configured(cfg)}:
        raise UnknownSink(f"no sink named {name!r} in [[webhooks]] or [[amqp]]")


def summary(spool: Any, cfg: Any, now: float) -> dict[str, Any]:
    with spool.read() as txn:
        figures = store.figures(spool, txn, now)
    return {"depth": figures.depth, "oldest_age": figures.oldest_age,
            "alert_depth": cfg.outbox.alert_depth, "alert_age": cfg.outbox.alert_age,
            "over_limit": over_limits(figures, cfg.outbox.alert_depth, cfg.outbox.alert_age)}


def sink_rows(spool: Any, cfg: Any, now: float,
              live: dict[str, SinkStatus] | None = None) -> list[dict[str, Any]]:
    """One row per configured sink: its backlog (events after its cursor), dead letters,
    and, from the running dispatcher when there is one, its live figures."""
    rows = []
    with spool.read() as txn:
        figures = store.figures(spool, txn, now)
        for row in configured(cfg):
            name = row["name"]
            behind = store.pending_for(spool, txn, name, figures.last_seq)
            row |= {"cursor": store.cursor(spool, txn, name),
                    "pending": min(behind, figures.depth),
                    "dead": store.dead_count(spool, txn, name)}
            state = (live or {}).get(name)
            if state is not None:
                row |= {k: v for k, v in asdict(state).items() if k != "name"}
            rows.append(row)
    return rows


def dead_rows(spool: Any, cfg: Any, name: str, limit: int = DEAD_LIMIT
              ) -> list[dict[str, Any]]:
    require_sink(cfg, name)
    with spool.read() as txn:
        letters = store.dead_letters(spool, txn, name, limit)
    return [{"seq": d.seq, "failed_at": d.failed_at, "reason": d.reason,
             "id": d.event.get("id"), "type": d.event.get("type"),
             "account": d.event.get("account", ""), "campaign": d.event.get("campaign", ""),
             "recipient": d.event.get("recipient", ""), "time": d.event.get("time")}
            for d in letters]


def replay_op(spool: Any, cfg: Any, name: str) -> Callable[[Any], int]:
    """A write operation: the sink's dead letters go back to the outbox (for it alone)."""
    require_sink(cfg, name)
    return lambda txn: store.replay(spool, txn, name)


def families(spool: Any, cfg: Any, now: float) -> Iterator[GaugeMetricFamily]:
    """/metrics: the outbox's depth and age, whether past its limits, and per sink its
    backlog and dead letters (read from LMDB at scrape time; nothing without a sink)."""
    if not configured(cfg):
        return
    top = summary(spool, cfg, now)
    yield GaugeMetricFamily("mta_outbox_events", "Events waiting in the outbox",
                            value=top["depth"])
    yield GaugeMetricFamily("mta_outbox_oldest_age_seconds",
                            "Age of the oldest event waiting in the outbox",
                            value=top["oldest_age"])
    yield GaugeMetricFamily("mta_outbox_over_limit", "1 while the outbox is past [outbox] "
                            "alert_depth or alert_age", value=1 if top["over_limit"] else 0)
    pending = GaugeMetricFamily("mta_outbox_sink_pending", "Events a sink has still to pass",
                                labels=["sink"])
    dead = GaugeMetricFamily("mta_outbox_sink_dead_letters", "A sink's dead letters",
                             labels=["sink"])
    for row in sink_rows(spool, cfg, now):
        pending.add_metric([row["name"]], row["pending"])
        dead.add_metric([row["name"]], row["dead"])
    yield pending
    yield dead
