"""HMAC-signed tracking tokens: what a rewritten link or an open pixel names.

A token is ``<payload>.<mac>``, both base64url without padding, like the unsubscribe
tokens (mta/policy/tokens.py) but under a key and a MAC label of their own. The payload
is a msgpack list ``[1, kind, account, campaign, message, recipient, sent_at, links,
index, url]``: kind ``"c"`` (a click; index -1 is the hidden link) or ``"o"`` (an open),
sent_at the second the message was rewritten (its delivery), links how many tracked links
the message has. The original URL is inside the signed payload, so a redirect can only
ever go where the message's own link went; an altered, forged or foreign token fails the
MAC check. Nothing is stored per token.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass

import msgpack

from mta.macs import hmac_sha256

_LABEL = b"track1"
_MAC_BYTES = 16
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{8,6000}\.[A-Za-z0-9_-]{22}")
CLICK, OPEN = "c", "o"
HIDDEN = -1  # the index of the hidden link


@dataclass(frozen=True)
class TrackTarget:
    kind: str
    account: str
    campaign: str
    message: str
    recipient: str
    sent_at: int
    links: int
    index: int
    url: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac_sha256(secret, _LABEL + payload)[:_MAC_BYTES]


def make_token(secret: bytes, target: TrackTarget) -> str:
    if not secret:
        raise ValueError("the tracking secret must not be empty")
    payload = msgpack.packb([1, target.kind, target.account, target.campaign, target.message,
                             target.recipient.lower(), target.sent_at, target.links,
                             target.index, target.url], use_bin_type=True)
    return f"{_b64(payload)}.{_b64(_mac(secret, payload))}"


def read_token(secret: bytes, token: str, kind: str) -> TrackTarget | None:
    """What a genuine token of `kind` names; None for anything else."""
    if not secret or not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        return None
    payload_text, _, mac_text = token.partition(".")
    try:
        payload = base64.urlsafe_b64decode(payload_text + "=" * (-len(payload_text) % 4))
        mac = base64.urlsafe_b64decode(mac_text + "==")
    except (binascii.Error, ValueError):
        return None
    if _b64(payload) != payload_text or _b64(mac) != mac_text:
        return None  # only the canonical spelling: a changed padding bit is a changed token
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        return None
    try:
        fields = msgpack.unpackb(payload, raw=False)
    except Exception:
        return None
    if (not isinstance(fields, list) or len(fields) != 10 or fields[0] != 1
            or fields[1] != kind or not all(isinstance(f, str) for f in fields[2:6])
            or not all(isinstance(f, int) for f in fields[6:9])
            or not isinstance(fields[9], str)):
        return None
    return TrackTarget(*fields[1:])
