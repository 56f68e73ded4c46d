"""HMAC-SHA256 with each key's state prepared once.

`hmac.digest` sets the key up again on every call (with OpenSSL 3 that includes
looking the algorithm up); the engine makes several tokens for every message it sends
(unsubscribe, VERP, tracking), always with one of a few keys. A copy of a keyed state
gives the same digest for less.
"""

from __future__ import annotations

import functools
import hashlib
import hmac


@functools.lru_cache(maxsize=64)
def _keyed(secret: bytes) -> hmac.HMAC:
    return hmac.new(secret, digestmod=hashlib.sha256)


def hmac_sha256(secret: bytes, message: bytes) -> bytes:
    """hmac.digest(secret, message, "sha256")."""
    mac = _keyed(secret).copy()
    mac.update(message)
    return mac.digest()
