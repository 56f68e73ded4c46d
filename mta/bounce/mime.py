"""Bounded, exception-free MIME loading for bounce parsing.

The stdlib ``email`` package (compat32 policy, which never raises on odd
headers) does the MIME work; this module bounds what it is given (input size,
number of parts, nesting depth) and flattens the tree into the few things the
classifier needs: the readable text, the machine-readable report parts
(``message/delivery-status``, ``message/feedback-report``) and the headers of
the original message when one is attached.
"""

from __future__ import annotations

import email
import email.message
import re
from dataclasses import dataclass, field
from email import policy
from email.header import decode_header, make_header

MAX_INPUT_BYTES = 2 * 1024 * 1024
MAX_PARTS = 64
MAX_DEPTH = 8
MAX_PART_CHARS = 256 * 1024

REPORT_TYPES = ("message/delivery-status", "message/global-delivery-status")
FEEDBACK_TYPES = ("message/feedback-report",)
ORIGINAL_TYPES = (
    "message/rfc822",
    "text/rfc822-headers",
    "message/global",
    "message/global-headers",
    "message/rfc822-headers",
)

_TAG_RE = re.compile(r"<[^>]{0,2000}>")
_BLANKS_RE = re.compile(r"\n\s*\n\s*\n+")


@dataclass
class MailParts:
    """What the classifier reads from one e-mail."""

    message: email.message.Message
    texts: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    feedback: list[str] = field(default_factory=list)
    original: str = ""
    attached: email.message.Message | None = None
    content_types: list[str] = field(default_factory=list)
    report: str = ""  # the human-readable report, without the quoted original (set by the parser)
    _headers: dict[str, str] = field(default_factory=dict, repr=False)

    def header(self, name: str) -> str:
        """Decoded, unfolded header value ('' when absent); each header is decoded once."""
        key = name.lower()
        if key not in self._headers:
            self._headers[key] = header_text(self.message, name)
        return self._headers[key]


def load(data: bytes) -> MailParts:
    """Parse ``data`` (truncated to MAX_INPUT_BYTES) into MailParts."""
    data = data[:MAX_INPUT_BYTES]
    message = email.message_from_bytes(data, policy=policy.compat32)
    parts = MailParts(message=message)
    _collect(message, parts, depth=0)
    if not parts.texts and not parts.reports and not parts.feedback:
        parts.texts.append(_raw_body(data))
    return parts


def from_message(message: email.message.Message) -> MailParts:
    """MailParts of an already parsed message (an attached one)."""
    parts = MailParts(message=message)
    _collect(message, parts, depth=1)
    return parts


def header_text(message: email.message.Message, name: str) -> str:
    """Decoded, unfolded header value ('' when absent or undecodable)."""
    try:
        raw = message.get(name)
    except Exception:  # noqa: BLE001 - malformed header storage
        return ""
    if raw is None:
        return ""
    return unfold(decode_words(str(raw)))


def header_values(message: email.message.Message, name: str) -> list[str]:
    try:
        values = message.get_all(name) or []
    except Exception:  # noqa: BLE001
        return []
    return [unfold(decode_words(str(v))) for v in values]


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words, leaving the text alone on failure."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # noqa: BLE001 - bad charsets, bad base64
        return value


def unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", value).strip()


def _collect(part: email.message.Message, parts: MailParts, depth: int) -> None:
    if depth > MAX_DEPTH or len(parts.content_types) >= MAX_PARTS:
        return
    ctype = _content_type(part)
    parts.content_types.append(ctype)
    payload = part.get_payload()
    if ctype in REPORT_TYPES:
        parts.reports.append(_report_text(part))
    elif ctype in FEEDBACK_TYPES:
        parts.feedback.append(_report_text(part))
    elif ctype in ORIGINAL_TYPES:
        if not parts.original:
            parts.original = _original_text(part)
            parts.attached = _attached_message(part)
    elif isinstance(payload, list):
        _preamble(part, parts)
        for child in payload:
            if isinstance(child, email.message.Message):
                _collect(child, parts, depth + 1)
    elif part.get_content_maintype() == "text" or ctype == "application/octet-stream":
        text = decode_part(part)
        if ctype == "text/html":
            text = html_to_text(text)
        if text.strip():
            parts.texts.append(text)


_MIME_NOTICE_RE = re.compile(r"(?is)^\s*this is a (multi-part )?mime[- ]\S* message\.?\s*$")


def _preamble(part: email.message.Message, parts: MailParts) -> None:
    """Some MTAs (Courier, Sendmail) write the report before the first boundary."""
    preamble = (part.preamble or "").strip()
    if len(preamble) < 160 and "mime" in preamble.lower():
        return
    if preamble and not _MIME_NOTICE_RE.match(preamble):
        parts.texts.append(preamble[:MAX_PART_CHARS])


def _content_type(part: email.message.Message) -> str:
    try:
        return part.get_content_type()
    except Exception:  # noqa: BLE001
        return "text/plain"


def decode_part(part: email.message.Message) -> str:
    """Decoded text of a leaf part, bounded in size."""
    try:
        raw = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - broken transfer encoding
        raw = None
    if raw is None:
        payload = part.get_payload()
        return payload[:MAX_PART_CHARS] if isinstance(payload, str) else ""
    raw = raw[: MAX_PART_CHARS * 2]
    return decode_bytes(raw, _charset(part))[:MAX_PART_CHARS]


def _charset(part: email.message.Message) -> str | None:
    try:
        return part.get_content_charset()
    except Exception:  # noqa: BLE001
        return None


def decode_bytes(raw: bytes, charset: str | None) -> str:
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            return raw.decode(candidate)
        except (LookupError, UnicodeDecodeError, ValueError):
            continue
    return raw.decode("latin-1")


def _report_text(part: email.message.Message) -> str:
    """Text of a delivery-status / feedback-report part as 'Field: value' lines."""
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks = []
        for block in payload[:MAX_PARTS]:
            if isinstance(block, email.message.Message):
                lines = [f"{name}: {value}" for name, value in block.items()]
                body = block.get_payload()
                if isinstance(body, str) and body.strip():
                    lines.append(body)
                blocks.append("\n".join(lines))
        return "\n\n".join(blocks)[:MAX_PART_CHARS]
    return decode_part(part)


def _original_text(part: email.message.Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
        inner = payload[0]
        head = "\n".join(f"{name}: {value}" for name, value in inner.items())
        return head[:MAX_PART_CHARS]
    return decode_part(part)


def _attached_message(part: email.message.Message) -> email.message.Message | None:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
        return payload[0]
    return None


def _raw_body(data: bytes) -> str:
    """The body after the header block, for mail whose MIME tree is unusable."""
    text = decode_bytes(data[: MAX_PART_CHARS * 2], "utf-8")
    match = re.search(r"\r?\n\r?\n", text)
    return text[match.end() :] if match else ""


def html_to_text(html: str) -> str:
    text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", html)
    text = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</tr>|</li>", "\n", text)
    text = _TAG_RE.sub(" ", text)
    text = (
        text.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
        .replace("&quot;", '"')
    )
    return _BLANKS_RE.sub("\n\n", text)
