"""Outbound TLS end to end, all on loopback: a real engine, the test DNS (MX, TXT, TLSA,
with and without the AD flag), TLS sinks with certificates from a CA made here (trusted
through `[delivery] tls_ca_file`), and an HTTPS server for MTA-STS policies and TLS
reports. Tests wait for the engine's events, never for fixed times."""

from __future__ import annotations

import email
import gzip
import json
import os
import secrets
import smtplib
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from bench.engine_proc import PROJECT_ROOT, EngineProcess, read_events
from bench.net import free_port
from bench.rig.sinks import AsyncioSink
from tests.helpers.dkim import dkimpy_results, write_key
from tests.helpers.engine import start_engine, wait_until
from tests.helpers.tls import (
    HttpsServer,
    Served,
    server_cert,
    server_context,
    spki_sha256,
    write_ca,
)

SENDER = "news@shop.test"
ENFORCE = "version: STSv1\nmode: enforce\nmax_age: 86400\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def route(dns: Any, domain: str, *mxs: tuple[int, str, str]) -> None:
    """MX records for `domain`: (preference, host, address) each."""
    dns.add_mx(domain, [(pref, host) for pref, host, _ in mxs])
    for _, host, address in mxs:
        dns.add_a(host, address)


def tls_engine(tmp: Path, dns: Any, port: int, ca_file: str, *, https_port: int = 443,
               delivery: dict[str, Any] | None = None, dns_extra: dict[str, Any] | None = None,
               **sections: Any) -> EngineProcess:
    settings = {"enabled": True, "port": port, "allow_loopback_mx": True,
                "retry_initial": 3600.0, "connection_idle_timeout": 1.0,
                "connect_timeout": 2.0, "command_timeout": 3.0, "tls_ca_file": ca_file,
                "tls_system_ca": False, "mta_sts_port": https_port, "tls_policy_cache": 0.0,
                "mta_sts_fetch_timeout": 2.0, **(delivery or {})}
    return start_engine(tmp, dns={"nameservers": [dns.address], "timeout": 5.0,
                                  **(dns_extra or {})}, delivery=settings, **sections)


def submit(engine: EngineProcess, *recipients: str) -> None:
    with smtplib.SMTP(engine.host, engine.port) as client:
        for rcpt in recipients:
            data = (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: tls\r\n"
                    f"Message-ID: <{secrets.token_hex(6)}@shop.test>\r\n\r\nbody\r\n")
            client.sendmail(SENDER, [rcpt], data.encode())


def outcomes(tmp: Path) -> dict[str, dict[str, Any]]:
    """The last Delivery or TransientFailure event of each recipient."""
    found: dict[str, dict[str, Any]] = {}
    for event in read_events(tmp / "events.jsonl"):
        if event.get("type") in ("Delivery", "TransientFailure"):
            found[event["recipient"]] = event
    return found


def wait_for(tmp: Path, *recipients: str, count: int = 1, timeout: float = 30.0
             ) -> dict[str, dict[str, Any]]:
    """Wait until each recipient has had `count` outcome events; the last of each."""
    def done() -> bool:
        seen: dict[str, int] = {}
        for event in read_events(tmp / "events.jsonl"):
            if event.get("type") in ("Delivery", "TransientFailure"):
                seen[event["recipient"]] = seen.get(event["recipient"], 0) + 1
        return all(seen.get(r, 0) >= count for r in recipients)

    assert wait_until(done, timeout=timeout), outcomes(tmp)
    return outcomes(tmp)


def sinks_for(factory: Callable[..., AsyncioSink], specs: dict[str, tuple[str, Any]]
              ) -> tuple[int, dict[str, AsyncioSink]]:
    """A recording sink per name: (address, server TLS context or None), one port."""
    port = free_port(*(address for address, _ in specs.values()))
    return port, {name: factory(host=address, port=port, tls=context, record=True)
                  for name, (address, context) in specs.items()}


def metrics(engine: EngineProcess) -> str:
    with urllib.request.urlopen(f"http://{engine.config['http']['listen']}/metrics",
                                timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, policy: str, result: str) -> float:
    prefix = f'mta_tls_sessions_total{{policy="{policy}",result="{result}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines()
               if line.startswith(prefix))


def mta(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-m", "mta", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=config.parent, env=env)


# --- modes ---------------------------------------------------------------------------------


def test_modes_verification_and_no_plain_text_after_tls(tmp_path, dns_server,
                                                        asyncio_sink_factory, ca) -> None:
    old_tls = server_context(ca, "mx.old-tls.test")
    old_tls.maximum_version = ssl.TLSVersion.TLSv1_2  # below [delivery] tls_min_version
    specs = {
        "good": ("127.0.0.11", server_context(ca, "mx.good.test")),
        "wrongname": ("127.0.0.12", server_context(ca, "mx.elsewhere.test")),
        "expired": ("127.0.0.13", server_context(ca, "mx.expired.test", expired=True)),
        "plain": ("127.0.0.14", None),
        "opp-wrong": ("127.0.0.15", server_context(ca, "mx.elsewhere.test")),
        "opp-plain": ("127.0.0.16", None),
        "old-tls": ("127.0.0.17", old_tls),
        "insecure": ("127.0.0.18", server_context(ca, "mx.elsewhere.test")),
        "disabled": ("127.0.0.19", server_context(ca, "mx.disabled.test")),
    }
    port, sinks = sinks_for(asyncio_sink_factory, specs)
    for name, (address, _) in specs.items():
        route(dns_server, f"{name}.test", (10, f"mx.{name}.test", address))
    domains = {f"{n}.test": {"tls": "required"} for n in ("good", "wrongname", "expired", "plain")}
    domains["insecure.test"] = {"tls": "opportunistic-insecure"}
    domains["disabled.test"] = {"tls": "disabled"}
    engine = tls_engine(tmp_path, dns_server, port, write_ca(ca, tmp_path),
                        delivery={"domains": domains, "tls_min_version": "TLSv1.3"})
    recipients = [f"user@{name}.test" for name in specs]
    try:
        submit(engine, *recipients)
        seen = wait_for(tmp_path, *recipients)
        assert wait_until(lambda: metric(metrics(engine), "required", "refused") >= 3)
        text = metrics(engine)
    finally:
        engine.stop()

    good = seen["user@good.test"]
    assert good["type"] == "Delivery" and good["tls"] is True and good["tls_verified"] is True
    assert good["tls_policy"] == "required" and good["tls_version"].startswith("TLSv1.")
    assert good["tls_cipher"] and sinks["good"].received[0].tls
    for name, status, result in (("wrongname", "4.7.5", "certificate-host-mismatch"),
                                 ("expired", "4.7.5", "certificate-expired"),
                                 ("plain", "4.7.10", "starttls-not-supported")):
        event = seen[f"user@{name}.test"]
        assert (event["type"], event["status"], event["tls_policy"], event["tls_result"]) == (
            "TransientFailure", status, "required", result), event
        assert sinks[name].sessions >= 1 and sinks[name].messages == 0  # nothing in plain text
    assert seen["user@expired.test"]["tls_verified"] is False
    wrong = seen["user@opp-wrong.test"]
    assert (wrong["type"], wrong["tls"], wrong["tls_verified"], wrong["tls_policy"]) == (
        "Delivery", True, False, "opportunistic")
    assert "does not verify" in wrong["tls_error"] and sinks["opp-wrong"].received[0].tls
    plain = seen["user@opp-plain.test"]
    assert (plain["type"], plain["tls"], plain["tls_verified"]) == ("Delivery", False, None)
    # STARTTLS offered, the handshake fails: deferred, never retried in plain text
    old = seen["user@old-tls.test"]
    assert (old["type"], old["status"], old["tls_policy"]) == (
        "TransientFailure", "4.7.0", "opportunistic")
    assert "handshake" in old["reply"] and sinks["old-tls"].messages == 0
    insecure = seen["user@insecure.test"]
    assert (insecure["type"], insecure["tls"], insecure["tls_verified"]) == ("Delivery", True, None)
    disabled = seen["user@disabled.test"]
    assert (disabled["type"], disabled["tls"], disabled["tls_policy"]) == (
        "Delivery", False, "none")
    assert not sinks["disabled"].received[0].tls
    assert metric(text, "required", "verified") >= 1
    assert metric(text, "opportunistic", "unverified") >= 2
    assert metric(text, "opportunistic", "plain") >= 1


# --- MTA-STS ---------------------------------------------------------------------------------


def test_mta_sts(tmp_path, dns_server, asyncio_sink_factory, ca) -> None:
    specs = {
        "mx1": ("127.0.0.21", server_context(ca, "mx1.sts.test")),
        "rogue": ("127.0.0.22", server_context(ca, "mx.rogue.test")),
        "badcert": ("127.0.0.23", server_context(ca, "mx.elsewhere.test")),
        **{name: (f"127.0.0.{24 + i}", server_context(ca, f"mx.{name}.test"))
           for i, name in enumerate(("redirect", "missing", "big", "html"))},
    }
    port, sinks = sinks_for(asyncio_sink_factory, specs)
    https_host = "127.0.0.50"
    https_port = free_port(https_host)
    names = [f"mta-sts.{d}.test" for d in ("sts", "badcert", "redirect", "missing", "big",
                                           "html", "other")]
    https = HttpsServer(ca, names, https_host, https_port).start()
    try:
        for name in names:
            dns_server.add_a(name, https_host)
        route(dns_server, "sts.test", (5, "mx.rogue.test", "127.0.0.22"),
              (10, "mx1.sts.test", "127.0.0.21"))
        route(dns_server, "badcert.test", (10, "mx.badcert.test", "127.0.0.23"))
        for name in ("redirect", "missing", "big", "html"):
            route(dns_server, f"{name}.test", (10, f"mx.{name}.test", specs[name][0]))
        for domain in ("sts", "badcert", "redirect", "missing", "big", "html"):
            dns_server.add_txt(f"_mta-sts.{domain}.test", "v=STSv1; id=1;", ttl=0)
        https.serve["mta-sts.sts.test"] = Served((ENFORCE + "mx: mx1.sts.test\n").encode())
        https.serve["mta-sts.badcert.test"] = Served((ENFORCE + "mx: mx.badcert.test\n").encode())
        # Each would defer its domain if it were taken: every one must be refused.
        nowhere = (ENFORCE + "mx: nowhere.test\n").encode()
        https.serve["mta-sts.other.test"] = Served(nowhere)
        https.serve["mta-sts.redirect.test"] = Served(b"", 301, headers={
            "Location": f"https://mta-sts.other.test:{https_port}/.well-known/mta-sts.txt"})
        https.serve["mta-sts.big.test"] = Served(nowhere + b"x_pad: " + b"a" * 70 * 1024 + b"\n")
        https.serve["mta-sts.html.test"] = Served(nowhere, content_type="text/html")
        engine = tls_engine(tmp_path, dns_server, port, write_ca(ca, tmp_path),
                            https_port=https_port)
        try:
            first = ["a1@sts.test", "b@badcert.test", "c@redirect.test", "d@missing.test",
                     "e@big.test", "f@html.test"]
            submit(engine, *first)
            seen = wait_for(tmp_path, *first)
            a1 = seen["a1@sts.test"]
            assert (a1["type"], a1["mx"], a1["tls_policy"], a1["tls_policy_mode"],
                    a1["tls_verified"]) == ("Delivery", "mx1.sts.test", "mta-sts", "enforce", True)
            b = seen["b@badcert.test"]
            assert (b["type"], b["status"], b["tls_policy"], b["tls_result"]) == (
                "TransientFailure", "4.7.5", "mta-sts", "certificate-host-mismatch")
            for rcpt in first[2:]:
                assert (seen[rcpt]["type"], seen[rcpt]["tls_policy"]) == (
                    "Delivery", "opportunistic"), seen[rcpt]
            assert https.fetches("mta-sts.other.test") == 0  # the redirect is not followed

            submit(engine, "a2@sts.test")  # the same id: the cached policy, no new fetch
            assert wait_for(tmp_path, "a2@sts.test")["a2@sts.test"]["mx"] == "mx1.sts.test"
            assert https.fetches("mta-sts.sts.test") == 1

            # The policy server goes away and the id changes: the cached policy holds.
            https.stop()
            dns_server.remove("_mta-sts.sts.test", "TXT")
            dns_server.add_txt("_mta-sts.sts.test", "v=STSv1; id=2;", ttl=0)
            submit(engine, "a3@sts.test")
            a3 = wait_for(tmp_path, "a3@sts.test")["a3@sts.test"]
            assert (a3["type"], a3["mx"], a3["tls_policy"]) == ("Delivery", "mx1.sts.test",
                                                                "mta-sts")

            # Back, with a new id and a policy that allows the preferred MX: fetched again.
            https = HttpsServer(ca, names, https_host, https_port).start()
            https.serve["mta-sts.sts.test"] = Served(
                (ENFORCE + "mx: mx1.sts.test\nmx: mx.rogue.test\n").encode())
            dns_server.remove("_mta-sts.sts.test", "TXT")
            dns_server.add_txt("_mta-sts.sts.test", "v=STSv1; id=3;", ttl=0)
            submit(engine, "a4@sts.test")
            a4 = wait_for(tmp_path, "a4@sts.test")["a4@sts.test"]
            assert (a4["type"], a4["mx"], a4["tls_policy"]) == ("Delivery", "mx.rogue.test",
                                                                "mta-sts")
            assert https.fetches("mta-sts.sts.test") == 1
        finally:
            engine.stop()
    finally:
        https.stop()
    assert sinks["rogue"].messages == 1  # a4 only: never contacted before the policy allowed it
    assert sinks["badcert"].messages == 0
    assert all(m.tls for m in sinks["mx1"].received)


# --- DANE -----------------------------------------------------------------------------------


def test_dane(tmp_path, dns_server, asyncio_sink_factory, ca) -> None:
    ok_context, ok_der = server_cert(ca, "mx.elsewhere.test")  # the wrong name: DANE-EE
    specs = {
        "dane-ok": ("127.0.0.31", ok_context),
        "dane-bad": ("127.0.0.32", server_context(ca, "mx.dane-bad.test")),
        "dane-noad": ("127.0.0.33", server_context(ca, "mx.dane-noad.test")),
        "dane-fail": ("127.0.0.34", server_context(ca, "mx.dane-fail.test")),
    }
    port, sinks = sinks_for(asyncio_sink_factory, specs)
    https_host = "127.0.0.51"
    https_port = free_port(https_host)
    https = HttpsServer(ca, ["mta-sts.dane-ok.test"], https_host, https_port).start()
    try:
        for name, (address, _) in specs.items():
            route(dns_server, f"{name}.test", (10, f"mx.{name}.test", address))
            dns_server.secure(f"{name}.test")  # the MX answers are authenticated
        tlsa = {name: f"_{port}._tcp.mx.{name}.test" for name in specs}
        dns_server.add_tlsa(tlsa["dane-ok"], 3, 1, 1, spki_sha256(ok_der))
        dns_server.add_tlsa(tlsa["dane-bad"], 3, 1, 1, secrets.token_bytes(32))
        dns_server.add_tlsa(tlsa["dane-noad"], 3, 1, 1, secrets.token_bytes(32))
        dns_server.add_tlsa(tlsa["dane-fail"], 3, 1, 1, secrets.token_bytes(32))
        for name in ("dane-ok", "dane-bad", "dane-fail"):
            dns_server.secure(tlsa[name])
        dns_server.fail(tlsa["dane-fail"], "servfail", "TLSA")
        # MTA-STS alone would defer dane-ok.test (its certificate names another host).
        dns_server.add_a("mta-sts.dane-ok.test", https_host)
        dns_server.add_txt("_mta-sts.dane-ok.test", "v=STSv1; id=1;", ttl=0)
        https.serve["mta-sts.dane-ok.test"] = Served((ENFORCE + "mx: mx.dane-ok.test\n").encode())
        engine = tls_engine(tmp_path, dns_server, port, write_ca(ca, tmp_path),
                            https_port=https_port, dns_extra={"dnssec_validating": True})
        recipients = [f"u@{name}.test" for name in specs]
        try:
            submit(engine, *recipients)
            seen = wait_for(tmp_path, *recipients)
            check = mta(engine.config_path, "tls", "check", "dane-ok.test", "--json", "--connect")
        finally:
            engine.stop()
    finally:
        https.stop()
    ok = seen["u@dane-ok.test"]
    assert (ok["type"], ok["tls_policy"], ok["tls_verified"]) == ("Delivery", "dane", True)
    bad = seen["u@dane-bad.test"]
    assert (bad["type"], bad["status"], bad["tls_policy"], bad["tls_result"]) == (
        "TransientFailure", "4.7.5", "dane", "tlsa-invalid")
    noad = seen["u@dane-noad.test"]  # TLSA without AD: ignored
    assert (noad["type"], noad["tls_policy"], noad["tls_verified"]) == (
        "Delivery", "opportunistic", True)
    fail = seen["u@dane-fail.test"]  # SERVFAIL: DANE cannot be ruled out
    assert (fail["type"], fail["status"], fail["tls_policy"]) == (
        "TransientFailure", "4.7.0", "dane")
    assert sinks["dane-bad"].messages == 0 and sinks["dane-fail"].sessions == 0
    assert check.returncode == 0, check.stderr
    shown = json.loads(check.stdout)
    assert shown["mx_authenticated"] is True
    assert shown["hosts"]["mx.dane-ok.test"]["policy"] == "dane"
    assert shown["verdict"] == "deliver to mx.dane-ok.test"
    [session] = shown["sessions"]
    assert (session["result"], session["tls_policy"], session["tls_verified"]) == (
        "ok", "dane", True)


# --- TLS reporting ------------------------------------------------------------------------


def test_tls_report_counts_the_sessions(tmp_path, dns_server, asyncio_sink_factory, ca) -> None:
    specs = {"a": ("127.0.0.41", server_context(ca, "mx.elsewhere.test")),
             "b": ("127.0.0.42", server_context(ca, "b.rpt.test")),
             "receiver": ("127.0.0.44", None)}
    port, sinks = sinks_for(asyncio_sink_factory, specs)
    https_host = "127.0.0.43"
    https_port = free_port(https_host)
    https = HttpsServer(ca, ["mta-sts.rpt.test", "tlsrpt.receiver.test"], https_host,
                        https_port).start()
    key = write_key(tmp_path, "reports.sender.test", "s1")
    try:
        route(dns_server, "rpt.test", (5, "a.rpt.test", "127.0.0.41"),
              (10, "b.rpt.test", "127.0.0.42"))
        route(dns_server, "receiver.test", (10, "mx.receiver.test", "127.0.0.44"))
        dns_server.add_a("mta-sts.rpt.test", https_host)
        dns_server.add_a("tlsrpt.receiver.test", https_host)
        dns_server.add_txt("_mta-sts.rpt.test", "v=STSv1; id=7;")
        https.serve["mta-sts.rpt.test"] = Served((ENFORCE + "mx: *.rpt.test\n").encode())
        dns_server.add_txt("_smtp._tls.rpt.test", "v=TLSRPTv1; rua=https://tlsrpt.receiver."
                           f"test:{https_port}/v1/report,mailto:tls@receiver.test")
        engine = tls_engine(
            tmp_path, dns_server, port, write_ca(ca, tmp_path), https_port=https_port,
            tlsrpt={"enabled": True, "reporting_domain": "reports.sender.test",
                    "organization": "Test Sender"},
            dkim={"keys": [{"domain": "reports.sender.test", "selector": "s1",
                            "key_file": key.config.key_file}]})
        recipients = [f"r{i}@rpt.test" for i in range(3)]
        try:
            submit(engine, *recipients)
            seen = wait_for(tmp_path, *recipients)
        finally:
            engine.stop()  # the last second's counts are flushed at the stop
        assert all(seen[r]["type"] == "Delivery" and seen[r]["mx"] == "b.rpt.test"
                   for r in recipients)
        failed, succeeded = sinks["a"].sessions, sinks["b"].sessions
        assert failed >= 1 and succeeded >= 1

        sent = mta(engine.config_path, "tls", "report", "--day", "today", "--json")
        assert sent.returncode == 0, sent.stderr
        [result] = json.loads(sent.stdout)
        assert result["sent"] == {u: "" for u in result["rua"]} and len(result["rua"]) == 2
        [post] = https.posts
        assert (post.path, post.content_type) == ("/v1/report", "application/tlsrpt+gzip")
        report = json.loads(gzip.decompress(post.body))
        assert set(report) == {"organization-name", "date-range", "contact-info", "report-id",
                               "policies"}
        assert report["organization-name"] == "Test Sender"
        assert report["contact-info"] == "tlsrpt-noreply@reports.sender.test"
        assert report["date-range"]["start-datetime"].endswith("T00:00:00Z")
        assert report["date-range"]["end-datetime"].endswith("T23:59:59Z")
        [entry] = report["policies"]
        assert entry["policy"] == {
            "policy-type": "sts", "policy-domain": "rpt.test",
            "policy-string": ["version: STSv1", "mode: enforce", "max_age: 86400",
                              "mx: *.rpt.test"], "mx-host": ["*.rpt.test"]}
        assert entry["summary"] == {"total-successful-session-count": succeeded,
                                    "total-failure-session-count": failed}
        [detail] = entry["failure-details"]
        assert detail == {"result-type": "certificate-host-mismatch",
                          "receiving-mx-hostname": "a.rpt.test", "receiving-ip": "127.0.0.41",
                          "failed-session-count": failed}

        # The mailto: copy was spooled: the engine delivers it, DKIM-signed.
        engine.start()
        try:
            assert wait_until(lambda: sinks["receiver"].accepted >= 1, timeout=30)
        finally:
            engine.stop()
    finally:
        https.stop()
    mail = sinks["receiver"].received[0]
    assert mail.rcpt_tos == ("tls@receiver.test",) and mail.mail_from == ""
    parsed = email.message_from_bytes(mail.data)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    assert parsed["TLS-Report-Domain"] == "rpt.test"
    assert parsed["TLS-Report-Submitter"] == "reports.sender.test"
    [attachment] = [p for p in parsed.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert attachment.get_filename().startswith("reports.sender.test!rpt.test!")
    mailed = json.loads(gzip.decompress(attachment.get_payload(decode=True)))
    assert mailed["policies"] == report["policies"]
    assert dkimpy_results(mail.data, [key.record]) == {("reports.sender.test", "s1"): "pass"}


# --- the bench's TLS sink -----------------------------------------------------------------


def test_sink_process_with_starttls_reports_arrivals(tmp_path, ca) -> None:
    """`bench run --tls`: sinks in their own processes, STARTTLS, arrivals on stdout."""
    import asyncio

    from bench.rig.sinks import AsyncioSinkProcess
    from mta.delivery.connection import ConnectSettings, Target, TlsRoute, connect
    from mta.delivery.tls.certs import load_trust_store
    from mta.delivery.tls.model import TlsMode
    from mta.delivery.tls.policy import decide
    from mta.delivery.tls.service import TlsChecker, handshake_context

    pem = tmp_path / "sink.pem"
    ca.issue_cert("mx.bench.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    checker = TlsChecker(handshake_context(), load_trust_store(write_ca(ca, tmp_path), False))
    plan = decide("d.test", TlsMode.REQUIRED, ["mx.bench.test"])
    with AsyncioSinkProcess("127.0.0.60", tls_cert=str(pem),
                            arrivals_header="X-Bench-Index") as sink:
        async def send() -> list[Any]:
            settings = ConnectSettings(sink.port, "c.test", 5.0, 5.0, tls=TlsRoute(plan, checker))
            conn, failures = await connect([Target("mx.bench.test", sink.host)], settings)
            assert conn is not None, failures
            results = await conn.send("a@b.test", ["x@d.test", "y@d.test"],
                                      b"X-Bench-Index: 42\r\nSubject: s\r\n\r\nbody\r\n")
            await conn.close()
            return [r.tls for r in results]

        fields = asyncio.run(send())
        assert wait_until(lambda: len(sink.received) == 1)
    assert fields[0]["tls_verified"] is True and fields[0]["tls_policy"] == "required"
    arrived = sink.received[0]
    assert arrived.data.startswith(b"X-Bench-Index: 42\r\n") and len(arrived.rcpt_tos) == 2
    assert arrived.accepted and arrived.tls
