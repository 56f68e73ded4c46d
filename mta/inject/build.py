"""Each recipient's message from the request: templates rendered, MIME written.

`make_builder(request, settings)` compiles the request's templates once (a syntax error
is a 422 naming the template and line) and returns a builder whose `build(recipient)`
gives that recipient's message as bytes (CRLF, as it would arrive over SMTP):

- structured `content`: From, To (the recipient), Subject, the campaign header, the
  request's headers, then Date and Message-ID (unless the request gave them), and the
  MIME entity (`mta.inject.mime`);
- a raw message (`content` as a string): each header field and the body rendered on
  their own (a value that would hold a line break is refused, so no substitution can
  add a field), line breaks made CRLF, the campaign header put first.

No I/O: the time and the message ids are the only things that come from outside.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import MessageError
from email.utils import format_datetime
from typing import Any, Protocol

from mta.address import Address, AddressError, normalize_domain, parse_mailbox
from mta.inject.mime import Mailbox, Parts, compose
from mta.inject.render import (
    Template,
    compile_template,
    context_for,
    crlf,
    header_value,
    varying_names,
)
from mta.inject.request import BadRequest, Content, InjectRequest, Recipient, smtp_address
from mta.queue.spool import new_message_id


@dataclass(frozen=True, slots=True)
class Settings:
    campaign_header: str  # [smtp] campaign_header
    hostname: str  # [engine] hostname: the right side of our Message-IDs
    max_message_size: int  # [smtp] max_message_size; 0: no limit
    max_total_size: int  # [inject] max_total_size: all messages of one request together
    tracking_header: str = "X-MTA-Tracking"  # [tracking] header: the request's `tracking`


class Unwritable(Exception):
    """This recipient's message cannot be written (its address cannot go in a header):
    `reply` is the refusal, as SMTP words it."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class Builder(Protocol):
    def build(self, recipient: Recipient, address: Address) -> bytes: ...


def make_builder(request: InjectRequest, settings: Settings,
                 new_id: Callable[[], str] = new_message_id) -> Builder:
    varying = varying_names(request.recipients)
    if request.tracking is not None and not settings.tracking_header:
        raise BadRequest(400, "tracking: the per-campaign switch is off on this server "
                              "([tracking] header is empty)")
    if isinstance(request.content, str):
        return RawBuilder(request, request.content, settings, varying)
    return StructuredBuilder(request, request.content, settings, varying, new_id)


@dataclass(frozen=True, slots=True)
class Built:
    """A recipient, its address and its message; or the reply refusing it."""

    recipient: Recipient
    address: Address | None
    data: bytes | str  # a string: the refusal, as SMTP words it


def build_each(builder: Builder, recipients: Iterable[Recipient], settings: Settings
               ) -> Iterator[Built]:
    """Each recipient's message, or the reply refusing it (an address SMTP would refuse,
    or one a header cannot hold). Within the size limits: one message over
    `max_message_size`, or all together over `max_total_size`, is a 413; a NUL (which
    SMTP intake refuses too) a 422."""
    total = 0
    for recipient in recipients:
        address = smtp_address(recipient.email)
        if isinstance(address, str):
            yield Built(recipient, None, address)
            continue
        try:
            data = builder.build(recipient, address)
        except Unwritable as exc:
            yield Built(recipient, address, exc.reply)
            continue
        if b"\0" in data:
            raise BadRequest(422, f"the message for {recipient.email} holds a NUL character")
        if settings.max_message_size and len(data) > settings.max_message_size:
            raise BadRequest(413, f"the message for {recipient.email} is {len(data)} bytes, "
                                  f"more than {settings.max_message_size} "
                                  "([smtp] max_message_size)")
        total += len(data)
        if total > settings.max_total_size:
            raise BadRequest(413, f"the request's messages come to more than "
                                  f"{settings.max_total_size} bytes ([inject] max_total_size)")
        yield Built(recipient, address, data)


def _context(request: InjectRequest, recipient: Recipient) -> dict[str, Any]:
    return context_for(request.substitutions, recipient.substitutions, recipient.email,
                       recipient.name)


def header_mailbox(address: Address, name: str, where: str) -> Mailbox:
    """An address as a header writes it: the domain as IDNA A-labels; a local part that
    is not ASCII cannot be written without SMTPUTF8, which the API does not make."""
    if not address.local.isascii():
        raise Unwritable(f"553 5.6.7 {where}: a non-ASCII local part needs SMTPUTF8, "
                         "which the injection API does not write")
    return Mailbox(f"{address.local}@{normalize_domain(address.domain)}", name)


class StructuredBuilder:
    def __init__(self, request: InjectRequest, content: Content, settings: Settings,
                 varying: frozenset[str], new_id: Callable[[], str]) -> None:
        def template(name: str, source: str | None, html: bool = False) -> Template | None:
            return None if source is None else compile_template(name, source, varying, html)

        self.request = request
        self.content = content
        self.settings = settings
        self.new_id = new_id
        self.from_email = compile_template("content.from.email", content.from_email, varying)
        self.from_name = compile_template("content.from.name", content.from_name, varying)
        self.subject = template("content.subject", content.subject)
        self.text = template("content.text_body", content.text_body)
        self.html = template("content.html_body", content.html_body, html=True)
        self.headers = [(name, compile_template(f"content.headers.{name}", value, varying))
                        for name, value in content.headers]
        given = {name.lower() for name, _ in content.headers}
        self.campaign = ((settings.campaign_header, request.campaign),) if request.campaign else ()
        self.campaign += tracking_field(request, settings, given)
        self.date = "" if "date" in given else format_datetime(datetime.now(UTC))
        self.message_ids = "message-id" not in given
        self._senders: dict[tuple[str, str], Mailbox] = {}

    def build(self, recipient: Recipient, address: Address) -> bytes:
        context = _context(self.request, recipient)
        parts = Parts(
            sender=self._sender(context),
            to=header_mailbox(address, recipient.name, "recipient"),
            subject=None if self.subject is None else header_value(self.subject, context),
            headers=self.campaign + tuple((name, header_value(t, context))
                                          for name, t in self.headers),
            text=None if self.text is None else self.text.render(context),
            html=None if self.html is None else self.html.render(context),
            attachments=self.content.attachments,
        )
        try:
            return compose(parts, self._trace())
        except (MessageError, ValueError, UnicodeError) as exc:
            raise BadRequest(422, f"the message for {recipient.email} cannot be written: "
                                  f"{exc}") from None

    def _sender(self, context: dict[str, Any]) -> Mailbox:
        email = header_value(self.from_email, context)
        name = header_value(self.from_name, context)
        known = self._senders.get((email, name))  # most requests have one From:
        if known is not None:
            return known
        try:
            sender = header_mailbox(parse_mailbox(email), name, "content.from.email")
        except (AddressError, Unwritable) as exc:
            raise BadRequest(422, f"content.from.email: {email[:200]!r} is not an address "
                                  f"({exc.reply})") from None
        if len(self._senders) < 100:
            self._senders[(email, name)] = sender
        return sender

    def _trace(self) -> tuple[tuple[str, str], ...]:
        trace = (("Date", self.date),) if self.date else ()
        if self.message_ids:
            trace += (("Message-ID", f"<{self.new_id()}@{self.settings.hostname}>"),)
        return trace


def tracking_field(request: InjectRequest, settings: Settings, given: set[str]
                   ) -> tuple[tuple[str, str], ...]:
    """The tracking header the request's `tracking` asks for (none without it). The
    content may not carry that header as well: only one would be taken out before sending."""
    if request.tracking is None:
        return ()
    if settings.tracking_header.lower() in given:
        raise BadRequest(400, f"tracking: the content has a {settings.tracking_header} "
                              "header too; give one of the two")
    return ((settings.tracking_header, request.tracking),)


_FIELD_START = re.compile(r"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


class RawBuilder:
    """A complete message given as a string: its header fields and its body are
    templates of their own."""

    def __init__(self, request: InjectRequest, source: str, settings: Settings,
                 varying: frozenset[str]) -> None:
        self.request = request
        self.varying = varying
        lines = crlf(source).split("\r\n")
        end = lines.index("") if "" in lines else len(lines)
        self.fields = [self._field(text, line) for text, line in _fields(lines[:end])]
        body = "\r\n".join(lines[end + 1:]) if end < len(lines) else None
        self.body = None if body is None else compile_template("content", body, varying,
                                                               first_line=end + 2)
        campaign = request.campaign
        self.first = (f"{settings.campaign_header}: {campaign}\r\n".encode()
                      if campaign else b"")
        given = {field.head[:-1].strip().lower() for field in self.fields}
        self.first += b"".join(f"{name}: {value}\r\n".encode()
                               for name, value in tracking_field(request, settings, given))

    def _field(self, text: str, line: int) -> RawField:
        match = _FIELD_START.match(text)
        if match is None:
            raise BadRequest(400, f"content, line {line}: not a header field "
                                  "(a raw message starts with its header fields, then a "
                                  "blank line)")
        value = text[match.end():].replace("\r\n", "")  # unfolded: one line to render
        return RawField(text, text[:match.end()], compile_template(
            f"content, header {match.group(1)}", value, self.varying, first_line=line))

    def build(self, recipient: Recipient, address: Address) -> bytes:
        context = _context(self.request, recipient)
        out = [self.first]
        for field in self.fields:
            if field.value.compiled is None:  # as given, folds and all
                out.append(_utf8(field.text + "\r\n", field.value.name))
            else:
                value = header_value(field.value, context)
                out.append(_utf8(f"{field.head}{value}\r\n", field.value.name))
        if self.body is not None:
            out.append(b"\r\n" + _utf8(crlf(self.body.render(context)), self.body.name))
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class RawField:
    text: str  # the field as given, with its folds
    head: str  # its name and colon
    value: Template  # the value, unfolded


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(422, f"{where}: not Unicode text (a lone surrogate)") from None


def _fields(lines: list[str]) -> Iterator[tuple[str, int]]:
    """(field text with its folds, its first line number) of a header block."""
    current: list[str] = []
    start = 1
    for number, line in enumerate(lines, 1):
        if current and line[:1] in (" ", "\t"):
            current.append(line)
            continue
        if current:
            yield "\r\n".join(current), start
        current, start = [line], number
    if current:
        yield "\r\n".join(current), start
