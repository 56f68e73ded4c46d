"""Deciding the reason of one failed delivery, and whether it is hard or soft.

The words come first: each reason of ``order.first`` (reasons.toml) is tried in turn on the
receiver's words, the enhanced status code and the SMTP command, and the first that holds
wins; ``order.second`` tries the remaining reasons on the words alone. The code settles
what the words leave open and breaks ties, but does not outweigh clear words: a 5.1.1 next
to words that say "mailbox full" or "rejected as spam" is read by the words.

Two readings are the field's, not the table's: "user unknown" only means a bad address
when it answers RCPT (or the code says so); after DATA, or with no command named at all,
it is a content or sender filter speaking (Sisimai reads it the same way). And a report's
own reading (a known MTA family, a provider's documented reply, a local delivery agent)
is applied before these general rules, by the parser.

Every decision carries the rule that made it and the words or code it rests on, for
``python -m mta.bounce --explain``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import NamedTuple

from mta.bounce.model import Delivery
from mta.bounce.phrases import Said, book, normalize
from mta.bounce.status import find_reply_code, find_status, status_reason

# Reasons a format reader may suggest that the general rules may still refine.
REFINABLE = frozenset(
    {"", "undefined", "onhold", "systemerror", "securityerror", "expired", "networkerror",
     "hostunknown", "userunknown"}
)  # fmt: skip
BEFORE_DATA = frozenset({"CONN", "EHLO", "HELO", "MAIL", "RCPT"})

# With a code that names a bad address (user or host unknown), words of these reasons still
# win (Sisimai's own list for "user unknown").
_OUTWEIGH_USER_CODE = ("norelaying", "blocked", "mailboxfull", "hasmoved", "rejected", "notaccept")
# ... and so do words of these, unless the words also say "user unknown".
_SOFT_WORDS = (
    "filtered", "spamdetected", "policyviolation", "virusdetected", "requireptr",
    "toomanyconn", "systemfull", "authfailure", "suspend",
)  # fmt: skip


class Decision(NamedTuple):
    """A reason, the rule that chose it, what that rule read, and who writes those words."""

    reason: str
    rule: str
    evidence: str = ""
    writer: str = ""


class Facts:
    """The normalized inputs every rule reads, with the phrase look-ups remembered."""

    def __init__(self, d: Delivery) -> None:
        self.d = d
        self.text = normalize(d.diagnosis)
        self.code_reason = status_reason(d.status)
        self.command = d.command.upper()
        self.reply = d.reply_code or find_reply_code(d.diagnosis)
        self._said: dict[str, Said | None] = {}

    def said(self, reason: str) -> Said | None:
        if reason not in self._said:
            self._said[reason] = book().said(reason, self.text)
        return self._said[reason]

    def decisive(self, reason: str) -> Said | None:
        return book().decisive(reason, self.text)

    def first_said(self, reasons: tuple[str, ...]) -> tuple[str, Said] | None:
        for reason in reasons:
            found = self.said(reason)
            if found:
                return reason, found
        return None


def _words(reason: str, said: Said, rule: str = "words") -> Decision:
    return Decision(reason, rule, said.phrase, said.writer)


def _code(reason: str, f: Facts, rule: str = "status code") -> Decision:
    return Decision(reason, rule, f.d.status)


def _both(reason: str, f: Facts, said: Said) -> Decision:
    return Decision(
        reason, "status code and words agree", f"{f.d.status}, {said.phrase}", said.writer
    )


def _code_or_words(reason: str) -> Callable[[Facts], Decision | None]:
    def check(f: Facts) -> Decision | None:
        said = f.said(reason)
        if f.code_reason == reason:
            return _both(reason, f, said) if said else _code(reason, f)
        return _words(reason, said) if said else None

    check.__name__ = f"_{reason}"
    return check


def _words_only(reason: str) -> Callable[[Facts], Decision | None]:
    def check(f: Facts) -> Decision | None:
        said = f.said(reason)
        return _words(reason, said) if said else None

    check.__name__ = f"_{reason}"
    return check


def _mesgtoobig(f: Facts) -> Decision | None:
    if f.code_reason == "mesgtoobig":
        return _code("mesgtoobig", f)
    if f.code_reason == "exceedlimit":
        return None
    said = f.said("mesgtoobig")
    return _words("mesgtoobig", said) if said else None


def _suspend(f: Facts) -> Decision | None:
    if f.reply == "525":
        return Decision("suspend", "reply code 525 (user account disabled)", "525")
    said = f.said("suspend")
    return _words("suspend", said) if said else None


def _norelaying(f: Facts) -> Decision | None:
    if f.command in ("CONN", "EHLO", "HELO"):
        return None
    said = f.said("norelaying")
    return _words("norelaying", said) if said else None


def _userunknown(f: Facts) -> Decision | None:
    decisive = f.decisive("userunknown")
    if decisive:
        return _words("userunknown", decisive, "decisive words")
    if f.code_reason == "userunknown":
        return _user_code(f)
    said = f.said("userunknown")
    if said and f.command == "RCPT":
        return _words("userunknown", said, "words in reply to RCPT")
    return None


def _user_code(f: Facts) -> Decision | None:
    """A code that says "user unknown": other clear words still outweigh it."""
    if f.first_said(_OUTWEIGH_USER_CODE):
        return None  # a later rule of the first pass reads those words
    said = f.said("userunknown")
    if said:
        return _both("userunknown", f, said)
    other = f.first_said(_SOFT_WORDS)
    if other:
        return _words(other[0], other[1], "words outweigh the status code")
    return _code("userunknown", f)


def _filtered(f: Facts) -> Decision | None:
    said = f.said("filtered")
    user = f.said("userunknown")
    if f.code_reason == "filtered":
        found = said or user
        return _both("filtered", f, found) if found else None
    if f.command in BEFORE_DATA or not (said or user):
        return None
    if said:
        return _words("filtered", said)
    rule = "'user unknown' after DATA" if f.command == "DATA" else "'user unknown' outside RCPT"
    return _words("filtered", user, rule)


def _contenterror(f: Facts) -> Decision | None:
    if _spamdetected(f):
        return None
    return _code_or_words("contenterror")(f)


def _rejected(f: Facts) -> Decision | None:
    if f.code_reason == "rejected":
        return _code("rejected", f)
    said = f.said("rejected")
    if not said:
        return None
    if f.command == "MAIL":
        return _words("rejected", said, "words in reply to MAIL")
    if f.command == "DATA":
        return None if f.code_reason == "userunknown" else _words("rejected", said)
    if f.code_reason in ("", "onhold", "undefined", "securityerror", "systemerror"):
        return _words("rejected", said)
    return None


def _hostunknown(f: Facts) -> Decision | None:
    decisive = f.decisive("hostunknown")
    if decisive:
        return _words("hostunknown", decisive, "decisive words")
    said = f.said("hostunknown")
    if f.code_reason != "hostunknown":
        return _words("hostunknown", said) if said else None
    if said:
        return _both("hostunknown", f, said)
    if f.said("networkerror") or f.first_said(_OUTWEIGH_USER_CODE):
        return None  # a DNS failure, or words a later rule reads
    other = f.first_said(_SOFT_WORDS)
    if other:
        return _words(other[0], other[1], "words outweigh the status code")
    return _code("hostunknown", f)


def _spamdetected(f: Facts) -> Decision | None:
    if not f.d.status:
        return None
    if f.code_reason == "spamdetected":
        return _code("spamdetected", f)
    if f.command in BEFORE_DATA:
        return None
    said = f.said("spamdetected")
    return _words("spamdetected", said) if said else None


# The reasons whose reading needs more than "the code names it or the words say it".
_SPECIAL_RULES: dict[str, Callable[[Facts], Decision | None]] = {
    "mesgtoobig": _mesgtoobig,
    "suspend": _suspend,
    "hasmoved": _words_only("hasmoved"),
    "norelaying": _norelaying,
    "userunknown": _userunknown,
    "filtered": _filtered,
    "notcompliantrfc": _words_only("notcompliantrfc"),
    "contenterror": _contenterror,
    "rejected": _rejected,
    "hostunknown": _hostunknown,
    "spamdetected": _spamdetected,
}


@cache
def _first_pass() -> tuple[tuple[str, Callable[[Facts], Decision | None]], ...]:
    """The rules of ``order.first``, in the table's order."""
    return tuple((name, _SPECIAL_RULES.get(name) or _code_or_words(name)) for name in book().first)


def decide(d: Delivery) -> Decision:
    """The reason of one failed delivery, with the rule that chose it."""
    if d.reason and (d.reason_is_final or d.reason not in REFINABLE):
        return _given(d)
    if d.status.startswith("2."):
        return Decision("delivered", "status code (success)", d.status)
    f = Facts(d)
    if not d.diag_type.upper().startswith("X-UNIX"):
        for name, rule in _first_pass():
            decision = _preset(d, name) or rule(f)
            if decision:
                return decision
    return _second_pass(f) or _last_resort(f)


def _preset(d: Delivery, name: str) -> Decision | None:
    """A reason the report's own reading suggested holds when its turn comes."""
    return _given(d) if d.reason == name else None


def _given(d: Delivery) -> Decision:
    return Decision(d.reason, d.rule or "set by the report's format", d.evidence, d.writer)


def _second_pass(f: Facts) -> Decision | None:
    d = f.d
    if d.reason and d.reason not in ("undefined", "onhold"):
        return _given(d)
    if f.code_reason not in REFINABLE and d.diag_type.upper() in ("SMTP", ""):
        return _code(f.code_reason, f)
    found = f.first_said(book().second)
    if found:
        return _words(found[0], found[1])
    if f.code_reason:
        return _code(f.code_reason, f)
    return _by_code_class(f)


def _by_code_class(f: Facts) -> Decision | None:
    d = f.d
    if d.status[:3] in ("5.6", "4.6"):
        return _code("contenterror", f, "status code class X.6 (media)")
    if d.status[:3] in ("5.7", "4.7"):
        return _code("securityerror", f, "status code class X.7 (security or policy)")
    if d.diag_type.upper().startswith("X-UNIX"):
        return Decision(
            "mailererror", "diagnostic type X-Unix (a local program failed)", d.diag_type
        )
    if f.reply and (400 < int(f.reply) < 408 or 500 < int(f.reply) < 508):
        return Decision("syntaxerror", "reply code 50x (command or syntax error)", f.reply)
    return None


def _last_resort(f: Facts) -> Decision:
    d = f.d
    if d.action.lower() in ("delayed", "expired"):
        return Decision("expired", "action: delayed (still being retried)", d.action)
    if f.command in ("EHLO", "HELO"):
        return Decision("blocked", "refused at the greeting", f.command)
    said = book().said("vacation", f.text)
    if said:
        return _words("vacation", said)
    if f.text:
        return Decision("onhold", "no rule placed the words", "")
    return Decision("undefined", "nothing to read", "")


def find_reason(d: Delivery) -> str:
    """The taxonomy word for one failed delivery."""
    return decide(d).reason


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
    entry = book().reasons.get(reason)
    kind = entry.kind if entry else "soft"
    if kind == "hard-unless-temporary":
        return "soft" if is_temporary(status, reply_code, text) else "hard"
    return "hard" if kind == "hard" else "soft"


def inferred_status(reason: str, temporary: bool) -> str:
    """The enhanced status code a reason stands for, when the report gives none."""
    entry = book().reasons.get(reason)
    if entry is None:
        return "4.0.0" if temporary else "5.0.0"
    permanent, transient = entry.status
    return (transient or permanent) if temporary else (permanent or transient)
