"""Metrics from events, provider labels, sampled figures, and the multiprocess merge."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mta.config import Config
from mta.metrics import (
    MULTIPROC_ENV,
    EngineMetrics,
    LiveParts,
    ProviderNames,
    feedback_kind,
    metrics_process_dead,
    outcome_totals,
    pool_connections,
    prepare_metrics_dir,
    render,
)
from mta.throttle import parse_shaping

SHAPING = parse_shaping({"provider": {
    "gmail": {"mx_suffixes": [".google.com"]},
    "listed": {"mx_suffixes": [".listed.example"], "domains": ["listed.test"]},
}})


def families(registry: CollectorRegistry | None) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} from the rendered text (parsed back)."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def outcome(kind: str, mx: str, domain: str, age: float = 1.0, **extra: object) -> dict:
    return {"type": kind, "id": "M1", "account": "shop", "campaign": "c1", "domain": domain,
            "recipient": f"u@{domain}", "mx": mx, "code": 250, "status": "2.0.0",
            "reply": "ok", "attempt": 1, "age": age, **extra}


def test_outcomes_are_counted_by_provider_never_by_recipient_domain() -> None:
    m = EngineMetrics(ProviderNames(SHAPING))
    m.on_event(outcome("Delivery", "alt1.gmail-smtp-in.l.google.com", "gmail.com", age=0.3))
    m.on_event(outcome("Delivery", "mx.small-isp.test", "small-isp.test", age=42.0))
    m.on_event(outcome("TransientFailure", "alt2.gmail-smtp-in.l.google.com.", "gmail.com"))
    m.on_event(outcome("Bounce", "mx.small-isp.test", "small-isp.test"))
    m.on_event(outcome("Expiration", "", "listed.test"))
    got = families(m.registry)
    assert got["mta_messages_delivered_total"] == {
        (("provider", "gmail"),): 1.0, (("provider", "other"),): 1.0}
    assert got["mta_messages_deferred_total"][(("provider", "gmail"),)] == 1.0
    assert got["mta_messages_bounced_total"][(("provider", "other"),)] == 1.0
    assert got["mta_messages_expired_total"][(("provider", "listed"),)] == 1.0
    labels = {v for series in got.values() for key in series for _, v in key}
    assert not labels & {"gmail.com", "small-isp.test", "listed.test"}
    latency = got["mta_delivery_latency_seconds_count"]
    assert latency == {(("provider", "gmail"),): 1.0, (("provider", "other"),): 1.0}
    buckets = got["mta_delivery_latency_seconds_bucket"]
    assert buckets[(("le", "0.5"), ("provider", "gmail"))] == 1.0
    assert buckets[(("le", "30.0"), ("provider", "other"))] == 0.0
    assert buckets[(("le", "60.0"), ("provider", "other"))] == 1.0


def test_without_shaping_every_destination_is_other() -> None:
    m = EngineMetrics(ProviderNames(None))
    m.on_event(outcome("Delivery", "alt1.gmail-smtp-in.l.google.com", "gmail.com"))
    assert families(m.registry)["mta_messages_delivered_total"] == {(("provider", "other"),): 1.0}


def test_receptions_auth_and_feedback() -> None:
    m = EngineMetrics()
    m.on_event({"type": "Reception", "id": "A", "recipients": 3})
    m.on_event({"type": "Reception", "id": "B", "recipients": 2})
    m.on_event({"type": "Auth", "client": "127.0.0.1", "identity": "shop", "ok": False})
    m.on_event({"type": "Auth", "client": "127.0.0.1", "identity": "shop", "ok": True})
    m.on_event({"type": "Bounce", "kind": "hard", "recipient": "x@y.test"})
    m.on_event({"type": "Complaint", "recipient": "x@y.test"})
    m.on_event({"type": "Unsubscribe", "recipient": "x@y.test"})
    m.on_event({"type": "Unsubscribe", "recipient": "z@y.test"})
    m.on_event({"type": "CampaignPaused", "campaign": "c1"})
    got = families(m.registry)
    assert got["mta_messages_received_total"][()] == 2.0
    assert got["mta_recipients_received_total"][()] == 5.0
    assert got["mta_smtp_auth_total"] == {(("result", "failed"),): 1.0,
                                          (("result", "ok"),): 1.0}
    feedback = got["mta_feedback_total"]
    assert feedback[(("kind", "hard_bounce"),)] == 1.0
    assert feedback[(("kind", "complaint"),)] == 1.0
    assert feedback[(("kind", "unsubscribe"),)] == 2.0
    assert feedback[(("kind", "soft_bounce"),)] == 0.0
    assert got["mta_campaign_pauses_total"][()] == 1.0
    assert outcome_totals(m.registry)["received"] == 2.0


@pytest.mark.parametrize(("event", "kind"), [
    ({"type": "Bounce", "kind": "soft"}, "soft_bounce"),
    ({"type": "Bounce"}, "bounce"),  # a synchronous 5xx, not classified
    ({"type": "Bounce", "kind": "<script>"}, "bounce"),  # never an unbounded label
    ({"type": "AutoReply"}, "autoreply"),
    ({"type": "Delivery"}, None),
])
def test_feedback_kind(event: dict, kind: str | None) -> None:
    assert feedback_kind(event) == kind


def test_sampled_connections_dkim_and_commits() -> None:
    m = EngineMetrics(ProviderNames(SHAPING))
    gmail = SimpleNamespace(workers=3, targets=[SimpleNamespace(host="a.l.google.com")])
    other = SimpleNamespace(workers=2, targets=[SimpleNamespace(host="mx.isp.test")])
    idle = SimpleNamespace(workers=0, targets=[SimpleNamespace(host="mx.idle.test")])
    deliverer = SimpleNamespace(pools={1: gmail, 2: other, 3: idle})
    signer = SimpleNamespace(signed=10, unsigned=1)
    counts = {"refused_suppressed": 2, "pauses": 1}
    guard = SimpleNamespace(metrics=lambda: dict(counts))
    yields = SimpleNamespace(yields=2)
    scheduler = SimpleNamespace(in_flight={b"j1"}, pace=None, intake_first=yields)
    live = LiveParts(deliverer=deliverer, scheduler=scheduler, signer=signer,
                     guard=guard)  # type: ignore[arg-type]
    ctx = SimpleNamespace(index=0, committer=SimpleNamespace(commits=4, operations=9))
    assert pool_connections(deliverer, m.providers) == {"gmail": 3, "other": 2}
    m.sample(ctx, live)  # type: ignore[arg-type]
    signer.signed = 15
    counts["refused_suppressed"] = 5
    gmail.workers = 0
    yields.yields = 3
    m.sample(ctx, live)  # type: ignore[arg-type]
    got = families(m.registry)
    assert got["mta_open_connections"] == {(("provider", "gmail"),): 0.0,
                                           (("provider", "other"),): 2.0}
    assert got["mta_deliveries_in_flight"][()] == 1.0
    assert got["mta_dkim_signatures_total"] == {(("result", "signed"),): 15.0,
                                                (("result", "unsigned"),): 1.0}
    assert got["mta_policy_actions_total"] == {(("action", "pauses"),): 1.0,
                                               (("action", "refused_suppressed"),): 5.0}
    assert got["mta_spool_commits_total"][()] == 4.0
    assert got["mta_spool_commit_operations_total"][()] == 9.0
    assert got["mta_delivery_intake_yields_total"][()] == 3.0


WRITER = textwrap.dedent("""
    import os, sys, time
    from mta.metrics import EngineMetrics
    m = EngineMetrics()
    for _ in range(int(sys.argv[1])):
        m.on_event({"type": "Reception", "recipients": 1})
    m.connections.labels("gmail").set(int(sys.argv[2]))
    print(os.getpid(), flush=True)
""")


def test_worker_processes_add_up_and_dead_workers_leave_live_gauges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config()
    cfg.http.metrics_dir = str(tmp_path / "metrics")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_999999.db").write_bytes(b"stale")
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    try:
        path = prepare_metrics_dir(cfg)
        assert path == cfg.http.metrics_dir and os.listdir(path) == []
        pids = []
        for received, conns in ((3, 2), (4, 5)):
            out = subprocess.run([sys.executable, "-c", WRITER, str(received), str(conns)],
                                 env=dict(os.environ), capture_output=True, text=True,
                                 check=True, timeout=60)
            pids.append(int(out.stdout))
        got = families(None)
        assert got["mta_messages_received_total"][()] == 7.0
        assert got["mta_open_connections"][(("provider", "gmail"),)] == 7.0
        metrics_process_dead(pids[0])
        got = families(None)
        assert got["mta_messages_received_total"][()] == 7.0  # counters survive a restart
        assert got["mta_open_connections"][(("provider", "gmail"),)] == 5.0
    finally:
        from prometheus_client import values

        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
        values.ValueClass = values.get_value_class()


def test_forked_workers_each_count_in_their_own_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine forks its workers after prepare_metrics_dir: each child must notice it
    is a new process (the id is kept, not asked for on every update) and write its own
    file, or the workers would overwrite each other's counts."""
    cfg = Config()
    cfg.http.metrics_dir = str(tmp_path / "metrics")
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    try:
        path = prepare_metrics_dir(cfg)
        children = []
        for received in (3, 4):
            pid = os.fork()
            if pid == 0:  # the child counts, and leaves without pytest's cleanup
                status = 0
                try:
                    m = EngineMetrics()
                    for _ in range(received):
                        m.on_event({"type": "Reception", "recipients": 1})
                except BaseException:
                    status = 1
                os._exit(status)
            children.append(pid)
        for pid in children:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        counters = {name for name in os.listdir(path) if name.startswith("counter_")}
        assert counters == {f"counter_{pid}.db" for pid in children}
        assert families(None)["mta_messages_received_total"][()] == 7.0
    finally:
        from prometheus_client import values

        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
        values.ValueClass = values.get_value_class()
