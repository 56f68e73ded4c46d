"""The TLS policy's I/O around the plain decisions of mta/delivery/tls/policy.py.

- `TlsChecker`: the handshake's SSLContext (never verifying by itself), the trust store,
  and the verdict on every session (`judge`), counted for the metrics and TLS-RPT.
- `StsPolicies`: a domain's MTA-STS policy in effect: the TXT record, the LMDB cache,
  one HTTPS fetch per domain at a time, the cached policy kept while its server is
  unreachable (RFC 8461 5.1).
- `TlsPolicies`: a destination's `TlsPlan` (DANE lookups, MTA-STS, TLS-RPT record),
  reused for `[delivery] tls_policy_cache` seconds, one lookup per domain at a time.

mta/engine.py builds these with `make_tls` and hands them to the Deliverer.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import dns.name
import dns.rdatatype
from cryptography.x509.verification import Store

from mta.config import Config
from mta.delivery.tls.certs import load_trust_store
from mta.delivery.tls.http import EngineResolver, HttpsClient, https_context
from mta.delivery.tls.model import (
    DaneAnswer,
    Exclusion,
    HostPolicy,
    PeerInfo,
    ReportScope,
    SessionCounts,
    Tlsa,
    TlsMode,
    TlsPlan,
    Verdict,
)
from mta.delivery.tls.mtasts import (
    StsError,
    StsPolicy,
    StsRecord,
    parse_policy,
    parse_sts_record,
    sts_action,
)
from mta.delivery.tls.policy import decide, explicit_plan, judge, refused_verdict
from mta.delivery.tls.report import SessionLedger, parse_tlsrpt_record
from mta.delivery.tls.store import TlsStore

log = logging.getLogger("mta.delivery.tls")

LookupFn = Callable[[dns.name.Name, dns.rdatatype.RdataType], Awaitable[Any]]
Submit = Callable[[Callable[[Any], Any]], Awaitable[Any]]
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def handshake_context(min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """The SMTP client's context: encrypt, never verify during the handshake (the
    verdict on the certificate comes after, from `judge`, so one handshake serves all)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = VERSIONS[min_version]
    return context


async def txt_strings(lookup: LookupFn, name: str) -> tuple[list[str], Any]:
    """The TXT strings at `name` (each record's strings joined) and the Lookup."""
    found = await lookup(dns.name.from_text(name), dns.rdatatype.TXT)
    texts = [b"".join(r.strings).decode("utf-8", "replace") for r in found.records]
    return texts, found


# --- the verdict on sessions ------------------------------------------------------------


class TlsChecker:
    """Decides every session (`check`) and counts it: by policy and result for the
    metrics (`sessions`), by policy domain for TLS-RPT (`ledger`, when reporting)."""

    def __init__(self, context: ssl.SSLContext, store: Store | None,
                 ledger: SessionLedger | None = None, source_address: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.context = context
        self.store = store
        self.ledger = ledger
        self.source_address = source_address
        self.clock = clock
        self.sessions = SessionCounts()

    def check(self, policy: HostPolicy, host: str, address: str, peer: PeerInfo,
              sending_ip: str = "") -> Verdict:
        """`sending_ip`: the address the session was bound to (an egress source's);
        empty: [delivery] source_address."""
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
        verdict = judge(policy, host, peer, self.store, now)
        self.record(policy.report, verdict, host, address, sending_ip)
        return verdict

    def record(self, scope: ReportScope | None, verdict: Verdict, host: str = "",
               address: str = "", sending_ip: str = "") -> None:
        self.sessions.add(verdict)
        if self.ledger is not None and scope is not None:
            self.ledger.add(scope, verdict, mx=host, receiving_ip=address,
                            sending_ip=sending_ip or self.source_address, now=self.clock())

    def refused(self, exclusion: Exclusion) -> Verdict:
        """An item deferred because its plan leaves no MX host: counted, and returned."""
        verdict = refused_verdict(exclusion)
        self.sessions.add(verdict)
        return verdict


# --- MTA-STS -----------------------------------------------------------------------------


@dataclass
class StsOutcome:
    """A domain's MTA-STS state now: the policy in effect (or None) and how it came."""

    policy: StsPolicy | None
    record: StsRecord
    source: str  # "cache", "fetched", "none"
    error: StsError | None = None
    notes: list[str] = field(default_factory=list)


class StsPolicies:
    def __init__(self, lookup: LookupFn, https: HttpsClient, store: TlsStore | None,
                 submit: Submit | None, port: int = 443, timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.lookup = lookup
        self.https = https
        self.store = store
        self.submit = submit
        self.port = port
        self.timeout = timeout
        self.clock = clock
        self.fetches = 0  # HTTPS fetches made (tests, `mta tls check`)
        self._memory: dict[str, StsPolicy] = {}
        self._inflight: dict[str, asyncio.Future[StsOutcome]] = {}

    async def record(self, domain: str) -> StsRecord:
        texts, found = await txt_strings(self.lookup, f"_mta-sts.{domain}")
        if found.outcome == "tempfail":
            return StsRecord(None, f"the _mta-sts TXT lookup failed: {found.detail}", True)
        return parse_sts_record(texts)

    def cached(self, domain: str) -> StsPolicy | None:
        policy = self._memory.get(domain)
        if policy is None and self.store is not None:
            policy = self.store.sts_policy(domain)
            if policy is not None:
                self._memory[domain] = policy
        return policy

    async def current(self, domain: str) -> StsOutcome:
        """The policy in effect for `domain`; concurrent calls share one lookup and fetch."""
        pending = self._inflight.get(domain)
        if pending is None:
            pending = asyncio.ensure_future(self._current(domain))
            self._inflight[domain] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(domain, None))
        return await asyncio.shield(pending)

    async def _current(self, domain: str) -> StsOutcome:
        now = self.clock()
        record = await self.record(domain)
        cached = self.cached(domain)
        notes = [record.problem] if record.problem else []
        action = sts_action(record, cached, now)
        if action == "cached":
            assert cached is not None
            notes.append(f"MTA-STS policy id {cached.id} cached until "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(cached.expires))}")
            return StsOutcome(cached, record, "cache", notes=notes)
        if action == "none":
            if record.id is None and not record.problem:
                notes.append(f"no MTA-STS record at _mta-sts.{domain}")
            return StsOutcome(None, record, "none", notes=notes)
        assert record.id is not None
        try:
            self.fetches += 1
            text = await self.https.fetch_policy(domain, self.port, self.timeout)
            policy = parse_policy(domain, record.id, text, now)
        except StsError as exc:
            fresh = cached is not None and cached.expires > now
            notes.append(f"MTA-STS policy fetch failed ({exc.result}): {exc.detail}")
            log.warning("MTA-STS policy of %s: %s", domain, exc.detail)
            if fresh:  # RFC 8461 5.1: a valid cached policy still holds
                notes.append(f"the cached policy id {cached.id} is still enforced")  # type: ignore[union-attr]
                return StsOutcome(cached, record, "cache", exc, notes)
            return StsOutcome(None, record, "none", exc, notes)
        self._memory[domain] = policy
        if self.store is not None and self.submit is not None:
            try:
                await self.submit(self.store.put_sts_op(policy))
            except Exception:
                log.exception("could not keep the MTA-STS policy of %s", domain)
        notes.append(f"MTA-STS policy id {policy.id} fetched: mode {policy.mode}, "
                     f"mx {', '.join(policy.mx) or '-'}, max_age {policy.max_age}")
        return StsOutcome(policy, record, "fetched", notes=notes)


# --- a destination's plan ------------------------------------------------------------------


class TlsPolicies:
    """The TLS plan of each destination domain, from config, DNS and MTA-STS."""

    def __init__(self, cfg: Config, lookup: LookupFn, checker: TlsChecker,
                 sts: StsPolicies | None, clock: Callable[[], float] = time.monotonic) -> None:
        d = cfg.delivery
        self.checker = checker
        self.lookup = lookup
        self.sts = sts
        self.default_mode = TlsMode(d.tls)
        self.explicit = {name.lower().rstrip("."): TlsMode(p.tls) for name, p in d.domains.items()}
        self.dane = d.dane and cfg.dns.dnssec_validating
        self.port = d.port
        self.reporting = checker.ledger is not None
        self.cache_ttl = d.tls_policy_cache
        self.clock = clock
        self._plans: dict[str, tuple[float, tuple[Any, ...], TlsPlan]] = {}
        self._inflight: dict[tuple[Any, ...], asyncio.Future[TlsPlan]] = {}

    async def plan(self, domain: str, hosts: list[str], secure: bool) -> TlsPlan:
        """The plan for `domain` with these MX hosts (`secure`: the MX answer was
        DNSSEC-authenticated); reused for tls_policy_cache seconds."""
        domain = domain.lower().rstrip(".")
        mode = self.explicit.get(domain)
        if mode is not None:
            return explicit_plan(domain, mode, hosts)
        if domain.startswith("["):  # an address literal: no names to look anything up for
            return decide(domain, self.default_mode, hosts)
        key = (domain, tuple(hosts), secure)
        now = self.clock()
        cached = self._plans.get(domain)
        if cached is not None and cached[0] > now and cached[1] == key:
            return cached[2]
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self.build(domain, hosts, secure))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        plan = await asyncio.shield(pending)
        if self.cache_ttl > 0:
            if len(self._plans) > 100_000:
                self._plans.clear()
            self._plans[domain] = (self.clock() + self.cache_ttl, key, plan)
        return plan

    async def build(self, domain: str, hosts: list[str], secure: bool) -> TlsPlan:
        """Look everything up and decide (no cache): also `mta tls check`."""
        mode = self.explicit.get(domain)
        if mode is not None:
            return explicit_plan(domain, mode, hosts)
        notes: list[str] = []
        sts_task = asyncio.ensure_future(self.sts.current(domain)) if self.sts else None
        report_task = asyncio.ensure_future(self._rua(domain)) if self.reporting else None
        dane: dict[str, DaneAnswer] = {}
        if self.dane:
            if secure:
                answers = await asyncio.gather(*(self._tlsa(h) for h in hosts))
                dane = {h.rstrip(".").lower(): a for h, a in zip(hosts, answers, strict=True)}
                notes += [f"{h}: TLSA {a.status}" + (f" ({a.detail})" if a.detail else "")
                          for h, a in dane.items()]
            else:
                notes.append("the MX answer is not DNSSEC-authenticated: DANE does not apply")
        else:
            notes.append("DANE off ([delivery] dane, [dns] dnssec_validating)")
        sts = await sts_task if sts_task is not None else None
        rua = await report_task if report_task is not None else ()
        if sts is not None:
            notes += sts.notes
        if rua:
            notes.append(f"TLS reports requested: {', '.join(rua)}")
        plan = decide(domain, self.default_mode, hosts, sts=sts.policy if sts else None,
                      dane=dane, reporting=bool(rua), notes=notes)
        if rua and sts is not None and sts.error is not None:
            scope = (ReportScope(domain, "sts", sts.policy.lines, sts.policy.mx)
                     if sts.policy else ReportScope(domain, "sts"))
            self.checker.record(scope, Verdict(False, "mta-sts", result=sts.error.result))
        for excluded in plan.excluded:
            if excluded.report is not None and excluded.result:
                self.checker.record(excluded.report,
                                    Verdict(False, "dane", result=excluded.result), excluded.host)
        return plan

    async def _tlsa(self, host: str) -> DaneAnswer:
        name = f"_{self.port}._tcp.{host.rstrip('.')}"
        found = await self.lookup(dns.name.from_text(name), dns.rdatatype.TLSA)
        if found.outcome == "tempfail":
            return DaneAnswer("servfail", detail=found.detail or "SERVFAIL")
        if found.outcome != "answer":
            return DaneAnswer("none")
        if not found.secure:
            return DaneAnswer("none", detail="answer not DNSSEC-authenticated (no AD): ignored")
        records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in found.records)
        return DaneAnswer("records", records, ", ".join(r.text[:40] for r in records))

    async def _rua(self, domain: str) -> tuple[str, ...]:
        texts, _ = await txt_strings(self.lookup, f"_smtp._tls.{domain}")
        return parse_tlsrpt_record(texts)


# --- assembly ------------------------------------------------------------------------------


@dataclass
class TlsParts:
    """What the engine wires: the plans, the checker, the MTA-STS cache, the reporter."""

    policies: TlsPolicies
    checker: TlsChecker
    https: HttpsClient
    store: TlsStore | None = None
    sts: StsPolicies | None = None
    ledger: SessionLedger | None = None


def build_tls(cfg: Config, lookup: LookupFn, store: TlsStore | None, submit: Submit | None
              ) -> TlsParts:
    """The TLS policy's parts for a worker (or a command: `store` may be read-only and
    `submit` None, then fetched policies are not kept)."""
    d = cfg.delivery
    trust = load_trust_store(d.tls_ca_file, d.tls_system_ca)
    ledger = SessionLedger() if cfg.tlsrpt.enabled else None
    checker = TlsChecker(handshake_context(d.tls_min_version), trust, ledger, d.source_address)
    https = HttpsClient(EngineResolver(lookup, d.allow_loopback_mx),
                        https_context(d.tls_ca_file, d.tls_system_ca,
                                      VERSIONS[d.tls_min_version]))
    sts = (StsPolicies(lookup, https, store, submit, d.mta_sts_port, d.mta_sts_fetch_timeout)
           if d.mta_sts else None)
    return TlsParts(TlsPolicies(cfg, lookup, checker, sts), checker, https, store, sts, ledger)
