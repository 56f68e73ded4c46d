"""The injection request, read and checked: KumoMTA's `POST /api/inject/v1` shape.

    {"envelope_sender": "bounce@shop.example", "campaign": "spring",
     "send_at": "2026-12-06T09:00:00+01:00",  (or Unix seconds; optional)
     "tracking": false,  (or "off", "opens", "clicks", "on", true; optional)
     "recipients": [{"email": "a@example.net", "name": "Ann", "substitutions": {...}}],
     "substitutions": {...},
     "content": {"from": {"email": ..., "name": ...}, "subject": ..., "text_body": ...,
                 "html_body": ..., "headers": {...},
                 "attachments": [{"file_name", "content_type", "base64", "data"}]}}

`content` may also be a string: a complete RFC 5322 message. `parse_request(body)` turns
the bytes of a request into an `InjectRequest`, or raises `BadRequest` with the status
(400, 413) and a message naming the field. Plain functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from mta.address import Address, AddressError, parse_path
from mta.inject.mime import Attachment
from mta.queue.schedule import parse_send_at
from mta.text import name_problem

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}\Z")  # RFC 5322 ftext
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}\Z")
# Fields the builder writes itself; Date and Message-ID given in `headers` replace its own.
BUILT_FIELDS = frozenset({"from", "to", "subject", "mime-version", "content-type",
                          "content-transfer-encoding", "content-disposition"})
_FORBIDDEN = re.compile(r"[\r\n\0]")


class BadRequest(Exception):
    """A request refused as a whole: `status` (400, 413, 422) and what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Recipient:
    email: str
    name: str = ""
    substitutions: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Content:
    """The structured form of `content`: templates, rendered for each recipient."""

    from_email: str
    from_name: str
    subject: str | None
    text_body: str | None
    html_body: str | None
    headers: tuple[tuple[str, str], ...]
    attachments: tuple[Attachment, ...]


@dataclass(frozen=True, slots=True)
class InjectRequest:
    envelope_sender: Address
    campaign: str
    recipients: tuple[Recipient, ...]
    substitutions: dict[str, Any]
    content: Content | str  # a string: a complete RFC 5322 message (a template too)
    send_at: float | None = None  # Unix seconds: not attempted before (None: now)
    tracking: str | None = None  # "off", "opens", "clicks" or "on" (None: as configured)


@dataclass(frozen=True, slots=True)
class Limits:
    max_recipients: int
    max_message_size: int  # 0: no limit


def parse_request(body: bytes, limits: Limits) -> InjectRequest:
    """The request in `body`, checked; BadRequest names what is wrong."""
    data = _json(body)
    top = _Object(data, "the request body")
    top.only({"envelope_sender", "campaign", "recipients", "substitutions", "content",
              "send_at", "tracking"})
    recipients = top.list("recipients")
    if not recipients:
        raise BadRequest(400, "recipients: give at least one recipient")
    if len(recipients) > limits.max_recipients:
        raise BadRequest(413, f"recipients: {len(recipients)} recipients, at most "
                              f"{limits.max_recipients} per request ([inject] max_recipients)")
    return InjectRequest(
        envelope_sender=_sender(top.string("envelope_sender")),
        campaign=_campaign(top.string("campaign", "")),
        recipients=tuple(_recipient(item, f"recipients[{i}]")
                         for i, item in enumerate(recipients)),
        substitutions=top.mapping("substitutions"),
        content=_content(top, limits),
        send_at=_send_at(top.get("send_at", (str, int, float), None)),
        tracking=_tracking(top.get("tracking", (bool, str), None)),
    )


TRACKING_VALUES = ("off", "opens", "clicks", "on")


def _tracking(value: bool | str | None) -> str | None:
    """The `tracking` field: this request's open and click tracking (the per-campaign
    switch, `[tracking] header`): false or "off", "opens" (the pixel only), "clicks" (the
    links only), true or "on" (as configured); it never turns on what the config or the
    account turned off."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if value.lower() not in TRACKING_VALUES:
        raise BadRequest(400, "tracking: give true, false, \"off\", \"opens\", \"clicks\" "
                              "or \"on\"")
    return value.lower()


def _send_at(value: Any) -> float | None:
    """The `send_at` field: an RFC 3339 date-time or Unix seconds (a number or digits)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest(400, "send_at: give an RFC 3339 date-time or Unix seconds")
    if isinstance(value, (int, float)):
        if not 0 <= value < 1e12:
            raise BadRequest(400, "send_at: Unix seconds out of range")
        return float(value)
    when = parse_send_at(value)
    if when is None:
        raise BadRequest(400, "send_at: not a date-time (RFC 3339, like "
                              "2026-12-06T09:00:00+01:00) nor Unix seconds")
    return when


def smtp_address(text: str) -> Address | str:
    """An address as SMTP reads it in MAIL FROM or RCPT TO, or SMTP's refusal of it."""
    try:
        address, params = parse_path(f"<{text}>")
    except AddressError as exc:
        return exc.reply
    return "553 5.1.3 Bad address syntax" if params else address


def _sender(text: str) -> Address:
    address = smtp_address(text)
    if isinstance(address, str):
        raise BadRequest(400, f"envelope_sender: {address}")
    return address


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(400, "the request body is nested too deeply") from None


class _Object:
    """A JSON object and where it is in the request, for messages that name the field."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise BadRequest(400, f"{where}: must be an object")
        self.value = value
        self.where = where

    def path(self, key: str) -> str:
        return key if self.where == "the request body" else f"{self.where}.{key}"

    def only(self, keys: set[str]) -> None:
        unknown = sorted(set(self.value) - keys)
        if unknown:
            raise BadRequest(400, f"{self.path(unknown[0])}: unknown field")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.value or self.value[key] is None:
            if default is ...:
                raise BadRequest(400, f"{self.path(key)}: missing")
            return default
        value = self.value[key]
        if not isinstance(value, kind):
            raise BadRequest(400, f"{self.path(key)}: must be {_kind_name(kind)}")
        return value

    def string(self, key: str, default: Any = ...) -> str:
        return self.get(key, str, default)

    def list(self, key: str) -> list[Any]:
        return self.get(key, list)

    def mapping(self, key: str) -> dict[str, Any]:
        return self.get(key, dict, {})


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", list: "a list", dict: "an object", bool: "true or false"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _campaign(name: str) -> str:
    problem = name_problem(name) if name else None
    if problem:
        raise BadRequest(400, f"campaign: {problem}")
    return name


def _recipient(item: Any, where: str) -> Recipient:
    obj = _Object(item, where)
    obj.only({"email", "name", "substitutions"})
    recipient = Recipient(obj.string("email"), obj.string("name", ""), obj.mapping("substitutions"))
    for key in ("email", "name"):
        if _FORBIDDEN.search(getattr(recipient, key)):
            raise BadRequest(400, f"{where}.{key}: holds CR, LF or NUL")
    return recipient


def _content(top: _Object, limits: Limits) -> Content | str:
    value = top.get("content", (str, dict))
    if isinstance(value, str):
        _check_size("content", len(value.encode("utf-8", "replace")), limits)
        return value
    obj = _Object(value, "content")
    obj.only({"from", "subject", "text_body", "html_body", "headers", "attachments"})
    sender = _Object(obj.get("from", dict), "content.from")
    sender.only({"email", "name"})
    content = Content(
        from_email=sender.string("email"), from_name=sender.string("name", ""),
        subject=obj.string("subject", None),
        text_body=obj.string("text_body", None), html_body=obj.string("html_body", None),
        headers=_headers(obj),
        attachments=tuple(_attachment(item, f"content.attachments[{i}]", limits)
                          for i, item in enumerate(obj.get("attachments", list, []))),
    )
    if content.text_body is None and content.html_body is None and not content.attachments:
        raise BadRequest(400, "content: give text_body, html_body or attachments")
    return content


def _headers(obj: _Object) -> tuple[tuple[str, str], ...]:
    headers = list(obj.mapping("headers").items())
    for name, value in headers:
        where = f"content.headers.{name}"
        if not _FIELD_NAME.match(name):
            raise BadRequest(400, f"{where}: not a header field name")
        if name.lower() in BUILT_FIELDS:
            raise BadRequest(400, f"{where}: made from the request's other fields; "
                                  "it cannot be given here")
        if not isinstance(value, str):
            raise BadRequest(400, f"{where}: must be a string")
    return tuple(headers)


def _attachment(item: Any, where: str, limits: Limits) -> Attachment:
    obj = _Object(item, where)
    obj.only({"file_name", "content_type", "base64", "data"})
    content_type = obj.string("content_type")
    if not _CONTENT_TYPE.match(content_type):
        raise BadRequest(400, f"{where}.content_type: not a MIME type (type/subtype)")
    file_name = obj.string("file_name", "")
    if _FORBIDDEN.search(file_name):
        raise BadRequest(400, f"{where}.file_name: holds CR, LF or NUL")
    text = obj.string("data")
    try:
        if obj.get("base64", bool, False):
            data = base64.b64decode("".join(text.split()), validate=True)
        else:
            data = text.encode("utf-8")
    except (binascii.Error, ValueError):
        raise BadRequest(400, f"{where}.data: not valid base64 (or not Unicode text)") from None
    _check_size(f"{where}.data", len(data), limits)
    return Attachment.make(file_name, content_type.lower(), data)


def _check_size(where: str, size: int, limits: Limits) -> None:
    if limits.max_message_size and size > limits.max_message_size:
        raise BadRequest(413, f"{where}: {size} bytes, more than a message may have "
                              f"({limits.max_message_size}, [smtp] max_message_size)")
