"""SMTP reply codes and RFC 3463 enhanced status codes found in free text."""

from __future__ import annotations

import re

from mta.bounce.phrases import book

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


def _code_reasons() -> dict[str, str]:
    """Enhanced status code -> the reason it names by itself (the `codes` of reasons.toml)."""
    table: dict[str, str] = {}
    for reason in book().reasons.values():
        for code in reason.codes:
            if table.setdefault(code, reason.name) != reason.name:
                raise ValueError(f"{code} names both {table[code]} and {reason.name}")
    return table


STATUS_REASONS: dict[str, str] = _code_reasons()


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
    specific = [c for c in found if not is_vague(c)]
    return specific[0] if specific else found[0]


def is_vague(code: str) -> bool:
    """X.0.0 and the catch-all 4.4.7 say only the class of the failure."""
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
