"""Message splitting and DKIM "relaxed" canonicalization (RFC 6376 3.4.2 and 3.4.4).

Plain functions on bytes, no I/O. The hot ones are built from bytes methods
(split, replace, partition), which run at C speed, and regexes only where they
have a literal prefix: a regex like [ \t]+ over a 4 KB body costs more than the
rest of the signing put together. Input is expected to have CRLF line ends
already (see `normalize_line_endings`); the signer applies that first.
"""

from __future__ import annotations

import re

CRLF = b"\r\n"
_SPACE_RUN = re.compile(rb"  +")

CanonicalField = tuple[bytes, bytes]
"""One header field canonicalized with "relaxed": (lowercase name, value), no CRLF."""


def normalize_line_endings(data: bytes) -> bytes:
    """Turn every bare CR, bare LF and CRLF into CRLF; other bytes are unchanged."""
    joined = CRLF.join(data.splitlines())  # bytes.splitlines breaks at \r\n, \r and \n only
    return joined + CRLF if data.endswith((b"\r", b"\n")) else joined


def normalize_message(data: bytes) -> bytes:
    """CRLF line ends, and a final CRLF on non-empty data (SMTP DATA adds one anyway)."""
    return CRLF.join(data.splitlines()) + CRLF if data else b""


def ensure_final_crlf(data: bytes) -> bytes:
    """Add a CRLF to non-empty data that does not end with one."""
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


def compress_wsp(data: bytes) -> bytes:
    """Every run of spaces and tabs to one space.

    Tabs become spaces first, so the regex has a literal prefix (two spaces) that
    the regex engine searches for quickly; most text has no such run at all.
    """
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    if b"  " in data:
        data = _SPACE_RUN.sub(b" ", data)
    return data


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """Canonicalize one header field with "relaxed" (RFC 6376 3.4.2), CRLF included."""
    unfolded = value.replace(CRLF, b"") if b"\r" in value else value
    return name.rstrip(b" \t").lower() + b":" + compress_wsp(unfolded).strip(b" ") + CRLF


def relaxed_fields(header_block: bytes) -> list[CanonicalField]:
    """Every field of a CRLF header block canonicalized with "relaxed", in order.

    The whole block is unfolded and its whitespace compressed at once, then cut
    into fields; a line without a colon is skipped.
    """
    unfolded = header_block.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t")
    fields: list[CanonicalField] = []
    for line in compress_wsp(unfolded).split(CRLF):
        name, colon, value = line.partition(b":")
        if colon:
            fields.append((name.rstrip(b" ").lower(), value.strip(b" ")))
    return fields


def relaxed_body(body: bytes) -> bytes:
    """Canonicalize a body with "relaxed" (RFC 6376 3.4.4).

    Compressing first leaves at most one space before each CRLF, so dropping the
    trailing whitespace of every line is then one replace.
    """
    body = compress_wsp(ensure_final_crlf(body)).replace(b" \r\n", CRLF)
    stripped = body.rstrip(CRLF)
    return stripped + CRLF if stripped else b""
