"""DKIM signing (RFC 6376, RFC 8463): relaxed/relaxed, the signature made by `cryptography`.

Header selection and canonicalization are done here (see `canon`), checked in
the tests against dkimpy's and OpenDKIM's verifiers; only the RSA / Ed25519
operation goes to OpenSSL, so a signature costs little more than that operation.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from mta.config import ConfigError, DkimConfig
from mta.dkim.canon import (
    CRLF,
    HeaderField,
    ensure_final_crlf,
    field_key,
    normalize_line_endings,
    parse_header_fields,
    relaxed_body,
    relaxed_header,
    split_message,
)
from mta.dkim.keys import PrivateKey, load_private_key

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
    "List-Id",
    "In-Reply-To",
    "References",
)
OVERSIGNED: frozenset[bytes] = frozenset({b"from"})
FOLD_WIDTH = 76
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
        self.header_names = header_list(headers)
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

        Unsigned (but normalized) when neither the From: domain nor the fallback has a key.
        """
        message = ensure_final_crlf(normalize_line_endings(message))
        header_block, body = split_message(message)
        fields = parse_header_fields(header_block)
        domain = from_domain(fields)
        keys = self.keys_for(domain) if domain else []
        if not keys:
            self.unsigned += 1
            return message
        timestamp = int(time.time() if now is None else now)
        signatures = sign_fields(fields, body, keys, self.header_names, timestamp, self.expiration)
        self.signed += 1
        return b"".join(signatures) + message


def sign_fields(
    fields: Sequence[HeaderField],
    body: bytes,
    keys: Sequence[SigningKey],
    header_names: Sequence[bytes],
    timestamp: int,
    expiration: float = 0.0,
) -> list[bytes]:
    """One DKIM-Signature field (CRLF-terminated) per key, for a parsed CRLF message."""
    names, signed_headers = select_headers(fields, header_names)
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
    expires = max(timestamp + 1, int(timestamp + expiration)) if expiration > 0 else None
    tags = common_tags(names, body_hash, timestamp, expires)
    return [signature_field(key, tags, signed_headers) for key in keys]


def select_headers(
    fields: Sequence[HeaderField], header_names: Sequence[bytes]
) -> tuple[list[bytes], bytes]:
    """The h= list and the canonicalized header data it covers (RFC 6376 5.4.2).

    Each name is listed once per field present, taken from the bottom up; names in
    OVERSIGNED are listed once more, so a field added later breaks the signature.
    """
    wanted = set(header_names)
    present: dict[bytes, list[HeaderField]] = {}
    for name, value in fields:
        key = field_key(name)
        if key in wanted:
            present.setdefault(key, []).append((name, value))
    names: list[bytes] = []
    data: list[bytes] = []
    for key in header_names:
        instances = present.get(key, [])
        names.extend([key] * (len(instances) + (key in OVERSIGNED)))
        data.extend(relaxed_header(name, value) for name, value in reversed(instances))
    return names, b"".join(data)


def common_tags(names: Sequence[bytes], body_hash: bytes, timestamp: int, expires: int | None) -> bytes:
    """The tags every signature of one message shares, from t= to bh= (folded)."""
    times = f"t={timestamp};" + (f" x={expires};" if expires is not None else "")
    h_tag = fold_list(b"h=", names, b":")
    return times.encode() + b"\r\n\t" + h_tag + b";\r\n\tbh=" + body_hash + b";"


def signature_field(key: SigningKey, tags: bytes, signed_headers: bytes) -> bytes:
    """The full DKIM-Signature field for one key, b= computed over headers + this field."""
    head = (
        f"DKIM-Signature: v=1; a={key.algorithm}; c=relaxed/relaxed; "
        f"d={key.domain}; s={key.selector};\r\n\t"
    ).encode() + tags + b"\r\n\tb="
    name, _, value = head.partition(b":")
    to_sign = signed_headers + relaxed_header(name, value)[:-2]
    signature = base64.b64encode(key.sign(to_sign))
    return head + fold_b64(signature) + CRLF


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


def header_list(headers: Sequence[str]) -> tuple[bytes, ...]:
    """The configured header names as lowercase bytes, From always included, no repeats."""
    names: list[bytes] = []
    for header in ("From", *headers):
        if not _HEADER_NAME.fullmatch(header):
            raise ConfigError(f"dkim headers: {header!r} is not a header field name")
        key = header.lower().encode("ascii")
        if key not in names:
            names.append(key)
    return tuple(names)


def from_domain(fields: Sequence[HeaderField]) -> str:
    """The domain of the first address in the first From: field ('' if there is none)."""
    for name, value in fields:
        if field_key(name) == b"from":
            text = value.replace(CRLF, b"").decode("utf-8", "replace")
            for _, address in getaddresses([text]):
                if "@" in address:
                    return normalize_domain(address.rpartition("@")[2])
            return ""
    return ""


def normalize_domain(domain: str) -> str:
    """Lowercase, no trailing dot, IDNA A-label form when it has non-ASCII characters."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain
