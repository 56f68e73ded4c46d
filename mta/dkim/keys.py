"""DKIM private keys: loading, generating, and the DNS TXT record that publishes them.

Key file format (what `mta dkim genkey` writes and what the signer reads):

- ``rsa-sha256``: an unencrypted PEM private key, PKCS#8 (``-----BEGIN PRIVATE
  KEY-----``); the older PKCS#1 form (``-----BEGIN RSA PRIVATE KEY-----``, as
  written by ``opendkim-genkey``) is read as well. At least 1024 bits (RFC 8301).
- ``ed25519-sha256``: an unencrypted PEM private key, PKCS#8 (RFC 8410,
  ``-----BEGIN PRIVATE KEY-----``, the form ``openssl genpkey -algorithm
  ed25519`` writes). For interoperability the form dkimpy's ``dknewkey``
  writes is read too: one line holding the base64 of the raw 32-byte key.

DNS record (RFC 6376 3.6.1, RFC 8463): ``<selector>._domainkey.<domain>`` TXT
``v=DKIM1; k=rsa; p=<base64 DER SubjectPublicKeyInfo>`` for RSA, and
``v=DKIM1; k=ed25519; p=<base64 raw 32-byte public key>`` for Ed25519.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mta.config import ConfigError

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
ALGORITHMS = (RSA_SHA256, ED25519_SHA256)
MIN_RSA_BITS = 1024

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class KeyFileError(ConfigError):
    """A key file that cannot be used; str() is one line naming the file."""


@dataclass(frozen=True)
class TxtRecord:
    """The DNS TXT record that publishes a DKIM public key."""

    name: str  # "<selector>._domainkey.<domain>"
    value: str  # "v=DKIM1; k=...; p=..."

    def zone_line(self) -> str:
        """The record as a zone-file line, the value split into strings of at most 255 bytes."""
        chunks = [self.value[i : i + 255] for i in range(0, len(self.value), 255)]
        quoted = " ".join(f'"{chunk}"' for chunk in chunks)
        return f"{self.name}. IN TXT ( {quoted} )"


def generate_private_key(algorithm: str, bits: int = 2048) -> PrivateKey:
    """A fresh private key for `algorithm` (`bits` applies to RSA only)."""
    if algorithm == ED25519_SHA256:
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm != RSA_SHA256:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}")
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits (RFC 8301)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_key_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PEM PKCS#8, the key file format."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_b64(key: PrivateKey) -> str:
    """The p= value: base64 SubjectPublicKeyInfo for RSA, the raw 32 bytes for Ed25519."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def txt_record(key: PrivateKey, domain: str, selector: str) -> TxtRecord:
    """The TXT record to publish for `key` at `selector`._domainkey.`domain`."""
    kind = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    return TxtRecord(
        name=f"{selector}._domainkey.{domain.rstrip('.')}",
        value=f"v=DKIM1; k={kind}; p={public_key_b64(key)}",
    )


def load_private_key(path: str, algorithm: str) -> PrivateKey:
    """Read and parse a key file once; any problem is a one-line `KeyFileError` naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise KeyFileError(f"DKIM key file {path!r} not found") from None
    except IsADirectoryError:
        raise KeyFileError(f"DKIM key file {path!r} is a directory") from None
    except OSError as exc:
        raise KeyFileError(f"DKIM key file {path!r} cannot be read: {exc.strerror}") from None
    key = parse_private_key(data)
    if key is None:
        raise KeyFileError(f"DKIM key file {path!r} {_why_not_a_key(data)}")
    check_key_fits(key, algorithm, path)
    return key


def parse_private_key(data: bytes) -> PrivateKey | None:
    """An RSA or Ed25519 private key from PEM, DER or dkimpy's raw Ed25519 form, else None."""
    for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            key = loader(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return key if isinstance(key, PrivateKey) else None
    return _raw_ed25519(data)


def check_key_fits(key: PrivateKey, algorithm: str, path: str) -> None:
    """Refuse a key that does not match its configured algorithm or is too short."""
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    if algorithm == RSA_SHA256 and not is_rsa:
        raise KeyFileError(f"DKIM key file {path!r} holds an Ed25519 key, but algorithm is rsa-sha256")
    if algorithm == ED25519_SHA256 and is_rsa:
        raise KeyFileError(f"DKIM key file {path!r} holds an RSA key, but algorithm is ed25519-sha256")
    if algorithm not in ALGORITHMS:
        raise KeyFileError(f"DKIM key file {path!r}: unknown algorithm {algorithm!r}")
    if is_rsa and key.key_size < MIN_RSA_BITS:
        raise KeyFileError(
            f"DKIM key file {path!r} holds a {key.key_size}-bit RSA key; "
            f"at least {MIN_RSA_BITS} bits are needed (RFC 8301)"
        )


def _raw_ed25519(data: bytes) -> ed25519.Ed25519PrivateKey | None:
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32:
        return None
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw)


def _why_not_a_key(data: bytes) -> str:
    if b"ENCRYPTED" in data:
        return "holds an encrypted private key; DKIM keys must be unencrypted"
    if b"PUBLIC KEY-----" in data:
        return "holds a public key, not a private key"
    if not data.strip():
        return "is empty"
    return "is not an RSA or Ed25519 private key (PEM expected)"


def write_key_file(path: str, pem: bytes, *, force: bool = False) -> None:
    """Write `pem` to `path` with mode 0600; refuse an existing file unless `force`."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(pem)
