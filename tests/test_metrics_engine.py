"""/metrics of a real engine (2 workers) delivering to a loopback sink through loopback DNS."""

from __future__ import annotations

import json
import re
import smtplib
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.engine_proc import PROJECT_ROOT
from bench.rig.dns import DnsServer
from bench.rig.sinks import AsyncioSink, SinkFaults
from mta.queue.spool import domain_hash
from tests.helpers.engine import wait_until
from tests.helpers.http import call, start_http_engine

SHAPING = """
[provider.sinkco]
mx_suffixes = [".sink.test"]
"""
DOMAINS = [f"d{i}.test" for i in range(6)]  # spread over both workers' shares


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    status, text, headers = call(url + "/metrics", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, {})
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def grafana_metric_names() -> set[str]:
    board = json.loads((PROJECT_ROOT / "config" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    names = {name for expr in exprs for name in re.findall(r"\bmta_[a-z_]+", expr)}
    assert len(names) >= 15
    return names


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def message(rcpt: str, campaign: str) -> bytes:
    return (f"From: shop@shop.test\r\nTo: {rcpt}\r\nSubject: hi\r\n"
            f"X-Campaign-ID: {campaign}\r\n\r\nhello\r\n").encode()


def test_counters_move_as_mail_flows_across_two_workers(
        tmp_path: Path, dns_server: DnsServer,
        asyncio_sink_factory: Callable[..., AsyncioSink]) -> None:
    sink = asyncio_sink_factory("127.0.0.2", faults=SinkFaults(rcpt_rules=[
        ("^bad", "550 5.1.1 no such user"), ("^later", "451 4.3.0 try again later")]))
    for domain in DOMAINS:
        dns_server.add_mx(domain, [(10, "mx1.sink.test")])
    dns_server.add_a("mx1.sink.test", "127.0.0.2")
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(SHAPING)
    engine = start_http_engine(
        tmp_path / "engine", workers=2,
        dns={"nameservers": [dns_server.address]},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True,
                  "retry_initial": 3600.0},
        throttle={"shaping_file": str(shaping)})
    # Both workers deliver (each owns some of the domains), so the sums below merge the
    # metrics files of two processes.
    assert {domain_hash(d) % 2 for d in DOMAINS} == {0, 1}
    try:
        before = scrape(engine.url)
        assert value(before, "mta_messages_received_total") == 0
        good = [f"good{i}@{DOMAINS[i % 6]}" for i in range(12)]
        bad = [f"bad{i}@{DOMAINS[i % 6]}" for i in range(3)]
        later = [f"later{i}@{DOMAINS[i % 6]}" for i in range(2)]
        with smtplib.SMTP(engine.host, engine.port) as client:
            for rcpt in good + bad + later:
                client.sendmail("", [rcpt], message(rcpt, "spring"))  # null sender: no DSNs

        def settled() -> bool:
            m = scrape(engine.url)
            return (value(m, "mta_messages_delivered_total", provider="sinkco") == 12
                    and value(m, "mta_messages_bounced_total", provider="sinkco") == 3
                    and value(m, "mta_messages_deferred_total", provider="sinkco") == 2)

        assert wait_until(settled, timeout=30, interval=0.3), engine.log_text()[-2000:]
        m = scrape(engine.url)
        assert value(m, "mta_messages_received_total") == 17
        assert value(m, "mta_recipients_received_total") == 17
        assert value(m, "mta_delivery_latency_seconds_count", provider="sinkco") == 12
        assert value(m, "mta_delivery_latency_seconds_bucket", provider="sinkco",
                     le="+Inf") == 12
        assert value(m, "mta_feedback_total", kind="hard_bounce") == 3  # 550 5.1.1
        assert wait_until(lambda: value(scrape(engine.url), "mta_dkim_signatures_total",
                                        result="unsigned") >= 12, timeout=10, interval=0.3)
        assert value(m, "mta_dkim_signatures_total", result="signed") == 0  # no key: unsigned
        labels = {v for series in m.values() for key in series for _, v in key}
        assert not labels & set(DOMAINS)  # providers, never recipient domains
        assert wait_until(lambda: value(scrape(engine.url), "mta_queue_depth",
                                        state="deferred") == 2, timeout=10, interval=0.3)
        m = scrape(engine.url)
        assert value(m, "mta_queue_messages") == 2
        assert value(m, "mta_queue_depth", state="queued") == 0
        assert value(m, "mta_spool_used_bytes") > 0
        assert value(m, "mta_spool_disk_free_bytes") > 0
        assert value(m, "mta_spool_commits_total") > 0
        assert value(m, "mta_campaigns_paused") == 0
        assert grafana_metric_names() <= m.keys()  # the Grafana dashboard draws real series
        dashboard = call(engine.url + "/api/v1/dashboard")[1]
        assert dashboard["totals"]["delivered"] == 12
        assert dashboard["totals"]["received"] == 17
    finally:
        engine.stop()
