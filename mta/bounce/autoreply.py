"""RFC 3834 automatic replies (vacation, out-of-office) told apart from bounces."""

from __future__ import annotations

import re

from mta.bounce.addresses import find_addresses, is_daemon
from mta.bounce.mime import MailParts

_SUBJECT_RE = re.compile(
    r"^\s*(auto(matic|matische)?[ -]?(reply|response|antwort|answer)|autoreply|auto-reply|"
    r"out of (the )?office|on vacation|vacation|abwesenheit|absence|r[ée]ponse automatique|"
    r"risposta automatica|respuesta autom[áa]tica|automatisch antwoord|不在)",
    re.IGNORECASE,
)
_HEADER_SIGNS = (
    ("X-Autoreply", None),
    ("X-Autorespond", None),
    ("X-Autoresponder", None),
    ("X-Vacation", None),
    ("X-Apple-Action", re.compile(r"vacation", re.I)),
    ("Precedence", re.compile(r"auto[_-]?reply", re.I)),
    ("X-Auto-Response-Suppress", re.compile(r"\ball\b|\boof\b", re.I)),
    ("Auto-Submitted", re.compile(r"auto-replied", re.I)),
)


def is_autoreply(parts: MailParts) -> bool:
    """True when headers or subject mark the mail as an automatic reply (RFC 3834)."""
    for name, pattern in _HEADER_SIGNS:
        value = parts.header(name)
        if value and (pattern is None or pattern.search(value)):
            return True
    return bool(_SUBJECT_RE.match(parts.header("Subject")))


def replier(parts: MailParts) -> str:
    """The address that sent the automatic reply."""
    for name in ("From", "Reply-To", "Sender", "Return-Path"):
        found = [a for a in find_addresses(parts.header(name)) if not is_daemon(a)]
        if found:
            return found[0]
    return ""
