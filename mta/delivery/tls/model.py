"""The words of the outbound TLS policy: modes, policy names, TLS-RPT result types, and
the records that pass between the decision functions and the I/O around them.

No I/O and no engine imports here; mta/delivery/tls/policy.py decides with these.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property


class TlsMode(StrEnum):
    """What a destination gets when neither DANE nor MTA-STS says more (KumoMTA's enum)."""

    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered; certificate checked, recorded
    OPPORTUNISTIC_INSECURE = "opportunistic-insecure"  # STARTTLS when offered, no check
    REQUIRED = "required"  # STARTTLS and a certificate valid for the MX host, or defer
    REQUIRED_INSECURE = "required-insecure"  # STARTTLS, no check, or defer
    DISABLED = "disabled"  # never STARTTLS


MODES: tuple[str, ...] = tuple(m.value for m in TlsMode)

# Which policy applied to a session (events, metrics, `mta tls check`).
DANE = "dane"
MTA_STS = "mta-sts"
REQUIRED = "required"
OPPORTUNISTIC = "opportunistic"
NONE = "none"
POLICIES: tuple[str, ...] = (DANE, MTA_STS, REQUIRED, OPPORTUNISTIC, NONE)

# Result types of RFC 8460 section 4.3 (TLS reporting).
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERT_HOST_MISMATCH = "certificate-host-mismatch"
CERT_EXPIRED = "certificate-expired"
CERT_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
STS_FETCH_ERROR = "sts-policy-fetch-error"
STS_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"

# Enhanced status codes of the deferrals (RFC 3463, IANA's registry).
NEEDS_TLS = "4.7.10"  # encryption needed: no STARTTLS where TLS is required
BAD_CERTIFICATE = "4.7.5"  # cryptographic failure: the certificate or TLSA check failed
SECURITY = "4.7.0"  # other security trouble: handshake, MX not allowed, DNSSEC failure

# Session results as counted by `mta_tls_sessions_total{policy, result}`.
VERIFIED = "verified"  # TLS, certificate verified (PKIX or DANE)
UNVERIFIED = "unverified"  # TLS, certificate not checked or the check failed, delivery allowed
PLAIN = "plain"  # no TLS, allowed
REFUSED = "refused"  # the policy deferred: no TLS, failed check, failed handshake
RESULTS: tuple[str, ...] = (VERIFIED, UNVERIFIED, PLAIN, REFUSED)


class Check(StrEnum):
    """What is done with the server's certificate once TLS is up."""

    NONE = "none"  # not looked at
    RECORD = "record"  # verified (PKIX, MX host name); a failure is recorded, not fatal
    ENFORCE = "enforce"  # verified; a failure defers
    DANE = "dane"  # matched against the host's TLSA records; a mismatch defers


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698): usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1: only DANE-TA(2) and DANE-EE(3), selectors 0 and 1, matching
        types 0 (full), 1 (SHA-256) and 2 (SHA-512) are used for SMTP."""
        return self.usage in (2, 3) and self.selector in (0, 1) and self.mtype in (0, 1, 2)

    @property
    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class DaneAnswer:
    """The TLSA lookup of one MX host: "records" (authenticated), "none" (no records, or
    an answer that was not authenticated: DANE does not apply) or "servfail"."""

    status: str
    records: tuple[Tlsa, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class ReportScope:
    """The policy a session is counted under in a TLS report (RFC 8460 4.4)."""

    domain: str  # the policy domain: the recipient domain
    type: str  # "sts", "tlsa" or "no-policy-found"
    strings: tuple[str, ...] = ()  # the policy's lines, or the TLSA records
    mx_host: tuple[str, ...] = ()  # the MTA-STS policy's mx patterns

    @property
    def digest(self) -> str:
        text = "\n".join((self.domain, self.type, *self.strings, "", *self.mx_host))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class HostPolicy:
    """What one MX host of a destination must offer."""

    policy: str  # DANE, MTA_STS, REQUIRED, OPPORTUNISTIC or NONE
    starttls: bool = True  # send STARTTLS when offered
    require_tls: bool = False  # no TLS: defer
    check: Check = Check.RECORD
    tlsa: tuple[Tlsa, ...] = ()  # the usable TLSA records (Check.DANE)
    mode: str = ""  # the MTA-STS mode (enforce, testing) or the configured TLS mode
    report: ReportScope | None = None  # counted for TLS-RPT under this policy

    def describe(self) -> str:
        need = "TLS required" if self.require_tls else (
            "STARTTLS when offered" if self.starttls else "no STARTTLS")
        check = {Check.NONE: "certificate not checked",
                 Check.RECORD: "certificate checked and recorded (a failure does not stop it)",
                 Check.ENFORCE: "certificate must verify for the MX host name",
                 Check.DANE: "certificate must match a TLSA record"}[self.check]
        mode = f" ({self.mode})" if self.mode and self.mode != self.policy else ""
        return f"{self.policy}{mode}: {need}, {check}"


@dataclass(frozen=True)
class Exclusion:
    """An MX host the policy does not let delivery use, and why."""

    host: str
    reason: str
    policy: str  # the policy that excludes it: DANE or MTA_STS
    status: str = SECURITY
    result: str = ""  # TLS-RPT result type, when it counts as a failed session
    report: ReportScope | None = None


@dataclass(frozen=True)
class TlsPlan:
    """A destination domain's TLS policy: each usable MX host's requirements, the hosts
    it excludes, and why (`notes`, for `mta tls check`)."""

    domain: str
    hosts: tuple[tuple[str, HostPolicy], ...]
    excluded: tuple[Exclusion, ...] = ()
    notes: tuple[str, ...] = ()

    def host(self, name: str) -> HostPolicy | None:
        """The policy of MX host `name`; None when it is excluded or unknown."""
        key = name.rstrip(".").lower()
        return next((p for h, p in self.hosts if h == key), None)

    def allows(self, name: str) -> bool:
        return self.host(name) is not None

    @cached_property
    def key(self) -> str:
        """Equal for plans that may share connections: the same requirements for the same
        hosts (a connection verified for one is good for the other), the same reporting."""
        return hashlib.sha256(repr((self.hosts, self.excluded)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PeerInfo:
    """What the server showed: STARTTLS offered, TLS up, version, cipher, certificates
    (DER, the server's certificate first), or why the handshake failed."""

    offered: bool
    tls: bool = False
    version: str = ""
    cipher: str = ""
    chain: tuple[bytes, ...] = ()
    handshake_error: str = ""  # STARTTLS was sent, and then no TLS: why
    starttls_refused: bool = False  # ... because the server refused the STARTTLS command


@dataclass(frozen=True)
class Verdict:
    """The decision on one session: allow or defer, and what to record."""

    allow: bool
    policy: str
    verified: bool | None = None  # None: not checked (or no TLS)
    reason: str = ""  # why it was refused, or why the check failed
    status: str = ""  # the enhanced status of a refusal
    result: str = ""  # the TLS-RPT failure type; "" when the session counts as successful
    mode: str = ""
    tls: bool = False
    version: str = ""
    cipher: str = ""

    @property
    def outcome(self) -> str:
        """The metrics' result label."""
        if not self.allow:
            return REFUSED
        if not self.tls:
            return PLAIN
        return VERIFIED if self.verified else UNVERIFIED

    def fields(self) -> dict[str, object]:
        """The event fields (Delivery, TransientFailure) of this session."""
        out: dict[str, object] = {"tls": self.tls, "tls_policy": self.policy}
        if self.tls:
            out["tls_version"] = self.version
            out["tls_cipher"] = self.cipher
        out["tls_verified"] = self.verified
        if self.mode:
            out["tls_policy_mode"] = self.mode
        if self.reason:
            out["tls_error"] = self.reason[:300]
        if self.result:
            out["tls_result"] = self.result
        return out


@dataclass
class SessionCounts:
    """Sessions by (policy, result): the running totals the metrics sample."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, verdict: Verdict) -> None:
        key = (verdict.policy, verdict.outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
