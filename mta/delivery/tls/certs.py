"""Certificate checks as plain functions: PKIX verification for an MX host name and
DANE (RFC 7672) matching of TLSA records, over the DER certificates a server sent.

The handshake itself never verifies (mta/delivery/connection.py uses an SSLContext
without checks), so one handshake serves every mode: the verdict comes after, from
these functions, with the `cryptography` package's X.509 path validation (RFC 5280,
host names by RFC 6125 with a wildcard in the leftmost label only).
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from mta.delivery.tls.model import (
    CERT_EXPIRED,
    CERT_HOST_MISMATCH,
    CERT_NOT_TRUSTED,
    VALIDATION_FAILURE,
    Tlsa,
)

# A server certificate must name the host in subjectAltName (that is checked); other
# extensions of the server certificate are not judged as strictly as the Web PKI does
# (mail servers' certificates vary). Issuers get the Web PKI's CA rules.
_EE_POLICY = ExtensionPolicy.permit_all().require_present(
    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()


class TrustError(Exception):
    """The CA certificates cannot be loaded."""


def load_trust_store(ca_file: str = "", system: bool = True) -> Store | None:
    """The trust anchors: the system's CA bundle (when `system`) plus `ca_file` (PEM).
    None when there are none (a machine without a CA bundle): nothing verifies then, so
    `opportunistic` records every certificate as unverified and `required` defers."""
    certs: list[x509.Certificate] = []
    if system:
        paths = ssl.get_default_verify_paths()
        for path in (paths.cafile, paths.openssl_cafile):
            if path and Path(path).is_file():
                certs += _read_pem(Path(path))
                break
    if ca_file:
        try:
            certs += _read_pem(Path(ca_file))
        except (OSError, ValueError) as exc:
            raise TrustError(f"{ca_file}: {exc}") from None
    if ca_file and not certs:
        raise TrustError(f"{ca_file}: no certificate in it")
    return Store(certs) if certs else None


def _read_pem(path: Path) -> list[x509.Certificate]:
    import warnings

    with warnings.catch_warnings():  # old roots with odd serial numbers still load
        warnings.simplefilter("ignore")
        return x509.load_pem_x509_certificates(path.read_bytes())


@lru_cache(maxsize=4096)
def parse_der(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def _verifier(store: Store, host: str, now: datetime.datetime) -> x509.verification.ServerVerifier:
    return (PolicyBuilder().store(store).time(now)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_server_verifier(x509.DNSName(host)))


def verify_pkix(chain: Sequence[bytes], host: str, store: Store,
                now: datetime.datetime) -> str | None:
    """None if the chain (the server's certificate first) leads to a trusted CA and the
    certificate is valid now for `host`; else why not."""
    if not chain:
        return "the server sent no certificate"
    name = host.rstrip(".").lower()
    try:
        certs = [parse_der(der) for der in chain]
        _verifier(store, name, now).verify(certs[0], certs[1:])
    except (ValueError, VerificationError) as exc:
        return _short(str(exc))
    return None


def failure_type(reason: str) -> str:
    """The TLS-RPT result type of a verification failure (RFC 8460 4.3.2)."""
    text = reason.lower()
    if "subjectaltname" in text or ("name" in text and "match" in text):
        return CERT_HOST_MISMATCH
    if "not valid at validation time" in text or "expired" in text:
        return CERT_EXPIRED
    if "candidates exhausted" in text or "issuer" in text or "self-signed" in text \
            or "no certificate" in text:
        return CERT_NOT_TRUSTED
    return VALIDATION_FAILURE


def _short(text: str) -> str:
    text = text.split(" (encountered processing", 1)[0]
    return " ".join(text.split())[:300]


# --- DANE --------------------------------------------------------------------------


def association(cert: x509.Certificate, der: bytes, selector: int, mtype: int) -> bytes:
    """The data a TLSA record of this selector and matching type holds for `cert`."""
    data = der if selector == 0 else cert.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def tlsa_matches(record: Tlsa, der: bytes) -> bool:
    try:
        return association(parse_der(der), der, record.selector, record.mtype) == record.data
    except ValueError:
        return False


def match_dane(records: Sequence[Tlsa], chain: Sequence[bytes], host: str,
               now: datetime.datetime) -> str | None:
    """None if a usable TLSA record authenticates the chain (RFC 7672 3.1), else why not.

    DANE-EE(3) matches the server's own certificate or key, and then neither the name
    nor the dates are checked. DANE-TA(2) matches a certificate of the chain the server
    sent (it must send its trust anchor, RFC 7672 3.1.2); the server's certificate must
    then chain to it and be valid now for the MX host name.
    """
    usable = [r for r in records if r.usable]
    if not chain:
        return "the server sent no certificate"
    if not usable:
        return "no usable TLSA record"
    if any(tlsa_matches(r, chain[0]) for r in usable if r.usage == 3):
        return None
    why = f"no TLSA record of {host} matches the server's certificate"
    for record in (r for r in usable if r.usage == 2):
        for der in chain[1:]:
            if not tlsa_matches(record, der):
                continue
            problem = verify_pkix(chain, host, Store([parse_der(der)]), now)
            if problem is None:
                return None
            why = f"the chain to the DANE-TA certificate does not verify for {host}: {problem}"
    return why
