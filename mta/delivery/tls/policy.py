"""The outbound TLS policy decision, as plain functions (no sockets, no DNS, no HTTP).

`decide` makes a destination's `TlsPlan` from what was looked up: the configured mode,
the MX hosts, the MTA-STS policy in effect, each MX host's TLSA answer, and whether the
domain asks for TLS reports. Per MX host, in order (RFC 8461 section 2, RFC 7672):

1. an authenticated TLSA RRset (DNSSEC, AD from a validating resolver): DANE. TLS is
   required and the certificate must match a usable record (none usable: TLS without
   a check, RFC 7672 2.2); a failed TLSA lookup (SERVFAIL) excludes the host.
2. an MTA-STS policy: `enforce` uses only the hosts matching its `mx` patterns, with
   TLS required and a certificate valid for the host name; `testing` delivers as
   opportunistic and records failures; `none` is no policy.
3. the configured mode (`[delivery] tls`, or the domain's own in `[delivery.domains]`;
   a domain configured there gets exactly its mode, no DANE or MTA-STS lookups).

`judge` then decides one session from what the server showed (`PeerInfo`): allow or
defer, whether the certificate verified, and what to record.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

from cryptography.x509.verification import Store

from mta.delivery.tls.certs import failure_type, match_dane, verify_pkix
from mta.delivery.tls.model import (
    BAD_CERTIFICATE,
    DANE,
    DANE_REQUIRED,
    DNSSEC_INVALID,
    MTA_STS,
    NEEDS_TLS,
    NONE,
    OPPORTUNISTIC,
    REQUIRED,
    SECURITY,
    STARTTLS_NOT_SUPPORTED,
    TLSA_INVALID,
    VALIDATION_FAILURE,
    Check,
    DaneAnswer,
    Exclusion,
    HostPolicy,
    PeerInfo,
    ReportScope,
    TlsMode,
    TlsPlan,
    Verdict,
)
from mta.delivery.tls.mtasts import StsPolicy

NO_POLICY = "no-policy-found"


def mode_policy(mode: TlsMode, report: ReportScope | None = None) -> HostPolicy:
    """A host's requirements from the configured mode alone."""
    if mode is TlsMode.DISABLED:
        return HostPolicy(NONE, starttls=False, check=Check.NONE, mode=mode.value, report=report)
    if mode is TlsMode.REQUIRED:
        return HostPolicy(REQUIRED, require_tls=True, check=Check.ENFORCE, mode=mode.value,
                          report=report)
    if mode is TlsMode.REQUIRED_INSECURE:
        return HostPolicy(REQUIRED, require_tls=True, check=Check.NONE, mode=mode.value,
                          report=report)
    if mode is TlsMode.OPPORTUNISTIC_INSECURE:
        return HostPolicy(OPPORTUNISTIC, check=Check.NONE, mode=mode.value, report=report)
    return HostPolicy(OPPORTUNISTIC, check=Check.RECORD, mode=mode.value, report=report)


def sts_scope(domain: str, policy: StsPolicy) -> ReportScope:
    return ReportScope(domain, "sts", policy.lines, policy.mx)


def decide(domain: str, mode: TlsMode, hosts: Sequence[str], *,
           sts: StsPolicy | None = None, dane: Mapping[str, DaneAnswer] | None = None,
           reporting: bool = False, notes: Sequence[str] = ()) -> TlsPlan:
    """The plan for `domain` whose MX hosts are `hosts` (in preference order)."""
    dane = dane or {}
    if sts is not None and sts.mode == "none":
        sts = None
    none_scope = ReportScope(domain, NO_POLICY) if reporting else None
    sts_report = sts_scope(domain, sts) if reporting and sts is not None else None
    planned: list[tuple[str, HostPolicy]] = []
    excluded: list[Exclusion] = []
    why = list(notes)
    for raw in hosts:
        host = raw.rstrip(".").lower()
        answer = dane.get(host)
        if answer is not None and answer.status == "servfail":
            scope = ReportScope(domain, "tlsa") if reporting else None
            excluded.append(Exclusion(
                host, f"the TLSA lookup for {host} failed ({answer.detail or 'SERVFAIL'}): "
                "DANE cannot be ruled out", DANE, SECURITY, DNSSEC_INVALID, scope))
            continue
        if answer is not None and answer.status == "records":
            usable = tuple(r for r in answer.records if r.usable)
            scope = (ReportScope(domain, "tlsa", tuple(r.text for r in answer.records))
                     if reporting else None)
            planned.append((host, HostPolicy(DANE, require_tls=True,
                                             check=Check.DANE if usable else Check.NONE,
                                             tlsa=usable, report=scope)))
            if not usable:
                why.append(f"{host}: TLSA records, none usable: TLS without a check "
                           "(RFC 7672 2.2)")
            continue
        if sts is not None and sts.mode == "enforce":
            if not sts.matches(host):
                excluded.append(Exclusion(
                    host, f"{host} is not an MX host of {domain}'s MTA-STS policy "
                    f"(mx: {', '.join(sts.mx)})", MTA_STS))
                continue
            planned.append((host, HostPolicy(MTA_STS, require_tls=True, check=Check.ENFORCE,
                                             mode="enforce", report=sts_report)))
            continue
        if sts is not None and sts.mode == "testing":
            planned.append((host, HostPolicy(MTA_STS, check=Check.RECORD, mode="testing",
                                             report=sts_report)))
            continue
        planned.append((host, mode_policy(mode, none_scope)))
    return TlsPlan(domain, tuple(planned), tuple(excluded), tuple(why))


def explicit_plan(domain: str, mode: TlsMode, hosts: Sequence[str]) -> TlsPlan:
    """A domain configured in [delivery.domains]: its mode, nothing looked up."""
    return decide(domain, mode, hosts, notes=(
        f"{domain} is configured in [delivery.domains] with tls = \"{mode.value}\": "
        "DANE and MTA-STS are not looked up",))


def refusal(plan: TlsPlan) -> Exclusion | None:
    """Why no MX host of the plan may be used (the last exclusion), or None."""
    if plan.hosts or not plan.excluded:
        return None
    return plan.excluded[-1]


def judge(policy: HostPolicy, host: str, peer: PeerInfo, store: Store | None,
          now: datetime.datetime) -> Verdict:
    """Allow or defer a session with MX `host`, from what the server showed."""
    base = {"policy": policy.policy, "mode": policy.mode, "tls": peer.tls,
            "version": peer.version, "cipher": peer.cipher}
    if peer.handshake_error:  # TLS was tried: never on to plain text on this host
        return Verdict(False, reason=peer.handshake_error, status=SECURITY,
                       result=STARTTLS_NOT_SUPPORTED if peer.starttls_refused
                       else VALIDATION_FAILURE, **base)
    if not peer.tls:
        if policy.require_tls:
            what = "does not offer STARTTLS" if not peer.offered else "refused STARTTLS"
            return Verdict(False, reason=f"TLS is required ({policy.policy}) but {host} {what}",
                           status=NEEDS_TLS,
                           result=DANE_REQUIRED if policy.policy == DANE else STARTTLS_NOT_SUPPORTED,
                           **base)
        result = STARTTLS_NOT_SUPPORTED if policy.report is not None and policy.starttls else ""
        return Verdict(True, result=result, **base)
    if policy.check is Check.NONE:
        return Verdict(True, verified=None, **base)
    if policy.check is Check.DANE:
        problem = match_dane(policy.tlsa, peer.chain, host, now)
        if problem is None:
            return Verdict(True, verified=True, **base)
        return Verdict(False, verified=False, reason=problem, status=BAD_CERTIFICATE,
                       result=TLSA_INVALID, **base)
    problem = ("no trust store" if store is None
               else verify_pkix(peer.chain, host, store, now))
    if problem is None:
        return Verdict(True, verified=True, **base)
    reason = f"the certificate of {host} does not verify: {problem}"
    result = failure_type(problem)
    if policy.check is Check.ENFORCE:
        return Verdict(False, verified=False, reason=reason, status=BAD_CERTIFICATE,
                       result=result, **base)
    return Verdict(True, verified=False, reason=reason, result=result, **base)


def refused_verdict(exclusion: Exclusion) -> Verdict:
    """The verdict recorded for an item deferred because no MX host may be used."""
    return Verdict(False, policy=exclusion.policy, reason=exclusion.reason,
                   status=exclusion.status, result=exclusion.result)
