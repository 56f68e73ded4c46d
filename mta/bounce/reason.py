"""Deciding the reason of one failed delivery, and whether it is hard or soft.

The order of the checks matters as much as the phrases: the specific reasons
(mailbox full, message too big, suspended, moved, relaying) are tried before
the broad ones (blocked), and "user unknown" only counts as a bad address when
the status code or the rejected SMTP command (RCPT) supports it; the same words
after DATA come from a content filter (``filtered``).
"""

from __future__ import annotations

from collections.abc import Callable

from mta.bounce.model import HARD_REASONS, Delivery
from mta.bounce.rules import matches, normalize
from mta.bounce.status import find_reply_code, find_status, status_reason

# Reasons a format parser may suggest that the generic checks may still refine.
REFINABLE = frozenset(
    {"", "undefined", "onhold", "systemerror", "securityerror", "expired", "networkerror",
     "hostunknown", "userunknown"}
)  # fmt: skip
BEFORE_DATA = frozenset({"CONN", "EHLO", "HELO", "MAIL", "RCPT"})


class _Facts:
    """The normalized inputs every check reads."""

    def __init__(self, d: Delivery) -> None:
        self.d = d
        self.text = normalize(d.diagnosis)
        self.code_reason = status_reason(d.status)
        self.command = d.command.upper()
        self.reply = d.reply_code or find_reply_code(d.diagnosis)


def _mailboxfull(f: _Facts) -> bool:
    return f.code_reason == "mailboxfull" or matches("mailboxfull", f.text)


def _mesgtoobig(f: _Facts) -> bool:
    if f.code_reason == "mesgtoobig":
        return True
    if f.code_reason == "exceedlimit" or f.d.status == "5.2.3":
        return False
    return matches("mesgtoobig", f.text)


def _exceedlimit(f: _Facts) -> bool:
    return f.code_reason == "exceedlimit" or matches("exceedlimit", f.text)


def _suspend(f: _Facts) -> bool:
    return f.reply == "525" or matches("suspend", f.text)


def _hasmoved(f: _Facts) -> bool:
    return matches("hasmoved", f.text)


def _norelaying(f: _Facts) -> bool:
    if f.command in ("CONN", "EHLO", "HELO"):
        return False
    return matches("norelaying", f.text)


def _authfailure(f: _Facts) -> bool:
    return f.code_reason == "authfailure" or matches("authfailure", f.text)


def _userunknown(f: _Facts) -> bool:
    if matches("directory", f.text):
        return True
    if f.code_reason == "userunknown":
        others = ("norelaying", "blocked", "mailboxfull", "hasmoved", "rejected", "notaccept")
        return not any(matches(other, f.text) for other in others)
    return f.command == "RCPT" and matches("userunknown", f.text)


def _filtered(f: _Facts) -> bool:
    said = matches("filtered", f.text) or matches("userunknown", f.text)
    if f.code_reason == "filtered":
        return said
    if f.command in BEFORE_DATA:
        return False
    return said


def _requireptr(f: _Facts) -> bool:
    return f.code_reason == "requireptr" or matches("requireptr", f.text)


def _notcompliantrfc(f: _Facts) -> bool:
    return matches("notcompliantrfc", f.text)


def _contenterror(f: _Facts) -> bool:
    if _spamdetected(f):
        return False
    return f.code_reason == "contenterror" or matches("contenterror", f.text)


def _rejected(f: _Facts) -> bool:
    if f.code_reason == "rejected":
        return True
    said = matches("rejected", f.text)
    if f.command == "MAIL":
        return said
    if f.command == "DATA":
        return f.code_reason != "userunknown" and said
    if f.code_reason in ("", "onhold", "undefined", "securityerror", "systemerror"):
        return said
    return False


def _hostunknown(f: _Facts) -> bool:
    if f.code_reason == "hostunknown":
        return not matches("networkerror", f.text)
    return matches("hostunknown", f.text)


def _spamdetected(f: _Facts) -> bool:
    if not f.d.status:
        return False
    if f.code_reason == "spamdetected":
        return True
    if f.command in BEFORE_DATA:
        return False
    return matches("spamdetected", f.text)


def _toomanyconn(f: _Facts) -> bool:
    return f.code_reason == "toomanyconn" or matches("toomanyconn", f.text)


def _blocked(f: _Facts) -> bool:
    return f.code_reason == "blocked" or matches("blocked", f.text)


FIRST_PASS: tuple[tuple[str, Callable[[_Facts], bool]], ...] = (
    ("mailboxfull", _mailboxfull),
    ("mesgtoobig", _mesgtoobig),
    ("exceedlimit", _exceedlimit),
    ("suspend", _suspend),
    ("hasmoved", _hasmoved),
    ("norelaying", _norelaying),
    ("authfailure", _authfailure),
    ("userunknown", _userunknown),
    ("filtered", _filtered),
    ("requireptr", _requireptr),
    ("notcompliantrfc", _notcompliantrfc),
    ("contenterror", _contenterror),
    ("rejected", _rejected),
    ("hostunknown", _hostunknown),
    ("spamdetected", _spamdetected),
    ("toomanyconn", _toomanyconn),
    ("blocked", _blocked),
)

# Phrase-only checks for text that the first pass could not place.
SECOND_PASS = (
    "mailboxfull", "authfailure", "spamdetected", "virusdetected", "policyviolation",
    "norelaying", "systemerror", "networkerror", "suspend", "contenterror", "systemfull",
    "notaccept", "expired", "securityerror", "mailererror",
)  # fmt: skip


def find_reason(d: Delivery) -> str:
    """The taxonomy word for one failed delivery."""
    if d.reason and (d.reason_is_final or d.reason not in REFINABLE):
        return d.reason
    if d.status.startswith("2."):
        return "delivered"
    facts = _Facts(d)
    if not d.diag_type.upper().startswith("X-UNIX"):
        for name, check in FIRST_PASS:
            if check(facts):
                return name
    reason = _second_pass(facts)
    if not reason and d.action.lower() in ("delayed", "expired"):
        reason = "expired"
    if reason:
        return reason
    if matches("vacation", facts.text):
        return "vacation"
    return "onhold" if facts.text else "undefined"


def _second_pass(f: _Facts) -> str:
    d = f.d
    if d.reason and d.reason not in ("undefined", "onhold"):
        return d.reason
    if f.code_reason not in REFINABLE and d.diag_type.upper() in ("SMTP", ""):
        return f.code_reason
    for name in SECOND_PASS:
        if matches(name, f.text):
            return name
    if f.code_reason:
        return f.code_reason
    if d.status[:3] in ("5.6", "4.6"):
        return "contenterror"
    if d.status[:3] in ("5.7", "4.7"):
        return "securityerror"
    if d.diag_type.upper().startswith("X-UNIX"):
        return "mailererror"
    if f.reply and (400 < int(f.reply) < 408 or 500 < int(f.reply) < 508):
        return "syntaxerror"
    if d.action.lower() in ("delayed", "expired"):
        return "expired"
    if f.command in ("EHLO", "HELO"):
        return "blocked"
    return ""


def is_temporary(status: str, reply_code: str, text: str) -> bool:
    """Whether the evidence says the failure is transient (4xx)."""
    code = status or find_status(text) or reply_code or find_reply_code(text)
    if code:
        return code.startswith("4")
    lowered = text.lower()
    return " temporar" in lowered or " persistent" in lowered


def kind_of(reason: str, status: str, reply_code: str, text: str) -> str:
    """hard / soft / complaint / autoreply / unknown from a reason and its evidence."""
    if reason == "feedback":
        return "complaint"
    if reason == "vacation":
        return "autoreply"
    if reason == "delivered":
        return "unknown"
    if reason in HARD_REASONS:
        return "hard"
    if reason == "notaccept":
        return "soft" if is_temporary(status, reply_code, text) else "hard"
    return "soft"
