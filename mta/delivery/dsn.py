"""Delivery status notifications (RFC 3464) for bounced and expired recipients."""

from __future__ import annotations

import os
import re
import time
from email.utils import formatdate, make_msgid
from typing import Any

from mta.queue.outcome import RcptResult


def should_notify(sender: str, own_bounce_domains: set[str]) -> bool:
    """No DSN to the null sender, nor to the engine's own bounce addresses (loops)."""
    if not sender:
        return False
    return sender.rpartition("@")[2].lower() not in own_bounce_domains


MAX_QUOTED_HEADERS = 16 * 1024
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


def original_headers(data: bytes) -> bytes:
    """The original's header fields, and nothing of its body (a DSN to a forged sender
    must not reflect a message back): up to the first line that is neither a field nor
    a continuation, at most MAX_QUOTED_HEADERS bytes, whole lines only."""
    out: list[bytes] = []
    size = 0
    for line in data.split(b"\r\n"):
        is_field = _FIELD.match(line) is not None or (out and line[:1] in (b" ", b"\t"))
        if not is_field or size + len(line) + 2 > MAX_QUOTED_HEADERS:
            break
        out.append(line + b"\r\n")
        size += len(line) + 2
    return b"".join(out)


def build_dsn(message: dict[str, Any], failed: list[RcptResult], reporting_mta: str,
              expired: bool = False, now: float | None = None) -> bytes:
    """A multipart/report DSN for `failed` recipients of `message` (a spool record)."""
    now = time.time() if now is None else now
    boundary = f"=_dsn_{os.urandom(8).hex()}"
    date = formatdate(now, localtime=False)
    what = "could not be delivered in time" if expired else "could not be delivered"
    human = [
        f"This is the mail system at {reporting_mta}.",
        "",
        f"Your message {what} to the following recipient(s):",
        "",
        *[f"  <{r.recipient}>: {r.code or ''} {r.text}".rstrip() for r in failed],
        "",
        "The message's headers are attached.",
    ]
    per_message = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Queue-ID: {message['id']}",
        f"Arrival-Date: {formatdate(message['received'], localtime=False)}",
    ]
    per_rcpt_blocks = ["\r\n".join(_recipient_fields(r, date)) for r in failed]
    parts = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{message['from']}>",
        f"Subject: Undelivered Mail Returned to Sender{' (expired)' if expired else ''}",
        f"Date: {date}",
        f"Message-ID: {make_msgid(domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        "\r\n".join(per_message),
        "",
        "\r\n\r\n".join(per_rcpt_blocks),
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = "\r\n".join(parts).encode("utf-8", "replace") + b"\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + original_headers(message["data"]) + tail


def _recipient_fields(result: RcptResult, date: str) -> list[str]:
    fields = [
        f"Final-Recipient: rfc822; {result.recipient}",
        "Action: failed",
        f"Status: {result.enhanced or ('5.0.0' if result.permanent else '4.0.0')}",
    ]
    if result.mx:
        fields.append(f"Remote-MTA: dns; {result.mx}")
    if result.code:
        text = " ".join(result.text.split())
        fields.append(f"Diagnostic-Code: smtp; {result.code} {text}")
    else:
        fields.append(f"Diagnostic-Code: x-engine; {' '.join(result.text.split())}")
    fields.append(f"Last-Attempt-Date: {date}")
    return fields
