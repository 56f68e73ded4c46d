"""Outcome counts per egress source and provider, and the sources' state, in the spool's LMDB.

- ``egress.count``  ``<source>\\0<provider>`` -> msgpack dict of ``delivered``,
  ``deferred``, ``bounced`` (the replies to our attempts, per recipient) and
  ``complained`` (feedback-loop complaints about mail the source carried);
- ``egress.state``  ``S<source>`` -> {up, down_until, reason, worker, time} as the worker
  that saw it last; ``W<worker>`` -> the warm-up gate's `status()` of that worker.

A worker's `EgressRecorder` listens to its events, adds them up in memory and writes the
sums once a second through the group committer (no scan of the event log, ever). The
transaction that records a delivery adds the source (and provider) that carried it to
the message's ``sent`` record (`source_noter`; mta.queue.spool.SentOrigin), so that a
complaint arriving days later names the source too (`egress_source` in the Complaint
event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from mta.queue.spool import Spool, pack, unpack

log = logging.getLogger("mta.egress")

COUNT_DB, STATE_DB = "egress.count", "egress.state"
OUTCOMES = ("delivered", "deferred", "bounced", "complained")
SYNC_OUTCOMES = {"Delivery": "delivered", "TransientFailure": "deferred", "Bounce": "bounced"}
INBOUND_KEY = "egress_source"  # inbound events (complaints) use "source" for "async"
OTHER = "other"  # mail to a domain of no provider of the shaping file
FLUSH_INTERVAL = 1.0


def open_dbs(spool: Spool) -> None:
    spool.open_db(COUNT_DB)
    spool.open_db(STATE_DB)


def _name(text: str) -> bytes:
    return text.replace("\0", "").encode("utf-8", "replace")


def count_key(source: str, provider: str) -> bytes:
    return _name(source) + b"\0" + _name(provider or OTHER)


def outcome_of(event: dict[str, Any], sources: frozenset[str] | None = None
               ) -> tuple[str, str, str] | None:
    """(source, provider, outcome) that `event` adds one to, if any (`sources`: the
    configured names; None: any name but "async", the inbound events' `source`)."""
    kind = event.get("type")
    if event.get("dsn") or event.get("notice"):
        return None  # the engine's own mail says nothing of a source's reputation
    if kind in SYNC_OUTCOMES and _known(event.get("source"), sources):
        return str(event["source"]), str(event.get("provider") or OTHER), SYNC_OUTCOMES[kind]
    if kind == "Complaint" and _known(event.get(INBOUND_KEY), sources):
        return (str(event[INBOUND_KEY]), str(event.get("provider") or OTHER), "complained")
    return None


def _known(name: Any, sources: frozenset[str] | None) -> bool:
    if not isinstance(name, str) or not name:
        return False
    return name != "async" if sources is None else name in sources


def name_sources(events: list[dict[str, Any]], sources: dict[str, list[str]]
                 ) -> list[dict[str, Any]]:
    """Feedback events about delivered mail, with the source (`egress_source`) and provider
    that carried it to the recipient's domain, as the `sent` record says."""
    for event in events:
        domain = str(event.get("recipient", "")).rpartition("@")[2].lower()
        found = sources.get(domain)
        if found and len(found) == 2:
            event[INBOUND_KEY], event["provider"] = found
    return events


def add_counts_op(spool: Spool, counts: dict[tuple[str, str], Counter[str]]
                  ) -> Callable[[Any], None]:
    """A write operation adding `counts` ((source, provider) -> outcome -> n)."""

    def add(txn: Any) -> None:
        db = spool.dbs[COUNT_DB]
        for (source, provider), delta in counts.items():
            key = count_key(source, provider)
            raw = txn.get(key, db=db)
            row: dict[str, int] = unpack(raw) if raw is not None else {}
            for outcome, n in delta.items():
                row[outcome] = row.get(outcome, 0) + n
            txn.put(key, pack(row), db=db)

    return add


def source_noter(spool: Spool) -> Callable[[Any, Any, Any], None]:
    """The scheduler's outcome hook (mta.queue.scheduler.OutcomeRecorder) naming the source
    of each delivered message in its `sent` record; the engine's own mail is left out."""

    def note(txn: Any, item: Any, outcome: Any) -> None:
        message = item.message
        if item.source and outcome.delivered and not (
                message.get("dsn_for") or message.get("notice")):
            spool.note_sent_source(txn, str(message["id"]), item.domain, item.source,
                                   item.provider or OTHER)

    return note


def put_state_op(spool: Spool, states: dict[bytes, dict[str, Any]]) -> Callable[[Any], None]:
    def put(txn: Any) -> None:
        db = spool.dbs[STATE_DB]
        for key, value in states.items():
            txn.put(key, pack(value), db=db)

    return put


def read_counts(spool: Spool) -> dict[str, dict[str, dict[str, int]]]:
    """source -> provider -> outcome -> count."""
    db = spool.open_db(COUNT_DB)
    out: dict[str, dict[str, dict[str, int]]] = {}
    if db is None:
        return out
    with spool.read() as txn:
        for key, raw in txn.cursor(db=db):
            source, _, provider = bytes(key).decode("utf-8", "replace").partition("\0")
            out.setdefault(source, {})[provider] = {o: int(unpack(raw).get(o, 0))
                                                    for o in OUTCOMES}
    return out


def read_states(spool: Spool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(source -> its last state seen by a worker, worker -> its warm-up gate's status)."""
    db = spool.open_db(STATE_DB)
    sources: dict[str, dict[str, Any]] = {}
    warmup: dict[str, Any] = {}
    if db is None:
        return sources, warmup
    with spool.read() as txn:
        for key, raw in txn.cursor(db=db):
            name = bytes(key)[1:].decode("utf-8", "replace")
            value = unpack(raw)
            if key[:1] == b"S":
                sources[name] = value
            elif key[:1] == b"W" and isinstance(value, dict):
                warmup[name] = value
    return sources, warmup


class EgressRecorder:
    """One worker's counts and source states, written in batches (see the module doc)."""

    def __init__(self, spool: Spool, sources: frozenset[str], worker: int,
                 submit: Callable[[Callable[[Any], Any]], Any],
                 gate_status: Callable[[], dict[str, Any]] | None = None,
                 on_count: Callable[[str, str, str], None] | None = None) -> None:
        self.spool = spool
        open_dbs(spool)
        self.sources = sources
        self.worker = worker
        self.submit = submit  # the group committer's submit
        self.gate_status = gate_status
        self.on_count = on_count  # (source, provider, outcome): the Prometheus counter
        self.counts: dict[tuple[str, str], Counter[str]] = {}
        self.states: dict[bytes, dict[str, Any]] = {}
        self._last_warmup: dict[str, Any] | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        found = outcome_of(event, self.sources)
        if found is None:
            return
        source, provider, outcome = found
        self.counts.setdefault((source, provider), Counter())[outcome] += 1
        if self.on_count is not None:
            self.on_count(source, provider, outcome)

    def source_changed(self, name: str, state: dict[str, Any]) -> None:
        self.states[b"S" + _name(name)] = {**state, "worker": self.worker,
                                           "time": time.time()}

    async def flush(self) -> None:
        ops: list[Callable[[Any], Any]] = []
        if self.counts:
            ops.append(add_counts_op(self.spool, self.counts))
            self.counts = {}
        if self.gate_status is not None:
            status = self.gate_status()
            if status != self._last_warmup:
                self._last_warmup = status
                self.states[b"W%d" % self.worker] = status
        if self.states:
            ops.append(put_state_op(self.spool, self.states))
            self.states = {}
        for op in ops:
            await self.submit(op)

    async def run(self, interval: float = FLUSH_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
            except Exception:
                log.exception("could not write the egress counters")

    def start(self, on_close: Callable[[Callable[[], Any]], None]) -> None:
        task = asyncio.get_running_loop().create_task(self.run())

        async def close() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await self.flush()

        on_close(close)
