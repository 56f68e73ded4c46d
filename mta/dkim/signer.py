"""DKIM signing (RFC 6376, RFC 8463): relaxed/relaxed, the signature made by `cryptography`.

Header selection and canonicalization are done here (see `canon`), checked in
the tests against dkimpy's and OpenDKIM's verifiers; only the RSA / Ed25519
operation goes to OpenSSL, so a signature costs little more than that operation.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from mta.address import address_domain, normalize_domain
from mta.config import ConfigError, DkimConfig
from mta.dkim.canon import (
    CRLF,
    CanonicalField,
    normalize_message,
    relaxed_body,
    relaxed_fields,
    relaxed_header,
    split_message,
)
from mta.dkim.keys import ED25519_SHA256, RSA_SHA256, PrivateKey, load_private_key

DEFAULT_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "CFBL-Address",
    "CFBL-Feedback-ID",
    "List-Id",
    "In-Reply-To",
    "References",
)
OVERSIGNED: tuple[bytes, ...] = (b"from",)
FOLD_WIDTH = 76
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII but colon (RFC 5322 ftext)
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


@dataclass(frozen=True)
class SigningKey:
    """One parsed private key and where its public half is published."""

    domain: str  # ASCII (A-label), lowercase, no trailing dot
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    key: PrivateKey

    def __post_init__(self) -> None:
        for what, name in (("domain", self.domain), ("selector", self.selector)):
            if not _DNS_NAME.fullmatch(name):
                raise ConfigError(f"dkim key {what} {name!r} is not a valid DNS name")
        is_ed25519 = isinstance(self.key, ed25519.Ed25519PrivateKey)
        if self.algorithm != (ED25519_SHA256 if is_ed25519 else RSA_SHA256):
            raise ConfigError(f"dkim key {self.selector!r}: algorithm {self.algorithm!r} "
                              f"does not match its {'Ed25519' if is_ed25519 else 'RSA'} key")

    @functools.cached_property
    def field_start(self) -> bytes:
        """The DKIM-Signature field up to the tags this key adds (folded, as sent)."""
        return (
            f"DKIM-Signature: v=1; a={self.algorithm}; c=relaxed/relaxed; "
            f"d={self.domain}; s={self.selector};\r\n\t"
        ).encode()

    @functools.cached_property
    def canonical_start(self) -> bytes:
        """`field_start` canonicalized with "relaxed"; the whitespace in it is ours, so known."""
        return relaxed_header(*self.field_start.split(b":", 1))[:-2] + b" "

    def sign(self, data: bytes) -> bytes:
        """The raw signature of `data` (RFC 6376 3.7; RFC 8463: Ed25519 over the SHA-256)."""
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(hashlib.sha256(data).digest())
        return self.key.sign(data, _PKCS1V15, _SHA256)


class DkimSigner:
    """Signs outgoing messages for the domain of their From: header. Build once, share."""

    def __init__(
        self,
        keys: Iterable[SigningKey],
        *,
        fallback_domain: str = "",
        headers: Sequence[str] = DEFAULT_HEADERS,
        expiration: float = 0.0,
    ) -> None:
        self._keys: dict[str, list[SigningKey]] = {}
        for key in keys:
            self._add_key(key)
        self.fallback_domain = normalize_domain(fallback_domain) if fallback_domain else ""
        if self.fallback_domain and self.fallback_domain not in self._keys:
            raise ConfigError(f"dkim fallback_domain {fallback_domain!r} has no [[dkim.keys]] entry")
        self.signed_names = header_set(headers)
        self.expiration = expiration
        self.signed = 0
        self.unsigned = 0

    @classmethod
    def from_config(cls, cfg: DkimConfig) -> DkimSigner:
        """Load and parse every configured key once; a bad key file raises a one-line ConfigError."""
        keys = []
        for entry in cfg.keys:
            key = load_private_key(entry.key_file, entry.algorithm)
            domain = normalize_domain(entry.domain)
            keys.append(SigningKey(domain, entry.selector, entry.algorithm, key))
        return cls(
            keys,
            fallback_domain=cfg.fallback_domain,
            headers=cfg.headers or DEFAULT_HEADERS,
            expiration=cfg.expiration,
        )

    def _add_key(self, key: SigningKey) -> None:
        same_domain = self._keys.setdefault(key.domain, [])
        if any(k.selector == key.selector for k in same_domain):
            raise ConfigError(
                f"dkim key for domain {key.domain!r} selector {key.selector!r} is configured twice"
            )
        same_domain.append(key)

    @property
    def domains(self) -> list[str]:
        """The domains that have at least one key."""
        return sorted(self._keys)

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The keys that sign for `domain` (the fallback domain's if it has none), maybe none."""
        return self._keys.get(domain) or self._keys.get(self.fallback_domain, [])

    def sign(self, message: bytes, now: float | None = None) -> bytes:
        """The message, line ends normalized to CRLF, with DKIM-Signature field(s) prepended.

        Unsigned (but normalized) when neither the From: domain nor the fallback has a key;
        unsigned and untouched when no key is configured at all. Either way counted.
        """
        if not self._keys:
            self.unsigned += 1
            return message
        message = normalize_message(message)
        header_block, body = split_message(message)
        fields = relaxed_fields(header_block)
        domain = from_domain(fields)
        keys = self.keys_for(domain) if domain else []
        if not keys:
            self.unsigned += 1
            return message
        timestamp = int(time.time() if now is None else now)
        signatures = sign_fields(fields, body, keys, self.signed_names, timestamp, self.expiration)
        self.signed += 1
        return b"".join(signatures) + message


def sign_fields(
    fields: Sequence[CanonicalField],
    body: bytes,
    keys: Sequence[SigningKey],
    signed_names: Collection[bytes],
    timestamp: int,
    expiration: float = 0.0,
) -> list[bytes]:
    """One DKIM-Signature field (CRLF-terminated) per key, for a CRLF message's fields and body."""
    names, signed_headers = select_headers(fields, signed_names)
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
    expires = max(timestamp + 1, int(timestamp + expiration)) if expiration > 0 else None
    tags = common_tags(names, body_hash, timestamp, expires)
    canonical_tags = tags.replace(b"\r\n\t", b" ")
    return [signature_field(key, tags, canonical_tags, signed_headers) for key in keys]


def select_headers(
    fields: Sequence[CanonicalField], signed_names: Collection[bytes]
) -> tuple[list[bytes], bytes]:
    """The h= list and the canonicalized header data it covers (RFC 6376 5.4.2).

    Fields are taken from the bottom up, which is how a verifier pairs a name
    listed twice with its instances, so h= runs in reverse field order. Names in
    OVERSIGNED are listed once more, so such a field added later breaks the signature.
    """
    names: list[bytes] = []
    data: list[bytes] = []
    for key, value in reversed(fields):
        if key in signed_names:
            names.append(key)
            data.append(key + b":" + value + CRLF)
    names += OVERSIGNED
    return names, b"".join(data)


def common_tags(names: Sequence[bytes], body_hash: bytes, timestamp: int, expires: int | None) -> bytes:
    """The tags every signature of one message shares, from t= to bh= (folded)."""
    times = f"t={timestamp};" + (f" x={expires};" if expires is not None else "")
    return times.encode() + b"\r\n\t" + h_tag(tuple(names)) + b";\r\n\tbh=" + body_hash + b";"


@functools.lru_cache(maxsize=1024)
def h_tag(names: tuple[bytes, ...]) -> bytes:
    """The folded h= tag; messages from one template share it, hence the cache."""
    return fold_list(b"h=", names, b":")


def signature_field(key: SigningKey, tags: bytes, canonical_tags: bytes, signed_headers: bytes) -> bytes:
    """The full DKIM-Signature field for one key, b= computed over headers + this field.

    The field's own canonical form (b= empty, no final CRLF, RFC 6376 3.7) is put
    together from canonical pieces rather than canonicalized again.
    """
    to_sign = signed_headers + key.canonical_start + canonical_tags + b" b="
    signature = base64.b64encode(key.sign(to_sign))
    return key.field_start + tags + b"\r\n\tb=" + fold_b64(signature) + CRLF


def fold_list(prefix: bytes, items: Sequence[bytes], sep: bytes) -> bytes:
    """prefix + items joined by sep, with CRLF TAB inserted after a sep to keep lines short."""
    lines = [prefix]
    for i, item in enumerate(items):
        piece = item + (sep if i < len(items) - 1 else b"")
        if len(lines[-1]) + len(piece) > FOLD_WIDTH - 8 and lines[-1] != prefix:
            lines.append(b"")
        lines[-1] += piece
    return b"\r\n\t".join(lines)


def fold_b64(value: bytes, width: int = FOLD_WIDTH - 8) -> bytes:
    """A base64 value cut into lines with CRLF TAB (whitespace in b= is ignored, RFC 6376 3.5)."""
    return b"\r\n\t".join(value[i : i + width] for i in range(0, len(value), width))


def header_set(headers: Sequence[str]) -> frozenset[bytes]:
    """The configured header names as lowercase bytes, From always included."""
    for header in headers:
        if not _HEADER_NAME.fullmatch(header):
            raise ConfigError(f"dkim headers: {header!r} is not a header field name")
    return frozenset(h.lower().encode("ascii") for h in ("From", *headers))


def from_domain(fields: Sequence[CanonicalField]) -> str:
    """The domain of the first address in the first From: field ('' if there is none)."""
    for key, value in fields:
        if key == b"from":
            return address_domain(value)
    return ""
