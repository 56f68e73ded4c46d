"""HMAC-signed unsubscribe tokens naming (account, campaign, recipient).

A token is ``<payload>.<mac>``, both base64url without padding: the payload is a
msgpack list ``[1, account, campaign, recipient]`` and the mac the first 16 bytes of
HMAC-SHA256(secret, b"unsub1" + payload). Nothing is stored per token; a forged or
altered token fails the MAC check. Tokens only use ``A-Z a-z 0-9 - _ .``, so they are
safe in URLs, mail subjects and header values.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass

import msgpack

from mta.macs import hmac_sha256

MAX_TOKEN = 2048
_MAC_LABEL = b"unsub1"
_MAC_BYTES = 16
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{8,1800}\.[A-Za-z0-9_-]{22}")


@dataclass(frozen=True)
class UnsubscribeTarget:
    account: str
    campaign: str
    recipient: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac_sha256(secret, _MAC_LABEL + payload)[:_MAC_BYTES]


def make_token(secret: bytes, account: str, campaign: str, recipient: str) -> str:
    if not secret:
        raise ValueError("the unsubscribe secret must not be empty")
    if not (account and campaign and recipient):
        raise ValueError("an unsubscribe token names an account, a campaign and a recipient")
    payload = msgpack.packb([1, account, campaign, recipient.lower()], use_bin_type=True)
    return f"{_b64(payload)}.{_b64(_mac(secret, payload))}"


def read_token(secret: bytes, token: str) -> UnsubscribeTarget | None:
    """What a genuine token names; None for anything forged, altered or malformed."""
    if not secret or not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        return None
    payload_text, _, mac_text = token.partition(".")
    try:
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        return None
    try:
        fields = msgpack.unpackb(payload, raw=False)
    except Exception:
        return None
    if (not isinstance(fields, list) or len(fields) != 4 or fields[0] != 1
            or not all(isinstance(f, str) and f for f in fields[1:])):
        return None  # every token names an account, a campaign and one recipient
    return UnsubscribeTarget(fields[1], fields[2], fields[3])


def find_token(text: str) -> str | None:
    """The first thing shaped like a token in a text (a mail subject, a local part)."""
    match = _TOKEN_RE.search(text or "")
    return match.group(0) if match else None
