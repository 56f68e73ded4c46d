"""RFC 3464 delivery status fields, read from a report part or from plain text.

Many MTAs put the fields in a ``message/delivery-status`` part; some paste them
into the text (Amazon SES "Technical report:"), and some bounces arrive with a
broken MIME structure, so the fields are read line by line from any text.
"""

from __future__ import annotations

import re

from mta.bounce.addresses import clean_address
from mta.bounce.model import Delivery
from mta.bounce.status import find_reply_code, find_status, is_status, prefer

_FIELD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]{1,40}):[ \t]*(.*)$")

RECIPIENT_FIELDS = frozenset(
    {
        "final-recipient", "original-recipient", "x-actual-recipient", "action", "status",
        "remote-mta", "diagnostic-code", "last-attempt-date", "will-retry-until",
        "final-log-id",
    }
)  # fmt: skip
MESSAGE_FIELDS = frozenset(
    {"reporting-mta", "received-from-mta", "arrival-date", "original-envelope-id", "dsn-gateway"}
)
_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded", "expired")


def parse_fields(text: str) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) for every header-like line of ``text``."""
    fields: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line[:1] in (" ", "\t"):
            if fields and line.strip():
                name, value = fields[-1]
                fields[-1] = (name, f"{value} {line.strip()}")
            continue
        match = _FIELD_RE.match(line)
        if match:
            fields.append((match.group(1).lower(), match.group(2).strip()))
        elif line.strip():
            fields.append(("", line.strip()))
    return fields


def read_deliveries(text: str) -> list[Delivery]:
    """Per-recipient DSN records found in ``text`` (may be empty)."""
    deliveries: list[Delivery] = []
    seen: set[str] = set()
    for name, value in parse_fields(text):
        if name not in RECIPIENT_FIELDS:
            continue
        if not deliveries or _starts_new(name, seen):
            deliveries.append(Delivery())
            seen = set()
        seen.add(name)
        _apply(deliveries[-1], name, value)
    return [d for d in deliveries if d.recipient or d.alias]


def _starts_new(name: str, seen: set[str]) -> bool:
    """A field already given for the current recipient starts the next one."""
    if name in seen:
        return True
    return name == "original-recipient" and "final-recipient" in seen and "status" in seen


def _apply(d: Delivery, name: str, value: str) -> None:
    if name == "final-recipient":
        d.recipient = clean_address(_after_type(value))
    elif name in ("original-recipient", "x-actual-recipient"):
        if not d.alias:
            d.alias = clean_address(_after_type(value))
    elif name == "action":
        word = value.split()[0].lower() if value.split() else ""
        d.action = word if word in _ACTIONS else d.action
    elif name == "status":
        code = find_status(value)
        d.status = code if is_status(code) else d.status
    elif name == "remote-mta":
        d.remote_host = _after_type(value).split()[0] if _after_type(value) else ""
    elif name == "diagnostic-code":
        d.diag_type, d.diagnosis = _split_typed(value)


def _after_type(value: str) -> str:
    """'rfc822; user@example.jp' -> 'user@example.jp'."""
    return value.split(";", 1)[1].strip() if ";" in value else value.strip()


def _split_typed(value: str) -> tuple[str, str]:
    if ";" in value:
        kind, text = value.split(";", 1)
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", kind.strip()):
            return kind.strip().upper(), text.strip()
    return "", value.strip()


def settle_status(d: Delivery) -> None:
    """Reconcile the Status: field with a code quoted in the diagnostic text."""
    reply = find_reply_code(d.diagnosis)
    quoted = find_status(d.diagnosis, reply[:1])
    d.reply_code = d.reply_code or reply
    d.status = prefer(d.status, quoted, reply)
