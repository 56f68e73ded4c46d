"""Who is calling the injection API: an account, by its SMTP password or an API key.

- `Authorization: Basic base64(account:password)`: the account's SMTP password (checked
  like SMTP AUTH) or one of its API keys;
- `Authorization: Bearer <api key>`: the key alone names its account.

An API key is 32 random bytes (`mta_` + URL-safe base64), shown once by `mta account
new-api-key NAME`; the config keeps only its SHA-256 (`api_key_hashes` of the account).
A key that long needs no slow hash: nobody can guess it, so a fast one loses nothing.
The admin API's tokens are never accepted here. Plain functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from mta.config import AccountConfig

KEY_PREFIX = "mta_"


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str  # the account named by Basic; '' with a bearer key
    secret: bytes  # the password or key


def parse_authorization(header: str | None) -> Credentials | None:
    """The credentials of an `Authorization` header (Basic or Bearer), or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return Credentials("", value.encode("utf-8", "replace"))
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return Credentials(user, password.encode()) if colon and user else None


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def api_key_hash(key: str | bytes) -> str:
    raw = key.encode() if isinstance(key, str) else key
    return "sha256$" + hashlib.sha256(raw).hexdigest()


class ApiKeys:
    """The accounts' API keys, by hash."""

    def __init__(self, accounts: Iterable[AccountConfig]) -> None:
        self._owner = {h: a.name for a in accounts for h in a.api_key_hashes}

    def account(self, key: bytes, user: str = "") -> str | None:
        """The account `key` belongs to (and that `user` names, when given), or None."""
        if not key.startswith(KEY_PREFIX.encode()):
            return None
        owner = self._owner.get(api_key_hash(key))
        if owner is None or user and not hmac.compare_digest(owner.encode(), user.encode()):
            return None
        return owner
