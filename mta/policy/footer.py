"""The footer line added to mail of accounts not on the pro plan, MIME-aware.

The message is read with the stdlib `email` package (policy SMTP); the first inline
text/plain part and the first inline text/html part get the footer (attachments and
attached messages are left alone). A part's body is decoded from its
Content-Transfer-Encoding and charset, the footer appended (in HTML, before
``</body>``), and the result re-encoded the same way: base64 stays base64,
quoted-printable stays quoted-printable, 7bit becomes quoted-printable only when the
footer is not ASCII, and a charset that cannot carry the footer becomes UTF-8. Headers
and untouched parts are written back as they came (the policy only refolds lines
longer than 998 characters). A part that cannot be decoded is left as it is.
"""

from __future__ import annotations

import base64
import email.quoprimime
import html
import re
from collections.abc import Callable, Iterator
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import SMTP, compat32

POLICY = SMTP.clone(max_line_length=998)
_KNOWN_CTE = ("7bit", "8bit", "binary", "quoted-printable", "base64")
_BODY_END = re.compile(r"</body\s*>", re.I)
_HTML_END = re.compile(r"</html\s*>", re.I)


def html_footer(text: str, footer_html: str = "") -> str:
    return footer_html or f'<p style="font-size:12px;color:#666666">{html.escape(text)}</p>'


def add_footer(data: bytes, text: str, footer_html: str = "") -> bytes:
    """`data` with the footer in its first text and first HTML part (unchanged if none)."""
    plain = append_to_plain(data, text)
    if plain is not None:
        return plain
    message = BytesParser(policy=POLICY).parsebytes(data)
    plain, rich = first_text_parts(message)
    changed = False
    if plain is not None:
        changed |= append_to_part(plain, lambda body: with_text_footer(body, text))
    if rich is not None:
        changed |= append_to_part(
            rich, lambda body: with_html_footer(body, html_footer(text, footer_html)))
    if not changed:
        return data
    if message.get("MIME-Version") is None and (
            message.get("Content-Type") or message.get("Content-Transfer-Encoding")):
        message["MIME-Version"] = "1.0"  # a plain RFC 5322 message that became MIME
    return message.as_bytes(policy=POLICY)


def append_to_plain(data: bytes, text: str) -> bytes | None:
    """The fast path: a single text/plain part that takes the footer as it is (no transfer
    encoding to undo, a charset that carries it) gets it appended; None otherwise."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    headers = BytesHeaderParser(policy=compat32).parsebytes(data[: end + 4])
    cte = (headers.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    charset = (headers.get_content_charset() or "us-ascii").lower()
    if (headers.get_content_type() != "text/plain"
            or headers.get_content_disposition() == "attachment"
            or cte not in ("7bit", "8bit") or charset not in ("us-ascii", "utf-8")
            or not (text.isascii() or (charset == "utf-8" and cte == "8bit"))):
        return None
    body = data[end + 4:]
    if body and not body.endswith(b"\n"):
        body += b"\r\n"
    return data[: end + 4] + body + b"\r\n" + text.encode() + b"\r\n"


def first_text_parts(message: Message) -> tuple[Message | None, Message | None]:
    plain = rich = None
    for part in inline_leaves(message):
        ctype = part.get_content_type()
        if ctype == "text/plain" and plain is None:
            plain = part
        elif ctype == "text/html" and rich is None:
            rich = part
    return plain, rich


def inline_leaves(part: Message) -> Iterator[Message]:
    """Leaf parts in order, not descending into attached messages, without attachments."""
    if part.get_content_maintype() == "message":
        return
    if part.is_multipart():
        for sub in part.get_payload():
            yield from inline_leaves(sub)
    elif part.get_content_disposition() != "attachment":
        yield part


def with_text_footer(body: str, text: str) -> str:
    newline = "\r\n" if "\r\n" in body else "\n"
    if body and not body.endswith(("\n", "\r")):
        body += newline
    return f"{body}{newline}{text}{newline}"


def with_html_footer(body: str, footer: str) -> str:
    for pattern in (_BODY_END, _HTML_END):
        matches = list(pattern.finditer(body))
        if matches:
            at = matches[-1].start()
            return body[:at] + footer + body[at:]
    return body + footer


def append_to_part(part: Message, change: Callable[[str], str]) -> bool:
    """Decode, change and re-encode one leaf part in place; False if it could not be."""
    cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte not in _KNOWN_CTE:
        return False
    charset = part.get_content_charset() or "us-ascii"
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return False
    try:
        body = raw.decode(charset)
    except (LookupError, UnicodeDecodeError):
        return False
    new_body = change(body)
    try:
        encoded = new_body.encode(charset)
    except UnicodeEncodeError:
        charset, encoded = "utf-8", new_body.encode("utf-8")
        part.set_param("charset", charset)
    part.set_payload(encode_body(part, cte, encoded))
    return True


def encode_body(part: Message, cte: str, data: bytes) -> str:
    """The payload text for `data` in the part's transfer encoding (updating the header)."""
    if cte == "base64":
        return base64.encodebytes(data).decode("ascii")
    if cte == "7bit" and not data.isascii():
        cte = "quoted-printable"
        _set_header(part, "Content-Transfer-Encoding", cte)
    if cte == "quoted-printable":
        return email.quoprimime.body_encode(data.decode("latin-1"), maxlinelen=76, eol="\n")
    return data.decode("ascii", "surrogateescape")


def _set_header(part: Message, name: str, value: str) -> None:
    if part.get(name) is None:
        part[name] = value
    else:
        part.replace_header(name, value)

