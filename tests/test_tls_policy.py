"""The outbound TLS policy as plain functions (mta/delivery/tls): no sockets, no DNS.

Certificates come from a CA made here (trustme); the decisions are `decide` (a domain's
plan from the mode, DANE answers and the MTA-STS policy) and `judge` (one session)."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Store

from mta.delivery.mx import Lookup
from mta.delivery.tls.certs import failure_type, match_dane, verify_pkix
from mta.delivery.tls.model import (
    CERT_EXPIRED,
    CERT_HOST_MISMATCH,
    CERT_NOT_TRUSTED,
    DANE,
    MTA_STS,
    NONE,
    OPPORTUNISTIC,
    REFUSED,
    REQUIRED,
    UNVERIFIED,
    VERIFIED,
    Check,
    DaneAnswer,
    PeerInfo,
    ReportScope,
    Tlsa,
    TlsMode,
    Verdict,
)
from mta.delivery.tls.mtasts import (
    MAX_AGE_LIMIT,
    StsError,
    StsRecord,
    mx_matches,
    parse_policy,
    parse_sts_record,
    sts_action,
)
from mta.delivery.tls.policy import decide, explicit_plan, judge, mode_policy, refusal
from mta.delivery.tls.report import (
    PolicyCounts,
    SessionLedger,
    build_report,
    compress,
    parse_tlsrpt_record,
    report_filename,
)
from mta.delivery.tls.service import StsPolicies
from mta.delivery.tls.store import TlsStore
from mta.queue.spool import Spool

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def chain_of(ca: trustme.CA, *names: str, **kwargs: object) -> tuple[bytes, ...]:
    leaf = ca.issue_cert(*names, **kwargs)
    return tuple(der(b.bytes()) for b in leaf.cert_chain_pems)


def store_of(ca: trustme.CA) -> Store:
    return Store([x509.load_pem_x509_certificate(ca.cert_pem.bytes())])


def tlsa_for(chain_der: bytes, usage: int = 3, selector: int = 1, mtype: int = 1) -> Tlsa:
    cert = x509.load_der_x509_certificate(chain_der)
    data = chain_der if selector == 0 else cert.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    digest = {0: lambda d: d, 1: lambda d: hashlib.sha256(d).digest(),
              2: lambda d: hashlib.sha512(d).digest()}[mtype](data)
    return Tlsa(usage, selector, mtype, digest)


# --- certificates ------------------------------------------------------------------------


def test_pkix_verification_and_the_failure_types(ca: trustme.CA) -> None:
    good = chain_of(ca, "mx.good.test")
    assert verify_pkix(good, "mx.good.test", store_of(ca), NOW) is None
    assert verify_pkix(good, "MX.Good.Test.", store_of(ca), NOW) is None
    wrong = verify_pkix(good, "mx.other.test", store_of(ca), NOW)
    assert wrong and failure_type(wrong) == CERT_HOST_MISMATCH
    old = chain_of(ca, "mx.old.test", not_before=datetime.datetime(2020, 1, 1),
                   not_after=datetime.datetime(2021, 1, 1))
    expired = verify_pkix(old, "mx.old.test", store_of(ca), NOW)
    assert expired and failure_type(expired) == CERT_EXPIRED
    stranger = verify_pkix(good, "mx.good.test", store_of(trustme.CA()), NOW)
    assert stranger and failure_type(stranger) == CERT_NOT_TRUSTED
    assert verify_pkix((), "mx.good.test", store_of(ca), NOW) == "the server sent no certificate"


def test_wildcards_cover_one_label(ca: trustme.CA) -> None:
    chain = chain_of(ca, "*.mail.test")
    assert verify_pkix(chain, "mx1.mail.test", store_of(ca), NOW) is None
    assert verify_pkix(chain, "a.b.mail.test", store_of(ca), NOW) is not None
    assert verify_pkix(chain, "mail.test", store_of(ca), NOW) is not None


@pytest.mark.parametrize(("selector", "mtype"), [(1, 1), (0, 1), (1, 2), (0, 2), (1, 0), (0, 0)])
def test_dane_ee_matches_by_certificate_or_key_and_any_digest(ca: trustme.CA, selector: int,
                                                            mtype: int) -> None:
    chain = chain_of(ca, "mx.dane.test")
    record = tlsa_for(chain[0], 3, selector, mtype)
    assert match_dane([record], chain, "mx.dane.test", NOW) is None
    # DANE-EE: neither the name nor the dates count (RFC 7672 3.1.1)
    assert match_dane([record], chain, "some.other.name", NOW) is None
    other = chain_of(ca, "mx.dane.test")
    assert match_dane([record], other, "mx.dane.test", NOW) is not None


def test_dane_ta_needs_the_chain_and_the_name(ca: trustme.CA) -> None:
    leaf = chain_of(ca, "mx.ta.test")
    ca_der = der(ca.cert_pem.bytes())
    chain = (*leaf, ca_der)  # the server sends its trust anchor (RFC 7672 3.1.2)
    for selector, mtype in ((0, 1), (1, 1), (1, 2)):
        record = tlsa_for(ca_der, 2, selector, mtype)
        assert match_dane([record], chain, "mx.ta.test", NOW) is None
        assert "does not verify" in (match_dane([record], chain, "mx.wrong.test", NOW) or "")
        assert match_dane([record], leaf, "mx.ta.test", NOW) is not None  # anchor not sent
    stranger = der(trustme.CA().cert_pem.bytes())
    assert match_dane([tlsa_for(stranger, 2, 0, 1)], chain, "mx.ta.test", NOW) is not None


def test_unusable_tlsa_records(ca: trustme.CA) -> None:
    chain = chain_of(ca, "mx.dane.test")
    pkix_ee = tlsa_for(chain[0], 1, 1, 1)  # PKIX-EE(1): not for SMTP
    assert not pkix_ee.usable and Tlsa(3, 1, 9, b"x").usable is False
    assert match_dane([pkix_ee], chain, "mx.dane.test", NOW) == "no usable TLSA record"


# --- MTA-STS -----------------------------------------------------------------------------


POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mail.example.test\r\nmax_age: 86400\r\n"


def test_sts_record() -> None:
    assert parse_sts_record(["v=STSv1; id=20240101T000000;"]) == StsRecord("20240101T000000")
    assert parse_sts_record(["v=spf1 -all", "v=STSv1;id=abc"]).id == "abc"
    assert parse_sts_record(["v=spf1 -all"]).id is None
    several = parse_sts_record(["v=STSv1; id=a", "v=STSv1; id=b"])
    assert several.id is None and "more than one" in several.problem
    assert parse_sts_record(["v=STSv1; id=not-valid!"]).id is None
    assert parse_sts_record(["v=STSv1; id=" + "a" * 33]).id is None


def test_sts_policy_parsing() -> None:
    policy = parse_policy("example.test", "id1", POLICY, 1000.0)
    assert (policy.mode, policy.mx, policy.max_age) == (
        "enforce", ("mx1.example.test", "*.mail.example.test"), 86400)
    assert policy.expires == 87400.0 and len(policy.lines) == 5
    assert policy.matches("MX1.example.test.") and policy.matches("a.mail.example.test")
    assert not policy.matches("mail.example.test") and not policy.matches("a.b.mail.example.test")
    lf = parse_policy("example.test", "id1", POLICY.replace("\r\n", "\n") + "extension: x\n", 0)
    assert lf.mx == policy.mx
    capped = parse_policy("e.test", "i", "version: STSv1\nmode: none\nmax_age: 9999999999\n", 0)
    assert capped.max_age == MAX_AGE_LIMIT and capped.mx == ()


@pytest.mark.parametrize("text", [
    "mode: enforce\nmx: a.test\nmax_age: 1\n",  # no version
    "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n",
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n<html>\n",
    "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",
])
def test_bad_policies_are_refused(text: str) -> None:
    with pytest.raises(StsError) as err:
        parse_policy("e.test", "i", text, 0)
    assert err.value.result == "sts-policy-invalid"


def test_mx_patterns() -> None:
    assert mx_matches("*.example.test", "mx.example.test")
    assert not mx_matches("*.example.test", "example.test")
    assert not mx_matches("*.example.test", "a.mx.example.test")
    assert mx_matches("mx.example.test.", "MX.EXAMPLE.TEST")


def test_when_a_policy_is_fetched_kept_or_dropped() -> None:
    cached = parse_policy("e.test", "id1", POLICY, 1000.0)  # expires at 87400
    assert sts_action(StsRecord("id1"), None, 2000.0) == "fetch"
    assert sts_action(StsRecord("id1"), cached, 2000.0) == "cached"
    assert sts_action(StsRecord("id2"), cached, 2000.0) == "fetch"  # a new id
    assert sts_action(StsRecord("id1"), cached, 90000.0) == "fetch"  # expired
    # the record gone or its lookup failing: a fresh cached policy still holds (RFC 8461 5.1)
    assert sts_action(StsRecord(None), cached, 2000.0) == "cached"
    assert sts_action(StsRecord(None, "", tempfail=True), cached, 2000.0) == "cached"
    assert sts_action(StsRecord(None), cached, 90000.0) == "none"
    assert sts_action(StsRecord(None), None, 2000.0) == "none"


# --- the plan ------------------------------------------------------------------------------


def test_modes() -> None:
    assert mode_policy(TlsMode.OPPORTUNISTIC).check is Check.RECORD
    assert mode_policy(TlsMode.OPPORTUNISTIC_INSECURE).check is Check.NONE
    required = mode_policy(TlsMode.REQUIRED)
    assert required.require_tls and required.check is Check.ENFORCE and required.policy == REQUIRED
    insecure = mode_policy(TlsMode.REQUIRED_INSECURE)
    assert insecure.require_tls and insecure.check is Check.NONE
    disabled = mode_policy(TlsMode.DISABLED)
    assert not disabled.starttls and disabled.policy == NONE


def test_dane_wins_over_mta_sts_which_wins_over_the_mode(ca: trustme.CA) -> None:
    sts = parse_policy("d.test", "i", "version: STSv1\nmode: enforce\nmx: *.d.test\nmax_age: 9\n", 0)
    record = tlsa_for(chain_of(ca, "x")[0])
    dane = {"a.d.test": DaneAnswer("records", (record,)),
            "b.d.test": DaneAnswer("none"),
            "c.elsewhere.test": DaneAnswer("records", (record,)),
            "d.elsewhere.test": DaneAnswer("none")}
    hosts = ["a.d.test", "b.d.test", "c.elsewhere.test", "d.elsewhere.test"]
    plan = decide("d.test", TlsMode.OPPORTUNISTIC, hosts, sts=sts, dane=dane)
    a, b, c = plan.host("a.d.test"), plan.host("b.d.test"), plan.host("c.elsewhere.test")
    assert a is not None and (a.policy, a.check, a.tlsa) == (DANE, Check.DANE, (record,))
    assert b is not None and (b.policy, b.mode, b.check, b.require_tls) == (
        MTA_STS, "enforce", Check.ENFORCE, True)
    assert c is not None and c.policy == DANE  # DANE-authenticated: MTA-STS's mx list aside
    assert plan.host("d.elsewhere.test") is None  # not in the enforced policy
    assert [e.host for e in plan.excluded] == ["d.elsewhere.test"]
    no_sts = decide("d.test", TlsMode.OPPORTUNISTIC, ["b.d.test"], dane=dane)
    assert no_sts.host("b.d.test") == mode_policy(TlsMode.OPPORTUNISTIC)


def test_tlsa_failure_excludes_the_host_and_no_host_left_defers() -> None:
    plan = decide("d.test", TlsMode.OPPORTUNISTIC, ["mx.d.test"],
                  dane={"mx.d.test": DaneAnswer("servfail", detail="SERVFAIL")})
    stop = refusal(plan)
    assert plan.hosts == () and stop is not None
    assert (stop.policy, stop.status, stop.result) == (DANE, "4.7.0", "dnssec-invalid")
    unusable = decide("d.test", TlsMode.OPPORTUNISTIC, ["mx.d.test"],
                      dane={"mx.d.test": DaneAnswer("records", (Tlsa(1, 1, 1, b"x"),))})
    policy = unusable.host("mx.d.test")
    assert policy is not None and policy.require_tls and policy.check is Check.NONE


def test_testing_and_none_policies() -> None:
    testing = parse_policy("d.test", "i", "version: STSv1\nmode: testing\nmx: a.d.test\nmax_age: 9\n", 0)
    plan = decide("d.test", TlsMode.REQUIRED, ["a.d.test", "z.other.test"], sts=testing)
    a, z = plan.host("a.d.test"), plan.host("z.other.test")
    assert a is not None and (a.policy, a.mode, a.require_tls, a.check) == (
        MTA_STS, "testing", False, Check.RECORD)
    assert z is not None and z.policy == MTA_STS and not plan.excluded
    none = parse_policy("d.test", "i", "version: STSv1\nmode: none\nmax_age: 9\n", 0)
    plan = decide("d.test", TlsMode.REQUIRED, ["a.d.test"], sts=none)
    assert plan.host("a.d.test") == mode_policy(TlsMode.REQUIRED)


def test_an_explicit_domain_gets_its_mode_only() -> None:
    plan = explicit_plan("bank.test", TlsMode.REQUIRED, ["mx.bank.test"])
    assert plan.host("mx.bank.test") == mode_policy(TlsMode.REQUIRED)
    assert "not looked up" in plan.notes[0]


def test_plans_share_pools_only_when_equal() -> None:
    one = decide("a.test", TlsMode.OPPORTUNISTIC, ["mx.hosting.test"])
    two = decide("b.test", TlsMode.OPPORTUNISTIC, ["mx.hosting.test"])
    assert one.key == two.key  # same requirements: one pool, shared connections
    reported = decide("b.test", TlsMode.OPPORTUNISTIC, ["mx.hosting.test"], reporting=True)
    required = decide("c.test", TlsMode.REQUIRED, ["mx.hosting.test"])
    assert len({one.key, reported.key, required.key}) == 3


# --- one session ---------------------------------------------------------------------------


def tls_peer(chain: tuple[bytes, ...]) -> PeerInfo:
    return PeerInfo(True, True, "TLSv1.3", "TLS_AES_256_GCM_SHA384", chain)


def test_judging_sessions(ca: trustme.CA) -> None:
    store = store_of(ca)
    good, wrong = chain_of(ca, "mx.good.test"), chain_of(ca, "mx.wrong.test")
    required = mode_policy(TlsMode.REQUIRED)
    ok = judge(required, "mx.good.test", tls_peer(good), store, NOW)
    assert (ok.allow, ok.verified, ok.outcome) == (True, True, VERIFIED)
    assert ok.fields() == {"tls": True, "tls_policy": "required", "tls_version": "TLSv1.3",
                           "tls_cipher": "TLS_AES_256_GCM_SHA384", "tls_verified": True,
                           "tls_policy_mode": "required"}
    bad = judge(required, "mx.good.test", tls_peer(wrong), store, NOW)
    assert (bad.allow, bad.status, bad.result, bad.outcome) == (
        False, "4.7.5", CERT_HOST_MISMATCH, REFUSED)
    plain = judge(required, "mx.good.test", PeerInfo(False), store, NOW)
    assert (plain.allow, plain.status, plain.result) == (False, "4.7.10", "starttls-not-supported")
    opportunistic = mode_policy(TlsMode.OPPORTUNISTIC)
    recorded = judge(opportunistic, "mx.good.test", tls_peer(wrong), store, NOW)
    assert (recorded.allow, recorded.verified, recorded.outcome) == (True, False, UNVERIFIED)
    assert "does not verify" in recorded.reason
    assert judge(opportunistic, "h", PeerInfo(False), store, NOW).outcome == "plain"
    unchecked = judge(mode_policy(TlsMode.OPPORTUNISTIC_INSECURE), "h", tls_peer(wrong), None, NOW)
    assert (unchecked.allow, unchecked.verified) == (True, None)
    # STARTTLS was sent and TLS did not come up: never plain text, whatever the mode
    for mode in TlsMode:
        failed = judge(mode_policy(mode), "h", PeerInfo(True, handshake_error="TLS handshake "
                                                         "with h failed: boom"), store, NOW)
        assert not failed.allow and failed.status == "4.7.0"
    refused = judge(opportunistic, "h", PeerInfo(True, handshake_error="STARTTLS refused",
                                                 starttls_refused=True), store, NOW)
    assert not refused.allow and refused.result == "starttls-not-supported"


def test_judging_dane_sessions(ca: trustme.CA) -> None:
    chain = chain_of(ca, "not.the.mx.name")
    plan = decide("d.test", TlsMode.OPPORTUNISTIC, ["mx.d.test"],
                  dane={"mx.d.test": DaneAnswer("records", (tlsa_for(chain[0]),))})
    policy = plan.host("mx.d.test")
    assert policy is not None
    ok = judge(policy, "mx.d.test", tls_peer(chain), None, NOW)
    assert ok.allow and ok.verified and ok.policy == DANE
    other = judge(policy, "mx.d.test", tls_peer(chain_of(ca, "mx.d.test")), None, NOW)
    assert (other.allow, other.result, other.status) == (False, "tlsa-invalid", "4.7.5")
    none = judge(policy, "mx.d.test", PeerInfo(False), None, NOW)
    assert not none.allow and none.result == "dane-required"


# --- TLS reporting ---------------------------------------------------------------------------


def test_tlsrpt_record() -> None:
    assert parse_tlsrpt_record(["v=TLSRPTv1; rua=mailto:r@e.test,https://r.e.test/x"]) == (
        "mailto:r@e.test", "https://r.e.test/x")
    assert parse_tlsrpt_record(["v=TLSRPTv1;rua=http://plain.test/x"]) == ()
    assert parse_tlsrpt_record(["v=TLSRPTv1; rua=mailto:a@e.test", "v=TLSRPTv1; rua=x"]) == ()
    assert parse_tlsrpt_record(["v=spf1"]) == ()


def test_the_report_has_the_rfc_fields() -> None:
    scope = ReportScope("e.test", "sts", ("version: STSv1", "mode: enforce", "mx: *.e.test",
                                          "max_age: 86400"), ("*.e.test",))
    ledger = SessionLedger()
    now = datetime.datetime(2026, 3, 4, 12, tzinfo=datetime.UTC).timestamp()
    for _ in range(3):
        ledger.add(scope, Verdict(True, MTA_STS, verified=True), mx="b.e.test", now=now)
    ledger.add(scope, Verdict(False, MTA_STS, result=CERT_EXPIRED), mx="a.e.test",
               receiving_ip="192.0.2.1", sending_ip="198.51.100.1", now=now)
    [(key, counts)] = ledger.take().items()
    assert key[0] == "2026-03-04" and ledger.pending == {}
    assert PolicyCounts.from_record(counts.to_record()).to_record() == counts.to_record()
    report = build_report("e.test", "2026-03-04", [counts], organization="Sender Org",
                          contact="tlsrpt@s.test", report_id="r1")
    assert report["date-range"] == {"start-datetime": "2026-03-04T00:00:00Z",
                                    "end-datetime": "2026-03-04T23:59:59Z"}
    assert (report["organization-name"], report["contact-info"], report["report-id"]) == (
        "Sender Org", "tlsrpt@s.test", "r1")
    [entry] = report["policies"]
    assert entry["policy"] == {"policy-type": "sts", "policy-domain": "e.test",
                               "policy-string": list(scope.strings), "mx-host": ["*.e.test"]}
    assert entry["summary"] == {"total-successful-session-count": 3,
                                "total-failure-session-count": 1}
    assert entry["failure-details"] == [{
        "result-type": "certificate-expired", "failed-session-count": 1,
        "sending-mta-ip": "198.51.100.1", "receiving-mx-hostname": "a.e.test",
        "receiving-ip": "192.0.2.1"}]
    assert json.loads(gzip.decompress(compress(report))) == report
    assert report_filename("s.test", "e.test", "2026-03-04", "u") == (
        "s.test!e.test!1772582400!1772668799!u.json.gz")


# --- the I/O around them, with fakes for DNS and HTTPS (and a real LMDB) ----------------------


class FakeLookup:
    """TXT answers by name; counts the lookups."""

    def __init__(self, txt: dict[str, list[str]]) -> None:
        self.txt = txt
        self.count = 0

    async def __call__(self, name: Any, rdtype: Any) -> Any:
        self.count += 1
        texts = self.txt.get(name.to_text(omit_final_dot=True), [])
        records = tuple(SimpleNamespace(strings=[t.encode()]) for t in texts)
        return Lookup("answer" if records else "nxdomain", records)


class FakeHttps:
    def __init__(self, text: str, fail: bool = False) -> None:
        self.text = text
        self.fail = fail
        self.fetches = 0

    async def fetch_policy(self, domain: str, port: int, timeout: float) -> str:
        self.fetches += 1
        await asyncio.sleep(0.01)  # concurrent callers arrive while this one is under way
        if self.fail:
            raise StsError("sts-policy-fetch-error", "connection refused")
        return self.text


def test_one_fetch_per_domain_at_a_time_and_the_policy_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    store = TlsStore(spool)

    async def submit(op: Any) -> Any:
        return spool.apply([op])[0]

    lookup = FakeLookup({"_mta-sts.e.test": ["v=STSv1; id=1"]})
    https = FakeHttps(POLICY)

    async def scenario() -> None:
        sts = StsPolicies(lookup, https, store, submit)  # type: ignore[arg-type]
        outcomes = await asyncio.gather(*(sts.current("e.test") for _ in range(20)))
        assert https.fetches == 1 and all(o.policy == outcomes[0].policy for o in outcomes)
        assert outcomes[0].source == "fetched" and outcomes[0].policy is not None
        # another worker, or after a restart: the policy comes from LMDB, no fetch
        other = StsPolicies(lookup, FakeHttps(POLICY, fail=True), store, submit)  # type: ignore[arg-type]
        kept = await other.current("e.test")
        assert kept.source == "cache" and kept.policy == outcomes[0].policy
        # a new id, and the policy server down: the cached policy still holds
        lookup.txt["_mta-sts.e.test"] = ["v=STSv1; id=2"]
        held = await other.current("e.test")
        assert held.source == "cache" and held.error is not None and held.policy is not None
        assert held.policy.id == "1"

    try:
        asyncio.run(scenario())
    finally:
        spool.close()


def test_report_counts_are_merged_in_lmdb_and_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    store = TlsStore(spool)
    scope = ReportScope("e.test", "no-policy-found")
    try:
        for _ in range(2):  # two workers' flushes of the same day and policy
            ledger = SessionLedger()
            ledger.add(scope, Verdict(True, OPPORTUNISTIC, verified=True), now=86_400.0 * 3)
            ledger.add(scope, Verdict(False, OPPORTUNISTIC, result="validation-failure"),
                       mx="mx.e.test", now=86_400.0 * 3)
            spool.apply([store.add_counts_op(ledger.take())])
        assert store.days() == ["1970-01-04"]
        [counts] = store.day_counts("1970-01-04")["e.test"]
        assert (counts.success, counts.failed) == (2, 2)
        spool.apply([store.drop_op("1970-01-04", "e.test")])
        assert store.days() == []
    finally:
        spool.close()
