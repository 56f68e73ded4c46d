"""A fast path for changing the text parts of a message without the `email` package.

The stdlib parser builds header objects for every part and serializes the whole message
again: about 2 ms for a 4 KB multipart/alternative message here, per change. Most mail
is simple MIME, so this walks the raw bytes instead: the top-level and part headers are
read with a small unfolding parser (Content-Type, Content-Transfer-Encoding,
Content-Disposition only), multipart bodies are split on their boundary, and only the
inline text/plain and text/html leaves that are changed are decoded and re-encoded in
their own transfer encoding and charset; every other byte is kept as it came.

Whenever something is not plainly simple (an unknown or missing boundary, a transfer
encoding other than 7bit/8bit/binary/quoted-printable/base64, a charset Python does not
know or that cannot carry the change, 7bit text becoming non-ASCII, nesting deeper than
`MAX_DEPTH`), `change_text_parts` answers None and the caller uses the `email` package
(mta.policy.footer), which handles all of those.
"""

from __future__ import annotations

import base64
import binascii
import email.quoprimime
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_DEPTH = 5
_FIELD_START = re.compile(rb"\r\n(?![ \t])")  # a line end not followed by a fold
_QUOTED_PAIR = re.compile(r"\\(.)")
_PARAM = re.compile(r';\s*([A-Za-z0-9_.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


@dataclass
class Leaf:
    ctype: str
    charset: str
    cte: str
    start: int  # the body's first byte in the data
    end: int  # after its last byte


class Unsimple(Exception):
    """Leave this message to the email package."""


def header_block(data: bytes, start: int, end: int) -> tuple[dict[str, str], int]:
    """The wanted fields of the header block at `start`, and where its body starts."""
    if data.startswith(b"\r\n", start):  # no headers at all
        block, body = b"", start + 2
    else:
        at = data.find(b"\r\n\r\n", start, end)
        if at < 0:
            raise Unsimple
        block, body = data[start: at + 2], at + 4
    fields: dict[str, str] = {}
    for line in _FIELD_START.split(block):
        name, colon, value = line.partition(b":")
        key = name.strip().lower()
        if colon and key in (b"content-type", b"content-transfer-encoding",
                             b"content-disposition"):
            # the first of a repeated field, as the email package reads it
            fields.setdefault(key.decode(), value.decode("latin-1").replace("\r\n", "").strip())
    return fields, body


def content_type(value: str) -> tuple[str, dict[str, str]]:
    main = value.split(";", 1)[0].strip().lower() or "text/plain"
    params = {}
    for name, raw in _PARAM.findall(value):
        if raw.startswith('"'):
            raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
        params[name.lower()] = raw
    return main, params


def leaves(data: bytes, start: int, end: int, depth: int = 0) -> list[Leaf]:
    """The inline leaves of the entity at data[start:end] (its headers first)."""
    if depth > MAX_DEPTH:
        raise Unsimple
    fields, body = header_block(data, start, end)
    ctype, params = content_type(fields.get("content-type", "text/plain"))
    if "/" not in ctype:
        raise Unsimple
    if ctype.startswith("multipart/"):
        boundary = params.get("boundary", "")
        if not boundary or len(boundary) > 70:
            raise Unsimple
        found: list[Leaf] = []
        for part_start, part_end in split_parts(data, body, end, boundary.encode("latin-1")):
            found.extend(leaves(data, part_start, part_end, depth + 1))
        return found
    disposition = fields.get("content-disposition", "").split(";", 1)[0].strip().lower()
    if ctype.startswith("message/") or disposition == "attachment":
        return []
    cte = fields.get("content-transfer-encoding", "7bit").lower()
    return [Leaf(ctype, params.get("charset", "us-ascii").lower(), cte, body, end)]


def split_parts(data: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Where each body part between the delimiters lies (the CRLF before a delimiter
    belongs to it, RFC 2046 5.1.1)."""
    marker = b"--" + boundary
    at = start if data.startswith(marker, start) else data.find(b"\r\n" + marker, start, end)
    if at < 0:
        raise Unsimple
    at = at if at == start and data.startswith(marker, start) else at + 2
    parts = []
    while True:
        after = at + len(marker)
        if data.startswith(b"--", after):
            return parts  # the close delimiter
        line_end = data.find(b"\r\n", after, end)
        if line_end < 0 or data[after:line_end].strip(b" \t"):
            raise Unsimple
        part_start = line_end + 2
        nxt = data.find(b"\r\n" + marker, part_start - 2, end)
        if nxt < 0:
            raise Unsimple  # no close delimiter
        parts.append((part_start, max(nxt, part_start)))
        at = nxt + 2


def decode(leaf: Leaf, raw: bytes) -> str:
    if leaf.cte in ("7bit", "8bit", "binary"):
        payload = raw
    elif leaf.cte == "quoted-printable":
        payload = binascii.a2b_qp(raw)
    elif leaf.cte == "base64":
        try:
            payload = base64.b64decode(raw)
        except (binascii.Error, ValueError):
            raise Unsimple from None
    else:
        raise Unsimple
    try:
        return payload.decode(leaf.charset)
    except (LookupError, UnicodeDecodeError):
        raise Unsimple from None


def encode(leaf: Leaf, text: str) -> bytes:
    try:
        payload = text.encode(leaf.charset)
    except UnicodeEncodeError:
        raise Unsimple from None  # the charset changes: the email package rewrites headers
    if leaf.cte == "base64":
        return base64.encodebytes(payload).replace(b"\n", b"\r\n")
    if leaf.cte == "quoted-printable":
        return email.quoprimime.body_encode(payload.decode("latin-1"), maxlinelen=76,
                                            eol="\r\n").encode("ascii")
    if leaf.cte == "7bit" and not payload.isascii():
        raise Unsimple
    return payload


def change_text_parts(data: bytes, change: Callable[[Leaf, str, int], str | None]
                      ) -> bytes | None:
    """`data` with each inline text/plain and text/html leaf's text replaced by
    change(leaf, text, ordinal) (None: unchanged; ordinal counts leaves of that type);
    `data` itself if nothing changed, None if the message is not simple enough."""
    try:
        found = leaves(data, 0, len(data))
        pieces, last, seen = [], 0, {"text/plain": 0, "text/html": 0}
        for leaf in found:
            if leaf.ctype not in seen:
                continue
            ordinal = seen[leaf.ctype]
            seen[leaf.ctype] += 1
            text = decode(leaf, data[leaf.start: leaf.end])
            new = change(leaf, text, ordinal)
            if new is None or new == text:
                continue
            raw = data[leaf.start: leaf.end]
            encoded = encode(leaf, new)
            if leaf.cte in ("base64", "quoted-printable"):  # end as the original ended
                encoded = encoded.rstrip(b"\r\n") + (b"\r\n" if raw.endswith(b"\n") else b"")
            pieces += [data[last: leaf.start], encoded]
            last = leaf.end
    except Unsimple:
        return None
    if not pieces:
        return data
    pieces.append(data[last:])
    return b"".join(pieces)
