"""Message splitting and DKIM "relaxed" canonicalization (RFC 6376 3.4.2 and 3.4.4).

Plain functions on bytes, no I/O. Input is expected to have CRLF line ends
already (see `normalize_line_endings`); the signer applies that first.
"""

from __future__ import annotations

import re

CRLF = b"\r\n"

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD_SPLIT = re.compile(rb"\r\n(?![ \t])")
_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")

HeaderField = tuple[bytes, bytes]
"""One header field as it appears: (name, raw value after the colon, folding kept)."""


def normalize_line_endings(data: bytes) -> bytes:
    """Turn every bare CR, bare LF and CRLF into CRLF; other bytes are unchanged."""
    crlf = data.count(CRLF)
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data
    return _LINE_END.sub(CRLF, data)


def ensure_final_crlf(data: bytes) -> bytes:
    """Add a CRLF to non-empty data that does not end with one (SMTP DATA adds it anyway)."""
    if data and not data.endswith(CRLF):
        return data + CRLF
    return data


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """Split a CRLF message into its header block (each field ending in CRLF) and its body."""
    if message.startswith(CRLF):
        return b"", message[2:]
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        return ensure_final_crlf(message), b""
    return head + CRLF, body


def parse_header_fields(header_block: bytes) -> list[HeaderField]:
    """Split a header block into (name, raw value) pairs, in order; lines without a colon are skipped."""
    if not header_block:
        return []
    fields: list[HeaderField] = []
    for raw in _FIELD_SPLIT.split(header_block.removesuffix(CRLF)):
        name, colon, value = raw.partition(b":")
        if colon:
            fields.append((name, value))
    return fields


def field_key(name: bytes) -> bytes:
    """The name a header field is matched by: lowercase, trailing whitespace dropped."""
    return name.rstrip(b" \t").lower()


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """Canonicalize one header field with "relaxed" (RFC 6376 3.4.2), CRLF included."""
    unfolded = value.replace(CRLF, b"")
    return field_key(name) + b":" + _WSP_RUN.sub(b" ", unfolded).strip(b" \t") + CRLF


def relaxed_body(body: bytes) -> bytes:
    """Canonicalize a body with "relaxed" (RFC 6376 3.4.4)."""
    body = _WSP_BEFORE_CRLF.sub(CRLF, ensure_final_crlf(body))
    body = _WSP_RUN.sub(b" ", body)
    stripped = body.rstrip(CRLF)
    return stripped + CRLF if stripped else b""
