"""The event outbox without sockets: signing, backoff, batching, the LMDB store (cursor,
prune, dead letters, replay), the recorder's ordering with the group committer, and the
dispatcher driving a sink that keeps what it is given (tests/test_webhooks.py: end to end)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bench.engine_proc import PROJECT_ROOT
from mta.config import ConfigError, WebhookConfig, load_config
from mta.outbox import store
from mta.outbox.dispatch import Dispatcher, Settings, backoff, collect
from mta.outbox.signing import parse_header, signature_header, verify
from mta.outbox.sink import SinkFailed
from mta.outbox.webhook import WebhookSink, encode_batch, shown_url
from mta.outbox.wiring import OutboxRecorder
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool

SECRET = b"a-secret-of-the-tests"
SCHEMA = json.loads((PROJECT_ROOT / "config" / "event-schema.json").read_text())


# --- signing ----------------------------------------------------------------------------

def test_signature_verifies_and_rejects_forgeries_changes_and_replays() -> None:
    body = b'[{"id":"1","type":"Delivery"}]'
    header = signature_header(SECRET, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body, now=1_700_000_100)
    assert not verify(SECRET, header, body + b" ", now=1_700_000_100)  # changed body
    assert not verify(b"another-secret", header, body, now=1_700_000_100)  # forged
    assert not verify(SECRET, header, body, now=1_700_000_000 + 301)  # replayed late
    assert not verify(SECRET, header.replace("t=1700000000", "t=1700000001"), body,
                      now=1_700_000_000)  # timestamp moved
    assert not verify(SECRET, "garbage", body, now=1_700_000_000)
    assert parse_header("t=12,v1=" + "a" * 64) == (12, ["a" * 64])
    assert parse_header("t=x,v1=" + "a" * 64) is None


# --- backoff and batching ---------------------------------------------------------------

def test_backoff_doubles_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    first = [backoff(n, 1.0, 60.0, jitter=0.0) for n in range(1, 9)]
    assert first == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    spread = {round(backoff(3, 1.0, 60.0, 0.25, rng), 3) for _ in range(50)}
    assert len(spread) > 10 and all(3.0 <= d <= 5.0 for d in spread)


class KeepingSink:
    """A sink that keeps every batch it takes; `fail` batches are refused first."""

    def __init__(self, name: str = "app", batch_size: int = 3, types: tuple[str, ...] = (),
                 fail: int = 0, max_age: float = 3600.0) -> None:
        self.name, self.batch_size, self.batch_wait, self.max_age = name, batch_size, 0.0, max_age
        self.types = types
        self.fail = fail
        self.batches: list[list[dict[str, Any]]] = []
        self.attempts: list[list[str]] = []

    def wants(self, event: dict[str, Any]) -> bool:
        return not self.types or event["type"] in self.types

    async def deliver(self, events: list[dict[str, Any]]) -> None:
        self.attempts.append([e["id"] for e in events])
        if self.fail:
            self.fail -= 1
            raise SinkFailed("HTTP 500")
        self.batches.append(events)

    async def close(self) -> None:
        pass


def entries(*types: str, only: str = "") -> list[store.Entry]:
    return [store.Entry(n + 1, {"id": str(n + 1), "type": t}, only)
            for n, t in enumerate(types)]


def test_collect_keeps_order_filters_and_moves_past_unwanted_events() -> None:
    sink = KeepingSink(batch_size=2, types=("Bounce",))
    listed = entries("Delivery", "Bounce", "Delivery", "Bounce", "Bounce", "Delivery")
    batch = collect(listed, sink, 2, after=0)
    assert [e.seq for e in batch.entries] == [2, 4] and batch.upto == 4
    rest = collect(listed, sink, 2, after=batch.upto)
    assert [e.seq for e in rest.entries] == [5] and rest.upto == 6
    assert collect(listed, sink, 2, after=6).entries == []
    replayed = entries("Bounce", "Bounce", only="other")
    assert collect(replayed, sink, 2, after=0).entries == [] and \
        collect(replayed, sink, 2, after=0).upto == 2


def test_webhook_filters_by_type_and_account_and_never_shows_its_secret() -> None:
    sink = WebhookSink(WebhookConfig("app", "https://u:pw@app.test:8443/hook?key=k", "x" * 20,
                                     events=["Bounce"], accounts=["shop"]))
    assert sink.wants({"type": "Bounce", "account": "shop"})
    assert not sink.wants({"type": "Bounce", "account": "other"})
    assert not sink.wants({"type": "Delivery", "account": "shop"})
    assert "x" * 20 not in repr(sink) and "x" * 20 not in str(sink.describe())
    assert shown_url(sink.url) == "https://app.test:8443/hook"
    assert "x" * 20 not in repr(WebhookConfig("a", "http://h/", "x" * 20))
    assert json.loads(encode_batch([{"id": "1", "reply": "é"}])) == [{"id": "1", "reply": "é"}]


def test_webhook_config_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"

    def load(**hook: Any) -> Any:
        lines = [f"{k} = {json.dumps(v)}" for k, v in
                 ({"name": "app", "url": "http://127.0.0.1:9/x", "secret": "s" * 16} | hook).items()
                 if v is not None]
        path.write_text("[[webhooks]]\n" + "\n".join(lines) + "\n")
        return load_config(path)

    assert load().webhooks[0].batch_size == 100
    for bad in ({"url": "ftp://h/x"}, {"url": "http:///x"}, {"secret": "short"},
                {"secret": None}, {"batch_size": 0}, {"batch_wait": -1.0},
                {"events": ["no spaces"]}):
        with pytest.raises(ConfigError) as err:
            load(**bad)
        assert "s" * 16 not in str(err.value)
    path.write_text("[[webhooks]]\nname='a'\nurl='http://h/'\nsecret='ssssssssssssssss'\n"
                    "[[webhooks]]\nname='a'\nurl='http://h/'\nsecret='ssssssssssssssss'\n")
    with pytest.raises(ConfigError, match="defined twice"):
        load_config(path)


# --- the store on a real LMDB -------------------------------------------------------------

def event(kind: str = "Delivery", **fields: Any) -> dict[str, Any]:
    """An event as the delivery outcomes make them (both types have the same fields)."""
    logged = {"type": kind, "id": "MSG1", "account": "shop", "campaign": "c",
              "recipient": "r@x.test", "domain": "x.test", "code": 250, "status": "2.0.0",
              "reply": "ok", "attempt": 1, "kind": "hard", "reason": "", **fields}
    return store.outbox_event(store.stamp(logged, 0))


def write(spool: Spool, op: Any) -> Any:
    [result] = spool.apply([op])
    if isinstance(result, BaseException):
        raise result
    return result


def test_store_appends_in_order_keeps_cursors_prunes_and_replays_dead_letters(tmp_path) -> None:
    spool = Spool(tmp_path / "spool")
    try:
        events = [event(recipient=f"r{i}@x.test") for i in range(5)]
        assert write(spool, lambda txn: store.append(spool, txn, events)) == 5
        with spool.read() as txn:
            listed = store.read_after(spool, txn, 0, 10)
            assert [e.seq for e in listed] == [1, 2, 3, 4, 5]
            assert [e.event["id"] for e in listed] == [e["id"] for e in events]
            assert store.read_after(spool, txn, 3, 10)[0].seq == 4
        write(spool, lambda txn: store.set_cursor(spool, txn, "a", 3))
        write(spool, lambda txn: store.set_cursor(spool, txn, "b", 2))
        assert write(spool, lambda txn: store.prune(spool, txn, ["a", "b"])) == 2
        write(spool, lambda txn: store.set_cursor(spool, txn, "b", 1))  # never backwards
        with spool.read() as txn:
            assert store.cursor(spool, txn, "b") == 2
            assert store.figures(spool, txn, time.time()).depth == 3
        # everything pruned: the numbering goes on (cursors stay valid)
        write(spool, lambda txn: store.set_cursor(spool, txn, "a", 5))
        write(spool, lambda txn: store.set_cursor(spool, txn, "b", 5))
        write(spool, lambda txn: store.prune(spool, txn, ["a", "b"]))
        assert write(spool, lambda txn: store.append(spool, txn, [event()])) == 6
        # dead letters, then a replay for that sink alone, ids unchanged
        with spool.read() as txn:
            last = store.read_after(spool, txn, 5, 10)
        write(spool, lambda txn: store.add_dead(spool, txn, "a", last, "HTTP 500", 1.0))
        with spool.read() as txn:
            [dead] = store.dead_letters(spool, txn, "a")
            assert dead.reason == "HTTP 500" and dead.event["id"] == last[0].event["id"]
            assert store.dead_count(spool, txn, "b") == 0
        assert write(spool, lambda txn: store.replay(spool, txn, "a")) == 1
        with spool.read() as txn:
            again = store.read_after(spool, txn, 6, 10)
            assert store.dead_count(spool, txn, "a") == 0
        assert [(e.seq, e.only, e.event["id"]) for e in again] == [
            (7, "a", last[0].event["id"])]
        jsonschema.validate(again[0].event, SCHEMA)
    finally:
        spool.close()


def test_events_orjson_refuses_still_go_out_as_json(tmp_path: Path) -> None:
    # A lone surrogate (a header byte decoded with surrogateescape) and an integer past 64
    # bits: orjson refuses both; the outbox and the webhook body carry them anyway.
    spool = Spool(tmp_path / "spool")
    odd = {"id": "e1", "type": "Bounce", "recipient": "r\udcff@example.org", "size": 2**70,
           "text": "café"}
    try:
        write(spool, lambda txn: store.append(spool, txn, [odd]))
        with spool.read() as txn:
            (entry,) = store.read_after(spool, txn, 0, 10)
        assert entry.event == odd
        assert json.loads(encode_batch([odd, {"text": "café"}])) == [odd, {"text": "café"}]
    finally:
        spool.close()


def test_event_ids_differ_between_forked_workers() -> None:
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: its ids of one millisecond, to the parent
        os.write(write_end, ",".join(store.new_event_id(1e9) for _ in range(100)).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split(","))
    ours = {store.new_event_id(1e9) for _ in range(100)}
    assert len(theirs) == len(ours) == 100 and not theirs & ours


def test_outbox_events_carry_a_unique_id_the_schema_and_the_message_id() -> None:
    logged = {"type": "Bounce", "id": "MSG", "account": "shop", "campaign": "c",
              "recipient": "r@x.test", "status": "5.1.1", "kind": "hard", "reason": "x"}
    out = store.outbox_event(store.stamp(logged, 3))
    assert out["message_id"] == "MSG" and out["id"] == logged["event_id"] != "MSG"
    assert out["schema"] == 1 and out["worker"] == 3 and "event_id" not in out
    jsonschema.validate(out, SCHEMA)
    ids = {store.new_event_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in out.items() if k != "recipient"}, SCHEMA)


# --- the recorder with the group committer ------------------------------------------------

def test_an_emitted_event_commits_no_later_than_a_change_submitted_after_it(tmp_path) -> None:
    spool = Spool(tmp_path / "spool")

    async def run() -> list[tuple[int, int]]:
        committer = GroupCommitter(spool)
        committer.start()
        recorder = OutboxRecorder(spool, committer.enqueue, [KeepingSink()], 0)
        seen = []
        for n in range(20):
            recorder.on_event({"type": "Bounce", "n": n})

            def change(txn: Any, n: int = n) -> None:  # the change caused by the event
                txn.put(b"change:%d" % n, b"1", db=spool.dbs["meta"])
                found = store.read_after(spool, txn, 0, 100)
                seen.append((n, sum(1 for e in found if e.event["n"] == n)))

            await committer.submit(change)
        await committer.close()
        return seen

    try:
        assert all(count == 1 for _, count in asyncio.run(run()))
    finally:
        spool.close()


def test_unwanted_events_never_enter_the_outbox(tmp_path) -> None:
    spool = Spool(tmp_path / "spool")

    async def run() -> None:
        committer = GroupCommitter(spool)
        committer.start()
        recorder = OutboxRecorder(spool, committer.enqueue, [KeepingSink(types=("Bounce",))], 0)
        recorder.on_event({"type": "Delivery"})
        recorder.on_event({"type": "Bounce"})
        await committer.submit(lambda txn: None)
        await committer.close()

    try:
        asyncio.run(run())
        with spool.read() as txn:
            assert [e.event["type"] for e in store.read_after(spool, txn, 0, 10)] == ["Bounce"]
    finally:
        spool.close()


# --- the dispatcher -----------------------------------------------------------------------

def dispatch(tmp_path: Path, sinks: list[KeepingSink], events: list[dict[str, Any]],
             until: Any, settings: Settings | None = None, clock: Any = time.time) -> Spool:
    spool = Spool(tmp_path / "spool")

    async def run() -> None:
        committer = GroupCommitter(spool)
        committer.start()
        await committer.submit(lambda txn: store.append(spool, txn, events))
        dispatcher = Dispatcher(spool, committer.submit, sinks, settings or Settings(
            retry_initial=0.01, retry_max=0.02, poll_interval=0.01), clock=clock)
        dispatcher.start()
        deadline = time.monotonic() + 20
        while not until() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the cursor's write
        await dispatcher.close()
        await committer.close()

    asyncio.run(run())
    return spool


def test_dispatcher_retries_the_same_batch_keeps_order_and_prunes(tmp_path) -> None:
    events = [event("Bounce" if i % 3 == 0 else "Delivery", n=i) for i in range(10)]
    picky = KeepingSink("bounces", batch_size=2, types=("Bounce",), fail=2)
    every = KeepingSink("all", batch_size=3)
    spool = dispatch(tmp_path, [picky, every], events,
                     until=lambda: sum(map(len, every.batches)) == 10
                     and sum(map(len, picky.batches)) == 4)
    try:
        assert picky.attempts[0] == picky.attempts[1] == picky.attempts[2]  # same ids again
        assert [e["n"] for b in picky.batches for e in b] == [0, 3, 6, 9]
        assert [e["n"] for b in every.batches for e in b] == list(range(10))
        assert max(map(len, every.batches)) <= 3 and max(map(len, picky.batches)) <= 2
        with spool.read() as txn:
            assert store.figures(spool, txn, time.time()).depth == 0  # both passed all
            assert store.cursor(spool, txn, "bounces") == 10
    finally:
        spool.close()


def test_a_batch_older_than_max_age_becomes_a_dead_letter_never_dropped(tmp_path) -> None:
    events = [event(n=i) for i in range(4)]
    dead_end = KeepingSink("down", batch_size=10, fail=10**6, max_age=60.0)
    later = [time.time() + 120]  # the clock jumps past max_age after the first failure
    spool = dispatch(tmp_path, [dead_end], events, until=lambda: len(dead_end.attempts) >= 1,
                     clock=lambda: later[0])
    try:
        with spool.read() as txn:
            dead = store.dead_letters(spool, txn, "down")
            assert [d.event["n"] for d in dead] == [0, 1, 2, 3]
            assert store.cursor(spool, txn, "down") == 4
            assert store.figures(spool, txn, time.time()).depth == 0
    finally:
        spool.close()


def test_the_readme_receiver_check_accepts_ours_and_refuses_forgeries() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Webhooks", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)  # the snippet as a receiver runs it
    signed = scope["signed"]
    body = encode_batch([event()])
    header = signature_header(SECRET, int(time.time()), body)
    assert signed(SECRET, header, body)
    assert not signed(SECRET, header, body.replace(b"shop", b"shoq"))
    assert not signed(b"forger", header, body)
    assert not signed(SECRET, signature_header(SECRET, int(time.time()) - 3600, body), body)
