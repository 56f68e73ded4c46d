"""VERP return paths: ``<prefix>+<token>@<domain>`` naming the message and recipient.

The token is lower-case base32 (RFC 4648 alphabet, no padding), so a remote
MTA that changes the case of the local part does not break it. Its bytes::

    header   1 byte   bits 7-6 version (0), bits 5-4 id form, bits 3-2 recipient form
    id len   1 byte   length of the id field
    id       n bytes  hex ids packed two digits a byte (upper or lower case), else ASCII
    rcpt     m bytes  the recipient, lower-cased, as a base-41 number over
                      ``a-z 0-9 . - _ @ +`` (about 5.4 bits a character); addresses
                      with other characters are stored as UTF-8; or, in index form,
                      a 2-byte recipient index
    mac      8 bytes  HMAC-SHA256(secret, b"verp0" + everything above), truncated to 64 bits

With the engine's 20-hex-digit message ids and a short prefix, recipients up to
about 30 characters fit in the 64-character local-part limit of RFC 5321. When
the full token would not fit and the caller passes ``recipient_index`` (the
recipient's position in the message's envelope), the token names the message
and that index instead; ``parse_return_path`` then returns ``"#<index>"`` as the
recipient and the caller looks the address up in its spool. Without an index a
longer local part is produced (most MTAs accept it).
"""

from __future__ import annotations

import base64
import hmac
import re
from dataclasses import dataclass

from mta.macs import hmac_sha256

MAX_LOCAL_PART = 64
MAC_BYTES = 8
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.-_@+"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
_PACKABLE = re.compile("[" + re.escape(_ALPHABET) + "]+")
_PAIR_BASE = len(_ALPHABET) ** 2
_PAIR_VALUE = {a + b: _INDEX[a] * len(_ALPHABET) + _INDEX[b] for a in _ALPHABET for b in _ALPHABET}
_ID_HEX_UPPER, _ID_HEX_LOWER, _ID_ASCII = 0, 1, 2
_RCPT_PACKED, _RCPT_UTF8, _RCPT_INDEX = 0, 1, 2
_TOKEN_RE = re.compile(r"[a-z2-7]{20,200}")
_MAC_LABEL = b"verp0"


@dataclass(frozen=True)
class VerpToken:
    message_id: str
    recipient: str | None
    recipient_index: int | None


def make_return_path(
    secret: bytes,
    prefix: str,
    domain: str,
    message_id: str,
    recipient: str,
    recipient_index: int | None = None,
) -> str:
    """``<prefix>+<token>@<domain>`` whose token names ``message_id`` and ``recipient``."""
    room = MAX_LOCAL_PART - len(prefix) - 1
    id_form, id_bytes = _pack_id(message_id)
    rcpt_form, rcpt_bytes = _pack_recipient(recipient)
    if recipient_index is not None and _b32_length(
            2 + len(id_bytes) + len(rcpt_bytes) + MAC_BYTES) > room:
        rcpt_form, rcpt_bytes = _RCPT_INDEX, _pack_index(recipient_index)
    return f"{prefix}+{_b32(_signed(secret, id_form, id_bytes, rcpt_form, rcpt_bytes))}@{domain}"


def parse_return_path(secret: bytes, address: str) -> tuple[str, str] | None:
    """(message_id, recipient) from a VERP address, or None if absent, altered or forged.

    For index-form tokens the recipient is ``"#<index>"``.
    """
    token = decode_return_path(secret, address)
    if token is None:
        return None
    if token.recipient is not None:
        return token.message_id, token.recipient
    return token.message_id, f"#{token.recipient_index}"


def decode_return_path(secret: bytes, address: str) -> VerpToken | None:
    local = address.strip().strip("<>").rsplit("@", 1)[0]
    if "+" not in local:
        return None
    return decode_token(secret, local.split("+", 1)[1])


def looks_like_token(text: str) -> bool:
    return _TOKEN_RE.fullmatch(text.lower()) is not None


def encode_token(
    secret: bytes, message_id: str, recipient: str | None, recipient_index: int | None = None
) -> str:
    return _b32(_token_bytes(secret, message_id, recipient, recipient_index))


def _token_bytes(
    secret: bytes, message_id: str, recipient: str | None, recipient_index: int | None = None
) -> bytes:
    id_form, id_bytes = _pack_id(message_id)
    if recipient is None:
        if recipient_index is None:
            raise ValueError("recipient_index must be in 0..65535")
        rcpt_form, rcpt_bytes = _RCPT_INDEX, _pack_index(recipient_index)
    else:
        rcpt_form, rcpt_bytes = _pack_recipient(recipient)
    return _signed(secret, id_form, id_bytes, rcpt_form, rcpt_bytes)


def _signed(secret: bytes, id_form: int, id_bytes: bytes, rcpt_form: int,
            rcpt_bytes: bytes) -> bytes:
    if not secret:
        raise ValueError("VERP secret must not be empty")
    body = bytes([(id_form << 4) | (rcpt_form << 2), len(id_bytes)]) + id_bytes + rcpt_bytes
    return body + _mac(secret, body)


def _pack_index(recipient_index: int) -> bytes:
    if not 0 <= recipient_index < 65536:
        raise ValueError("recipient_index must be in 0..65535")
    return recipient_index.to_bytes(2, "big")


def _b32_length(raw_length: int) -> int:
    return (raw_length * 8 + 4) // 5


def _b32(raw: bytes) -> str:
    """Lower-case base32 without padding."""
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def decode_token(secret: bytes, token: str) -> VerpToken | None:
    raw = _b32decode(token)
    if raw is None or len(raw) < 2 + MAC_BYTES:
        return None
    body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(secret, body)):
        return None
    try:
        return _unpack(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac_sha256(secret, _MAC_LABEL + body)[:MAC_BYTES]


_BASE32 = re.compile(r"[A-Z2-7]+")
_HEX_UPPER = re.compile(r"[0-9A-F]+")
_HEX_LOWER = re.compile(r"[0-9a-f]+")


def _b32decode(token: str) -> bytes | None:
    token = token.strip().upper()
    if not token or not _BASE32.fullmatch(token):
        return None
    try:
        return base64.b32decode(token + "=" * (-len(token) % 8))
    except ValueError:
        return None


def _pack_id(message_id: str) -> tuple[int, bytes]:
    if message_id and len(message_id) % 2 == 0 and _HEX_UPPER.fullmatch(message_id):
        return _ID_HEX_UPPER, bytes.fromhex(message_id)
    if message_id and len(message_id) % 2 == 0 and _HEX_LOWER.fullmatch(message_id):
        return _ID_HEX_LOWER, bytes.fromhex(message_id)
    data = message_id.encode("utf-8")
    if len(data) > 255:
        raise ValueError("message id too long for a VERP token")
    return _ID_ASCII, data


def _pack_recipient(recipient: str) -> tuple[int, bytes]:
    address = recipient.strip().strip("<>").lower()
    if _PACKABLE.fullmatch(address):
        odd = len(address) % 2  # a leading 1 digit, then the characters two at a time
        number = len(_ALPHABET) + _INDEX[address[0]] if odd else 1
        for at in range(odd, len(address), 2):
            number = number * _PAIR_BASE + _PAIR_VALUE[address[at: at + 2]]
        return _RCPT_PACKED, number.to_bytes((number.bit_length() + 7) // 8, "big")
    return _RCPT_UTF8, address.encode("utf-8")


def _unpack(body: bytes) -> VerpToken:
    header, id_len = body[0], body[1]
    if header >> 6 != 0:
        raise ValueError("unknown token version")
    id_form, rcpt_form = (header >> 4) & 3, (header >> 2) & 3
    id_bytes, rest = body[2 : 2 + id_len], body[2 + id_len :]
    if len(id_bytes) != id_len:
        raise ValueError("truncated token")
    message_id = _unpack_id(id_form, id_bytes)
    if rcpt_form == _RCPT_INDEX:
        if len(rest) != 2:
            raise ValueError("bad index")
        return VerpToken(message_id, None, int.from_bytes(rest, "big"))
    if rcpt_form == _RCPT_UTF8:
        return VerpToken(message_id, rest.decode("utf-8"), None)
    if rcpt_form == _RCPT_PACKED:
        return VerpToken(message_id, _unpack_recipient(rest), None)
    raise ValueError("unknown recipient form")


def _unpack_id(form: int, data: bytes) -> str:
    if form == _ID_HEX_UPPER:
        return data.hex().upper()
    if form == _ID_HEX_LOWER:
        return data.hex()
    if form == _ID_ASCII:
        return data.decode("utf-8")
    raise ValueError("unknown id form")


def _unpack_recipient(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    chars: list[str] = []
    while number > 1:
        number, digit = divmod(number, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    if number != 1:
        raise ValueError("bad packed recipient")
    return "".join(reversed(chars))
