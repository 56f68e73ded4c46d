"""A message's MIME from its rendered parts, as the standard library's email package
writes it (policy SMTP, CRLF), at a fraction of its cost.

`reference_bytes` builds the message with `email.message.EmailMessage` (policy SMTP; the
fields the request gives are text, only those the builder makes are parsed): the
definition.
`compose` writes the same bytes from the same standard-library pieces (the header folder
of policy SMTP, the text encoder behind `set_content`, `MIMEPart` for attachments), but
skips what costs the most for values that do not need it: a header line that is short
and plain ASCII is written as it is; a header the standard library must encode or fold
goes through it (and is remembered, for the headers every recipient shares). The tests
hold the two to the same bytes (tests/test_inject_units.py).

Everything is deterministic but the per-message fields (Date, Message-ID) the caller
passes in: a multipart boundary is a digest of the parts it separates, so the same
parts always make the same message.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from email import policy as email_policy
from email.contentmanager import _encode_text  # what EmailMessage.set_content encodes with
from email.headerregistry import Address, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage, MIMEPart

# The fields the builder makes itself keep their structure (addresses, MIME parameters);
# every other one, Date and Message-ID included, is text written as given: parsed as a
# date or a message id, a value the parser does not like would be rewritten or dropped.
STRUCTURED = frozenset({"from", "to", "mime-version", "content-type", "content-disposition",
                        "content-transfer-encoding"})


def _header_registry() -> HeaderRegistry:
    registry = HeaderRegistry()
    for name in set(registry.registry) - STRUCTURED:
        registry.map_to_type(name, UnstructuredHeader)
    return registry


POLICY = email_policy.SMTP.clone(header_factory=_header_registry())
CRLF = b"\r\n"
_LINE = POLICY.max_line_length  # 78
# Values the standard library writes as they are: printable ASCII words, single spaces,
# nothing that reads as an encoded word.
_PLAIN = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*\Z")
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_SIMPLE_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                             r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\Z")
BOUNDARY_DIGITS = 24


@dataclass(frozen=True, slots=True)
class Mailbox:
    email: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Attachment:
    """An attachment and its MIME part (made once, shared by every recipient's copy)."""

    file_name: str
    content_type: str  # maintype/subtype
    data: bytes
    part: bytes = field(repr=False, default=b"")

    @classmethod
    def make(cls, file_name: str, content_type: str, data: bytes) -> Attachment:
        return cls(file_name, content_type, data,
                   attachment_part(file_name, content_type, data))


@dataclass(frozen=True, slots=True)
class Parts:
    """One recipient's message, rendered: what `compose` turns into bytes."""

    sender: Mailbox
    to: Mailbox
    subject: str | None
    headers: tuple[tuple[str, str], ...]  # in order, after Subject
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...] = ()


# --- the definition: EmailMessage ------------------------------------------------------


def reference_bytes(parts: Parts, trace: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The message as `email.message.EmailMessage` builds it (policy SMTP); `trace` are
    the per-message headers (Date, Message-ID) written after the others."""
    msg = EmailMessage(policy=POLICY)
    msg["From"] = _address(parts.sender)
    msg["To"] = _address(parts.to)
    if parts.subject is not None:
        msg["Subject"] = parts.subject
    for name, value in (*parts.headers, *trace):
        msg[name] = value
    msg["MIME-Version"] = "1.0"
    bodies = [_text_part(text, subtype) for text, subtype in _bodies(parts)]
    if len(bodies) > 1:
        bodies = [_multipart("alternative", bodies)]
    attachments = [_attachment(a) for a in parts.attachments]
    if attachments:
        bodies = [_multipart("mixed", bodies + attachments)]
    _adopt(msg, bodies[0])
    return msg.as_bytes()


def _address(box: Mailbox) -> Address:
    return Address(box.name, addr_spec=box.email)


def _bodies(parts: Parts) -> list[tuple[str, str]]:
    found = [(parts.text, "plain"), (parts.html, "html")]
    bodies = [(text, subtype) for text, subtype in found if text is not None]
    return bodies or [("", "plain")]


def _text_part(text: str, subtype: str) -> MIMEPart:
    part = MIMEPart(policy=POLICY)
    part.set_content(text, subtype=subtype)
    return part


def _attachment(attachment: Attachment) -> MIMEPart:
    maintype, _, subtype = attachment.content_type.partition("/")
    part = MIMEPart(policy=POLICY)
    part.set_content(attachment.data, maintype, subtype, filename=attachment.file_name or None)
    return part


def _multipart(subtype: str, parts: list[MIMEPart]) -> MIMEPart:
    container = MIMEPart(policy=POLICY)
    container["Content-Type"] = f"multipart/{subtype}"
    for part in parts:
        container.attach(part)
    container.set_boundary(boundary_for([p.as_bytes() for p in parts]))
    return container


def _adopt(msg: EmailMessage, part: MIMEPart) -> None:
    """Give `msg` the content headers and payload of `part`."""
    for name, value in part.raw_items():
        msg[name] = value
    msg.set_payload(part.get_payload())


# --- the same bytes, fast ----------------------------------------------------------------


def compose(parts: Parts, trace: tuple[tuple[str, str], ...] = ()) -> bytes:
    """`reference_bytes(parts, trace)`, written from the standard library's pieces."""
    head = [address_line("From", parts.sender), address_line("To", parts.to)]
    if parts.subject is not None:
        head.append(header_line("Subject", parts.subject))
    head += [header_line(name, value) for name, value in (*parts.headers, *trace)]
    head.append(folded("MIME-Version", "1.0"))
    bodies = [text_part(text, subtype) for text, subtype in _bodies(parts)]
    if len(bodies) > 1:
        bodies = [multipart("alternative", bodies)]
    if parts.attachments:
        bodies = [multipart("mixed", bodies + [a.part for a in parts.attachments])]
    return b"".join(head) + bodies[0]


def header_line(name: str, value: str) -> bytes:
    """`name: value` as policy SMTP writes it, CRLF-terminated."""
    if (len(name) + len(value) + 2 <= _LINE and _PLAIN.match(value) and "=?" not in value
            and name.lower() not in STRUCTURED):
        return f"{name}: {value}\r\n".encode("ascii")
    return folded(name, value)


def address_line(name: str, box: Mailbox) -> bytes:
    """An address header holding one mailbox, as policy SMTP writes it."""
    if _SIMPLE_ADDRESS.match(box.email) and (not box.name or _ATOMS.match(box.name)):
        value = f"{box.name} <{box.email}>" if box.name else box.email
        if len(name) + len(value) + 2 <= _LINE:
            return f"{name}: {value}\r\n".encode("ascii")
    return _folded_address(name, box.name, box.email)


@functools.lru_cache(maxsize=4096)
def folded(name: str, value: str) -> bytes:
    """The standard library's own writing of a header (remembered: most are shared)."""
    return POLICY.fold_binary(name, POLICY.header_store_parse(name, value)[1])


@functools.lru_cache(maxsize=1024)
def _folded_address(name: str, display: str, email: str) -> bytes:
    msg = EmailMessage(policy=POLICY)
    msg[name] = Address(display, addr_spec=email)
    return POLICY.fold_binary(name, msg[name])


def text_part(text: str, subtype: str) -> bytes:
    """A text/* part's headers, blank line and body, as `set_content(text)` makes it."""
    cte, payload = _encode_text(text, "utf-8", None, POLICY)
    body = payload.replace("\n", "\r\n").encode("ascii", "surrogateescape")
    return _text_headers(subtype, cte) + CRLF + body


@functools.cache
def _text_headers(subtype: str, cte: str) -> bytes:
    part = MIMEPart(policy=POLICY)
    part.set_content("", subtype=subtype)
    part.replace_header("Content-Transfer-Encoding", cte)
    return b"".join(POLICY.fold_binary(k, v) for k, v in part.raw_items())


def multipart(subtype: str, parts: list[bytes]) -> bytes:
    """A multipart/* entity of `parts` (each headers + body), as the generator writes it."""
    boundary = boundary_for(parts)
    delimiter = f"--{boundary}".encode("ascii")
    value = f'multipart/{subtype}; boundary="{boundary}"'
    head = (f"Content-Type: {value}\r\n".encode("ascii") if len(value) + 14 <= _LINE
            else folded("Content-Type", value))
    inner = (CRLF + delimiter + CRLF).join(parts)
    return head + CRLF + delimiter + CRLF + inner + CRLF + delimiter + b"--" + CRLF


def boundary_for(parts: list[bytes]) -> str:
    """A boundary found in none of `parts`: a digest of them (so the same parts always
    get the same one), salted again in the unlikely case it occurs in them."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    salt = 0
    while True:
        boundary = "=_" + digest.hexdigest()[:BOUNDARY_DIGITS]
        delimiter = b"--" + boundary.encode("ascii")
        if not any(delimiter in part for part in parts):
            return boundary
        salt += 1
        digest.update(b"%d" % salt)


def attachment_part(file_name: str, content_type: str, data: bytes) -> bytes:
    """An attachment's part (base64), as `EmailMessage.add_attachment` makes it."""
    return _attachment(Attachment(file_name, content_type, data)).as_bytes()
