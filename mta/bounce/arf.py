"""Feedback reports: RFC 5965 ARF and the common non-ARF complaint formats."""

from __future__ import annotations

import re

from mta.bounce.addresses import clean_address, find_addresses, is_daemon
from mta.bounce.dsn import parse_fields
from mta.bounce.mime import MailParts
from mta.bounce.model import Delivery

FEEDBACK_TYPES = ("abuse", "fraud", "virus", "other", "not-spam", "auth-failure", "opt-out",
                  "dmarc", "spam", "unsubscribe", "complaint")  # fmt: skip
_RECIPIENT_FIELDS = ("original-rcpt-to", "removal-recipient")
_ORIGINAL_TO_HEADERS = ("x-hmxmroriginalrecipient", "x-original-to", "to", "delivered-to")


def is_feedback(parts: MailParts) -> bool:
    """True for ARF reports and for provider complaints that forward the mail."""
    if parts.feedback:
        return True
    ctype = parts.header("Content-Type").lower()
    if "report-type" in ctype and "feedback-report" in ctype:
        return True
    if "x-hmxmroriginalrecipient:" in parts.original.lower():
        return True
    return any(_looks_like_arf_fields(text) for text in parts.texts[:3])


def _looks_like_arf_fields(text: str) -> bool:
    head = text[:4000]
    return bool(re.search(r"(?mi)^Feedback-Type:\s*\S+", head)) and bool(
        re.search(r"(?mi)^(User-Agent|Version|Original-Rcpt-To|Original-Mail-From):", head)
    )


def read_feedback(parts: MailParts) -> list[Delivery]:
    """One Delivery per complaining recipient (feedback_type set, reason 'feedback')."""
    fields: list[tuple[str, str]] = []
    for text in parts.feedback or [t for t in parts.texts if _looks_like_arf_fields(t)]:
        fields.extend(parse_fields(text))
    feedback_type = _feedback_type(fields)
    recipients = [clean_address(v) for name, v in fields if name in _RECIPIENT_FIELDS]
    recipients = [r for r in recipients if r and "@" in r]
    if not recipients:
        recipients = _original_recipients(parts.original)
    diagnosis = "\n".join(f"{n}: {v}" for n, v in fields if n)[:2000]
    if not recipients:
        return [Delivery(reason="feedback", feedback_type=feedback_type, diagnosis=diagnosis)]
    return [
        Delivery(recipient=r, reason="feedback", feedback_type=feedback_type, diagnosis=diagnosis)
        for r in dict.fromkeys(recipients)
    ]


def _feedback_type(fields: list[tuple[str, str]]) -> str:
    for name, value in fields:
        if name == "feedback-type" and value:
            return value.split()[0].lower().strip(";")
    return "abuse"


def _original_recipients(original: str) -> list[str]:
    if not original:
        return []
    fields = parse_fields(original.split("\n\n", 1)[0])
    for wanted in _ORIGINAL_TO_HEADERS:
        for name, value in fields:
            if name == wanted:
                found = [a for a in find_addresses(value) if not is_daemon(a)]
                if found:
                    return found
    return []
