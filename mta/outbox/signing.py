"""The webhook signature: `X-MTA-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`.

The HMAC covers ``"<t>.<body>"`` (the decimal timestamp, a dot, the exact body bytes), so
a receiver that checks it rejects forged bodies, bodies altered after signing, and (by
refusing a `t` too far from its clock) replays of an old request. Plain functions.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-MTA-Signature"
DEFAULT_TOLERANCE = 300  # seconds a receiver accepts between `t` and its clock


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def parse_header(value: str) -> tuple[int, list[str]] | None:
    """(t, [v1 signatures]) of a header value, or None when it is malformed."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in value.split(","):
        key, _, item = part.strip().partition("=")
        if key == "t" and item.isdigit() and len(item) <= 12:
            timestamp = int(item)
        elif key == "v1" and len(item) == 64:
            signatures.append(item.lower())
    if timestamp is None or not signatures:
        return None
    return timestamp, signatures


def verify(secret: bytes, header: str, body: bytes, now: float,
           tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """True when `header` signs `body` with `secret` and its time is within `tolerance`."""
    parsed = parse_header(header)
    if parsed is None:
        return False
    timestamp, candidates = parsed
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)
