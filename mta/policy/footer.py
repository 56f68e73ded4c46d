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

With an `UnsubscribeLink` the recipient's unsubscribe URL is made visible too: every
inline text and HTML part holding the placeholder (``{{unsubscribe_url}}`` unless
configured otherwise) gets it in place of the placeholder (HTML-escaped in HTML), and
the first text and first HTML part without it get a link appended after the branding.

Simple MIME is changed on the raw bytes (mta.policy.mimeparts, about 30 times faster);
the `email` package walk below is the fallback for everything else.
"""

from __future__ import annotations

import base64
import email.quoprimime
import html
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.policy import SMTP

from mta.policy.mimeparts import Leaf, change_text_parts, content_type, header_block

POLICY = SMTP.clone(max_line_length=998)
_KNOWN_CTE = ("7bit", "8bit", "binary", "quoted-printable", "base64")
_BODY_END = re.compile(r"</body\s*>", re.I)
_HTML_END = re.compile(r"</html\s*>", re.I)


_SMALL = "font-size:12px;color:#666666"


@dataclass(frozen=True)
class UnsubscribeLink:
    """One recipient's visible unsubscribe link: where the placeholder is, else appended."""

    url: str
    placeholder: str = "{{unsubscribe_url}}"
    label: str = "Unsubscribe"

    def text_line(self) -> str:
        return f"{self.label}: {self.url}"

    def html_line(self) -> str:
        return (f'<p style="{_SMALL}"><a href="{html.escape(self.url)}">'
                f'{html.escape(self.label)}</a></p>')

    def in_text(self, body: str) -> tuple[str, bool]:
        """The body with the placeholder replaced, and whether it held one."""
        if self.placeholder and self.placeholder in body:
            return body.replace(self.placeholder, self.url), True
        return body, False

    def in_html(self, body: str) -> tuple[str, bool]:
        if self.placeholder and self.placeholder in body:
            return body.replace(self.placeholder, html.escape(self.url)), True
        return body, False


def html_footer(text: str, footer_html: str = "") -> str:
    if not text and not footer_html:
        return ""
    return footer_html or f'<p style="{_SMALL}">{html.escape(text)}</p>'


def add_footer(data: bytes, text: str, footer_html: str = "",
               link: UnsubscribeLink | None = None) -> bytes:
    """`data` with the footer (`text`, may be empty) and the unsubscribe link (if given) in
    its first text and first HTML part, the placeholder replaced in every text part
    (unchanged if there is nothing to do)."""
    plain = append_to_plain(data, text, link)
    if plain is not None:
        return plain
    rich_footer = html_footer(text, footer_html)

    def change(leaf: Leaf, body: str, ordinal: int) -> str:
        if leaf.ctype == "text/plain":
            return plain_change(body, text, link, ordinal == 0)
        return html_change(body, rich_footer, link, ordinal == 0)

    fast = change_text_parts(data, change)
    if fast is not None:
        return fast
    message = parse(data)
    first_plain, first_rich = first_text_parts(message)
    changed = False
    for part in inline_leaves(message):
        ctype = part.get_content_type()
        if ctype == "text/plain":
            last = part is first_plain
            changed |= append_to_part(
                part, lambda body, last=last: plain_change(body, text, link, last))
        elif ctype == "text/html":
            last = part is first_rich
            changed |= append_to_part(
                part, lambda body, last=last: html_change(
                    body, html_footer(text, footer_html), link, last))
    if not changed:
        return data
    return serialize(message)


def plain_change(body: str, text: str, link: UnsubscribeLink | None, footer: bool) -> str:
    """A text part's body with the placeholder replaced and, when `footer`, the footer and
    (where the placeholder was not) the link appended."""
    placed = False
    if link is not None:
        body, placed = link.in_text(body)
    if not footer:
        return body
    lines = [line for line in (text, link.text_line() if link and not placed else "") if line]
    return with_text_footer(body, "\n".join(lines)) if lines else body


def html_change(body: str, footer_html: str, link: UnsubscribeLink | None,
                footer: bool) -> str:
    placed = False
    if link is not None:
        body, placed = link.in_html(body)
    if not footer:
        return body
    addition = footer_html + (link.html_line() if link and not placed else "")
    return with_html_footer(body, addition) if addition else body


def append_to_plain(data: bytes, text: str, link: UnsubscribeLink | None = None
                    ) -> bytes | None:
    """The fast path: a single text/plain part that takes the footer as it is (no transfer
    encoding to undo, a charset that carries it) gets it appended; None otherwise."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    fields, _ = header_block(data, 0, end + 4)
    ctype, params = content_type(fields.get("content-type", ""))
    cte = (fields.get("content-transfer-encoding") or "7bit").lower()
    charset = params.get("charset", "us-ascii").lower()
    disposition = fields.get("content-disposition", "").split(";", 1)[0].strip().lower()
    added = text + (link.url + link.placeholder + link.label if link else "")
    if (ctype != "text/plain" or disposition == "attachment"
            or any(name.endswith("*") for name in params)  # RFC 2231: the email package
            or cte not in ("7bit", "8bit") or charset not in ("us-ascii", "utf-8")
            or not (added.isascii() or (charset == "utf-8" and cte == "8bit"))):
        return None
    body = data[end + 4:]
    lines = [text] if text else []
    if link is not None:
        mark = link.placeholder.encode()
        if mark and mark in body:
            body = body.replace(mark, link.url.encode())
        else:
            lines.append(link.text_line())
    if not lines:
        return data[: end + 4] + body if body != data[end + 4:] else data
    if body and not body.endswith(b"\n"):
        body += b"\r\n"
    return data[: end + 4] + body + b"\r\n" + "\r\n".join(lines).encode() + b"\r\n"


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
    """`text` (lines joined by LF) appended after an empty line, in the body's newlines."""
    newline = "\r\n" if "\r\n" in body else "\n"
    if body and not body.endswith(("\n", "\r")):
        body += newline
    return f"{body}{newline}{text.replace(chr(10), newline)}{newline}"


def with_html_footer(body: str, footer: str) -> str:
    for pattern in (_BODY_END, _HTML_END):
        matches = list(pattern.finditer(body))
        if matches:
            at = matches[-1].start()
            return body[:at] + footer + body[at:]
    return body + footer


def append_to_part(part: Message, change: Callable[[str], str]) -> bool:
    """Decode, change and re-encode one leaf part in place; False if it could not be."""
    body = decoded_body(part)
    if body is None:
        return False
    new_body = change(body)
    if new_body == body:
        return False
    replace_body(part, new_body)
    return True


def decoded_body(part: Message) -> str | None:
    """A leaf part's text, its transfer encoding and charset undone; None if it cannot be."""
    cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte not in _KNOWN_CTE:
        return None
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return None
    try:
        return raw.decode(part.get_content_charset() or "us-ascii")
    except (LookupError, UnicodeDecodeError):
        return None


def replace_body(part: Message, body: str) -> None:
    """Set a (decodable) leaf part's text, encoded as the part was (UTF-8 if need be)."""
    cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    charset = part.get_content_charset() or "us-ascii"
    try:
        encoded = body.encode(charset)
    except UnicodeEncodeError:
        charset, encoded = "utf-8", body.encode("utf-8")
        part.set_param("charset", charset)
    part.set_payload(encode_body(part, cte, encoded))


def parse(data: bytes) -> Message:
    return BytesParser(policy=POLICY).parsebytes(data)


def text_bodies(message: Message) -> list[tuple[Message, str]]:
    """The inline text/plain and text/html leaves that decode, with their text."""
    found = []
    for part in inline_leaves(message):
        if part.get_content_type() in ("text/plain", "text/html"):
            body = decoded_body(part)
            if body is not None:
                found.append((part, body))
    return found


def serialize(message: Message) -> bytes:
    if message.get("MIME-Version") is None and (
            message.get("Content-Type") or message.get("Content-Transfer-Encoding")):
        message["MIME-Version"] = "1.0"  # a plain RFC 5322 message that became MIME
    return message.as_bytes(policy=POLICY)


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

