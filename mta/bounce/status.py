"""SMTP reply codes and RFC 3463 enhanced status codes found in free text."""

from __future__ import annotations

import re

_IPV4_RE = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")
# class.subject.detail; not preceded by a digit, a dot, a slash or a "v" (version numbers)
_STATUS_RE = re.compile(r"(?<![\d./vV])([245])\.([0-7])\.(\d{1,3})(?![\d]|\.\d)")
_REPLY_RE = re.compile(r"(?<![\d.:/#\-])([245][0-5]\d)(?![\d.]|\.\d)(?=[\s\-:,;\])]|$)")

# RFC 5321 reply codes worth believing when seen in a sentence.
REPLY_CODES = frozenset(
    {
        "211", "214", "220", "221", "235", "250", "251", "252", "253", "354",
        "421", "422", "430", "432", "450", "451", "452", "453", "454", "455", "458", "459",
        "500", "501", "502", "503", "504", "521", "523", "524", "525", "530", "533", "534",
        "535", "538", "541", "542", "543", "550", "551", "552", "553", "554", "555", "556",
        "557",
    }
)  # fmt: skip

# RFC 3463 / IANA registry codes that name a reason by themselves.
STATUS_REASONS: dict[str, str] = {
    "4.1.6": "hasmoved",
    "4.1.7": "rejected",
    "4.1.8": "rejected",
    "4.1.9": "systemerror",
    "4.2.1": "blocked",
    "4.2.2": "mailboxfull",
    "4.2.3": "exceedlimit",
    "4.2.4": "filtered",
    "4.3.1": "systemfull",
    "4.3.2": "notaccept",
    "4.3.3": "systemerror",
    "4.3.5": "systemerror",
    "4.4.1": "expired",
    "4.4.2": "networkerror",
    "4.4.3": "systemerror",
    "4.4.4": "networkerror",
    "4.4.5": "systemfull",
    "4.4.6": "networkerror",
    "4.4.7": "expired",
    "4.4.8": "networkerror",
    "4.5.3": "systemerror",
    "4.5.5": "systemerror",
    "4.6.0": "contenterror",
    "4.6.2": "contenterror",
    "4.6.5": "contenterror",
    "4.7.1": "blocked",
    "4.7.2": "blocked",
    "4.7.5": "securityerror",
    "4.7.6": "securityerror",
    "4.7.7": "securityerror",
    "4.7.12": "securityerror",
    "4.7.15": "securityerror",
    "4.7.16": "mesgtoobig",
    "4.7.24": "authfailure",
    "4.7.25": "requireptr",
    "4.7.26": "authfailure",
    "5.1.0": "userunknown",
    "5.1.1": "userunknown",
    "5.1.2": "hostunknown",
    "5.1.3": "userunknown",
    "5.1.4": "filtered",
    "5.1.6": "hasmoved",
    "5.1.7": "rejected",
    "5.1.8": "rejected",
    "5.1.9": "systemerror",
    "5.1.10": "notaccept",
    "5.2.0": "filtered",
    "5.2.1": "filtered",
    "5.2.2": "mailboxfull",
    "5.2.3": "exceedlimit",
    "5.2.4": "filtered",
    "5.3.0": "systemerror",
    "5.3.1": "systemfull",
    "5.3.2": "notaccept",
    "5.3.3": "systemerror",
    "5.3.4": "mesgtoobig",
    "5.3.5": "systemerror",
    "5.4.0": "networkerror",
    "5.4.3": "systemerror",
    "5.4.4": "hostunknown",
    "5.5.2": "syntaxerror",
    "5.5.3": "toomanyconn",
    "5.5.4": "systemerror",
    "5.5.5": "systemerror",
    "5.5.6": "syntaxerror",
    "5.6.0": "contenterror",
    "5.6.1": "contenterror",
    "5.6.2": "contenterror",
    "5.6.3": "contenterror",
    "5.6.5": "contenterror",
    "5.6.6": "contenterror",
    "5.6.7": "contenterror",
    "5.6.8": "contenterror",
    "5.6.9": "contenterror",
    "5.7.0": "securityerror",
    "5.7.1": "securityerror",
    "5.7.2": "securityerror",
    "5.7.3": "securityerror",
    "5.7.4": "securityerror",
    "5.7.5": "securityerror",
    "5.7.6": "securityerror",
    "5.7.7": "securityerror",
    "5.7.8": "securityerror",
    "5.7.9": "securityerror",
    "5.7.10": "securityerror",
    "5.7.11": "securityerror",
    "5.7.13": "suspend",
    "5.7.14": "securityerror",
    "5.7.15": "securityerror",
    "5.7.16": "mesgtoobig",
    "5.7.17": "hasmoved",
    "5.7.18": "hasmoved",
    "5.7.19": "securityerror",
    "5.7.20": "authfailure",
    "5.7.21": "authfailure",
    "5.7.22": "authfailure",
    "5.7.23": "authfailure",
    "5.7.24": "authfailure",
    "5.7.25": "requireptr",
    "5.7.26": "authfailure",
    "5.7.27": "notaccept",
    "5.7.28": "spamdetected",
    "5.7.29": "authfailure",
    "5.7.30": "securityerror",
}


def is_status(code: str | None) -> bool:
    return bool(code) and _STATUS_RE.fullmatch(code or "") is not None


def status_reason(code: str | None) -> str:
    """The reason an enhanced status code names by itself, or ''."""
    return STATUS_REASONS.get(code or "", "")


def find_statuses(text: str) -> list[str]:
    """Every enhanced status code in ``text``, in order of appearance."""
    if not text:
        return []
    masked = _IPV4_RE.sub("***", text)
    return [".".join(m.groups()) for m in _STATUS_RE.finditer(masked)]


def find_status(text: str, reply_class: str = "") -> str:
    """The most telling enhanced status code in ``text`` ('' if none).

    Generic codes (X.0.0) and the catch-all 4.4.7 lose against any more specific
    code in the same text; a code of the reply's class wins over another class.
    """
    found = find_statuses(text)
    if reply_class:
        same = [c for c in found if c[0] == reply_class]
        found = same or found
    if not found:
        return ""
    specific = [c for c in found if not _is_vague(c)]
    return specific[0] if specific else found[0]


def _is_vague(code: str) -> bool:
    return code.endswith(".0.0") or code == "4.4.7"


def find_reply_code(text: str) -> str:
    """The first plausible SMTP reply code in ``text`` ('' if none)."""
    if not text:
        return ""
    masked = _IPV4_RE.sub("***", text)
    for match in _REPLY_RE.finditer(masked):
        if match.group(1) in REPLY_CODES:
            return match.group(1)
    return ""


def prefer(field_status: str, text_status: str, reply_code: str = "") -> str:
    """Choose between a DSN Status: field and a code quoted in the diagnostic.

    The field wins unless it is vague (X.0.0, X.Y.0, 4.4.7, 4.7.0, 5.3.Z, X.5.Z)
    and the quoted code is more specific; a class mismatch is settled by the
    SMTP reply code when there is one.
    """
    if not field_status:
        return text_status
    if not text_status or field_status == text_status:
        return field_status
    if reply_code and field_status[0] != text_status[0]:
        if reply_code[0] == field_status[0]:
            return field_status
        if reply_code[0] == text_status[0]:
            return text_status
    if field_status.endswith(".0.0"):
        return field_status if text_status.endswith(".0.0") else text_status
    if (field_status.endswith(".0") or ".0." in field_status) and ".0" not in text_status:
        return text_status
    if text_status.endswith(".0.0"):
        return field_status
    if field_status in ("4.4.7", "4.7.0") or field_status.startswith("5.3."):
        return text_status
    if field_status[1:4] in (".5.1", ".5.2", ".5.4", ".5.5"):
        return text_status
    if field_status == "5.1.1":
        if ".0" in text_status or text_status.startswith("5.5."):
            return field_status
        return text_status
    if field_status == "5.1.3" and text_status.startswith("5.7."):
        return text_status
    return field_status
