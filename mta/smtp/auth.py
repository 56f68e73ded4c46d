"""Password hashes for SMTP AUTH: scrypt, never plain text.

Format: ``scrypt$<log2 N>$<r>$<p>$<salt b64>$<hash b64>``. `mta account
hash-password` prints one for the config. Verified passwords are remembered
(as a keyed digest) so a client that authenticates on every connection does
not cost a full scrypt each time, and the same password checked on several
connections at once costs one (`InFlight`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable

_DEFAULT_LOG_N, _DEFAULT_R, _DEFAULT_P = 14, 8, 1


def hash_password(password: str, log_n: int = _DEFAULT_LOG_N) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password.encode(), salt, log_n, _DEFAULT_R, _DEFAULT_P)
    return "$".join([
        "scrypt", str(log_n), str(_DEFAULT_R), str(_DEFAULT_P),
        base64.b64encode(salt).decode(), base64.b64encode(digest).decode(),
    ])


def _scrypt(password: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=1 << log_n, r=r, p=p, maxmem=256 * 1024**2,
                          dklen=32)


def check_hash_format(encoded: str) -> None:
    """Raise ValueError unless `encoded` is a hash this module can verify."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isdigit() for x in parts[1:4]):
        raise ValueError("is not an scrypt hash (make one with `mta account hash-password`)")
    base64.b64decode(parts[4], validate=True)
    base64.b64decode(parts[5], validate=True)


def verify_password(password: bytes, encoded: str) -> bool:
    try:
        _, log_n, r, p, salt, digest = encoded.split("$")
        expected = base64.b64decode(digest)
        got = _scrypt(password, base64.b64decode(salt), int(log_n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, got)


class PasswordChecker:
    """Checks account passwords, remembering the ones already verified."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = hashes
        self._key = os.urandom(32)
        self._verified: set[bytes] = set()
        self._dummy = _dummy_like(hashes.values())

    def check(self, user: str, password: bytes) -> bool:
        encoded = self._hashes.get(user)
        if not encoded:
            # Spend the same time for unknown users as for known ones.
            verify_password(password, self._dummy)
            return False
        token = self.token(user, password)
        if token in self._verified:
            return True
        if verify_password(password, encoded):
            self._verified.add(token)
            return True
        return False

    def known(self, user: str, password: bytes) -> bool:
        """True if this very password was verified before: right, at no scrypt cost."""
        return user in self._hashes and self.token(user, password) in self._verified

    def token(self, user: str, password: bytes) -> bytes:
        """A keyed digest naming this attempt: the user, the password, the account's hash."""
        encoded = self._hashes.get(user, "")
        return hmac.digest(self._key, user.encode() + b"\0" + password + encoded.encode(),
                           "sha256")


class InFlight:
    """One run at a time of a check per key: callers that ask while it runs share its
    result (a sending app opening twenty connections with one password costs one scrypt,
    not twenty). Nothing is kept once it is over; a caller that goes away does not stop
    it for the others."""

    def __init__(self) -> None:
        self._running: dict[bytes, asyncio.Future[bool]] = {}

    async def run(self, key: bytes, check: Callable[[], Awaitable[bool]]) -> bool:
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(check())
            running.add_done_callback(lambda _: self._running.pop(key, None))
        return await asyncio.shield(running)


_DUMMY_HASH = "scrypt$14$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def _dummy_like(hashes: Iterable[str]) -> str:
    """A hash no password matches, with the cost of the accounts' own (the most common
    one), so an unknown user costs the same time as a known one with a wrong password."""
    costs = Counter("$".join(h.split("$")[1:4]) for h in hashes if h.count("$") == 5)
    if not costs:
        return _DUMMY_HASH
    return f"scrypt${costs.most_common(1)[0][0]}$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="
