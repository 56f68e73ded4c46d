"""Reading failed recipients out of the human-readable text of a bounce.

Most MTAs that do not send RFC 3464 reports still lay their text out the same
few ways: an address on its own line followed by indented error lines (Exim,
qmail, Gmail), ``<address>: error`` (Postfix, OpenSMTPD), a Sendmail session
transcript (``>>> RCPT TO`` / ``<<< 550 ...``), or ``reason: address``. This
module finds those blocks; format-specific knowledge lives in ``formats``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mta.bounce.addresses import ADDRESS_PATTERN, ADDRESS_RE, is_daemon, lower_domain
from mta.bounce.model import Delivery

MAX_LINES = 4000
MAX_DIAG_LINES = 14

# Lines that start the copy of the original message (everything after is not the report).
ORIGINAL_MARKERS = re.compile(
    r"^\s*(?:"
    r"-+ ?This is a copy of (?:the|your) message|"
    r"-+ ?(?:The )?[Oo]riginal message|"
    r"-+ ?Original message follows|"
    r"Original message follows\.?|"
    r"-+ ?Below this line is a copy of the message|"
    r"-+ ?Enclosed is a copy of the message|"
    r"-+ ?Unsent message follows|"
    r"-+ ?Message header follows|"
    r"-+ ?Returned [Mm]essage|"
    r"-+ ?The header of the original message is following|"
    r"-+ ?Original mail as follows|"
    r"Original mail as follows:|"
    r"-+ ?original message|"
    r"-+ ?Undelivered Message Headers|"
    r"Included is a copy of the message header|"
    r"Below is a copy of the original message|"
    r"Message headers follow\.?|"
    r"The original message headers are included as attachment|"
    r"-+ ?Original message headers|"
    r"Content-Type: (?:message/rfc822|text/rfc822-headers)|"
    r"-+ ?Begin(?:ning of)? original message|"
    r"\*+ +End of message +\*+"
    r")",
    re.IGNORECASE,
)

_SMTP_COMMANDS = (
    (re.compile(r"\bRCPT[ _]?TO\b|\bRCPT\b", re.I), "RCPT"),
    (re.compile(r"\bMAIL[ _]?FROM\b|\bMAIL\b", re.I), "MAIL"),
    (re.compile(r"\b(?:end of )?DATA\b|\bBDAT\b", re.I), "DATA"),
    (re.compile(r"\bEHLO\b", re.I), "EHLO"),
    (re.compile(r"\bHELO\b", re.I), "HELO"),
    (re.compile(r"\bSTARTTLS\b", re.I), "STARTTLS"),
    (re.compile(r"\bAUTH\b", re.I), "AUTH"),
)

# How bounces name the SMTP command that failed, most telling first:
# (a word the text must contain, in lower case; inline flags; pattern).
_COMMAND_CONTEXTS = (
    ("reply to", "i", r"in reply to (?P<c>[A-Z][A-Z ]{2,12}?) command"),
    ("after ", "i", r"after (?P<c>RCPT TO|MAIL FROM|end of data|DATA|initial connection|HELO|"
                    r"EHLO|pipelined RCPT TO|pipelined MAIL FROM|RCPT|MAIL|STARTTLS|AUTH)"),
    (">>>", "im", r"^\s*>>> ?(?P<c>RCPT|MAIL|DATA|EHLO|HELO|STARTTLS|AUTH)\b"),
    # session transcripts: MDaemon / Kerio "--> RCPT To:<...>", Postfix's postmaster copy
    ("->", "", r"--?> ?(?P<c>RCPT|MAIL|DATA|EHLO|HELO)\b"),
    ("in:", "", r"\bIn: +(?P<c>RCPT|MAIL|DATA|EHLO|HELO)\b"),
    ("did not like", "i", r"did not like our (?P<c>RCPT TO|MAIL FROM|final DATA|DATA|EHLO|HELO)"),
    ("error following", "i", r"Error following (?P<c>RCPT|MAIL|DATA|EHLO|HELO) command"),
    ("]", "", r"\[(?P<c>RCPT_TO|MAIL_FROM|DATA)\]"),
    ("<<<", "i", r"Sent <<< ?(?P<c>RCPT|MAIL|DATA|EHLO|HELO)"),
    ("smtp:", "i", r"SMTP:(?P<c>RCPT|MAIL|DATA|EHLO|HELO) host"),
    ("smtp command", "i", r"-+ ?SMTP command\s+(?P<c>RCPT|MAIL|DATA|EHLO|HELO)"),
    ("most progress", "i", r"most progress was (?P<c>RCPT TO|MAIL FROM|DATA) response"),
    ("remote server for", "i", r"SMTP error from remote server for (?P<c>TEXT|RCPT|MAIL) command"),
)  # fmt: skip
_COMMAND_CONTEXT_RES = tuple(
    (needle, re.compile(f"(?{flags}:{pattern})" if flags else pattern))
    for needle, flags, pattern in _COMMAND_CONTEXTS
)
_QMAIL_COMMANDS = (
    ("does not like recipient", "RCPT"),
    ("but sender was rejected", "MAIL"),
    ("failed after i sent the message", "DATA"),
    ("failed on data command", "DATA"),
    ("but greeting failed", "CONN"),
    ("but my name was rejected", "EHLO"),
    ("after initial connection", "CONN"),
    ("refused to talk to me", "HELO"),  # Postfix: the server's greeting was a rejection
)

_HEAD_PREFIX = (
    r"^[ \t]*(?:[*>\u2022-]+[ \t]*|\d{3}[ -](?:[245]\.\d{1,3}\.\d{1,3}[ \t]+)?|"
    r"(?:final |original )?recipient(?: address)?:[ \t]*|rcpt to:[ \t]*|address:[ \t]*|to:[ \t]*)?"
)
_ADDRESS_HEAD_RE = re.compile(_HEAD_PREFIX + r"[\"']?<?(?P<a>" + ADDRESS_PATTERN + r")", re.I)


@dataclass
class Context:
    """What the scanners know about the e-mail besides its text."""

    sender_addresses: frozenset[str] = frozenset()
    failed_recipients: tuple[str, ...] = ()


def split_report(text: str) -> tuple[str, str]:
    """(report text, quoted original) split at the first original-message marker."""
    lines = text.splitlines()[:MAX_LINES]
    for index, line in enumerate(lines):
        if index and ORIGINAL_MARKERS.match(line):
            return "\n".join(lines[:index]), "\n".join(lines[index:])
    return "\n".join(lines), ""


_LINE_JOIN_RE = re.compile(r"[ \t]*\n[ \t]*(?![>]{3}|<<<)")


def command_in(text: str) -> str:
    """The SMTP command a piece of bounce text says was rejected ('' if unsaid)."""
    if not text:
        return ""
    lowered = text.lower()
    joined = ""
    for needle, pattern in _COMMAND_CONTEXT_RES:
        if needle not in lowered:
            continue  # the regular expression cannot match: spare the scan
        joined = joined or _LINE_JOIN_RE.sub(" ", text)
        match = pattern.search(joined)
        if match:
            return _command_word(match.group("c"))
    lowered = " ".join(lowered.split())
    for phrase, command in _QMAIL_COMMANDS:
        if phrase in lowered:
            return command
    return ""


# SMTP commands named in upper case inside a reply ("... in RCPT TO", "[RCPT_TO]",
# ">>> DATA"); the later stage of the session wins when several are named.
_COMMAND_TOKEN_RE = re.compile(
    r"(?<![A-Za-z0-9@.])(HELO|EHLO|MAIL[ _]?FROM|RCPT|DATA)(?![A-Za-z0-9@])"
)
_SESSION_ORDER = ("HELO", "EHLO", "MAIL", "RCPT", "DATA")
_REPLY_LINE_RE = re.compile(r"\b[245]\d\d\b|\b[245]\.\d{1,3}\.\d{1,3}\b")


def command_token(text: str) -> str:
    """The SMTP command a server's reply names in upper case ('' if none).

    Only lines that carry a reply or status code count: a bounce's summary of the
    original ("RCPT TO: someone", "MAIL FROM: ...") names no failed command.
    """
    named: set[str] = set()
    for match in _COMMAND_TOKEN_RE.finditer(text or ""):
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        if _REPLY_LINE_RE.search(text, start, len(text) if end < 0 else end):
            named.add(match.group(1)[:4])
    return next((c for c in reversed(_SESSION_ORDER) if c in named), "")


def _command_word(said: str) -> str:
    said = said.strip().upper().replace("_", " ")
    if said.startswith("INITIAL"):
        return "CONN"
    if "DATA" in said or said == "TEXT":
        return "DATA"
    for pattern, command in _SMTP_COMMANDS:
        if pattern.search(said):
            return command
    return ""


def scan(report: str, context: Context) -> list[Delivery]:
    """Failed recipients with their error text, from the report part of a bounce."""
    lines = report.splitlines()[:MAX_LINES]
    heads = _address_heads(lines, context)
    _failed_heads(lines, heads, context)
    deliveries = _blocks(lines, heads)
    if not deliveries:
        deliveries = _tails(lines, context)
    if not deliveries:
        deliveries = _anywhere(lines, context)
    deliveries = _merge(deliveries)
    _add_evidence(deliveries, lines)
    return deliveries


_CODE_LINE_RE = re.compile(
    r"^\s*(?:<<<|>>>|Remote host said:|Received >>>|Sent <<<)?\s*(?:[245]\d\d[ -]|#?[245]\.\d{1,3}\.\d{1,3}\b)"
    r"|\b[245]\.[0-7]\.\d{1,3}\b",
)


def _add_evidence(deliveries: list[Delivery], lines: list[str]) -> None:
    """Add the report's SMTP reply lines a recipient's own block does not quote.

    A single recipient gets the session transcript (``<<< 550 ...``) and, when its
    block has no reply code, every line with one; each recipient gets the other
    lines that name it.
    """
    single = len(deliveries) == 1
    stripped = [(line.strip(), line.lower()) for line in lines if line.strip()]
    for d in deliveries:
        has_code = bool(_CODE_LINE_RE.search(d.diagnosis))
        extra = [
            line
            for line, lowered in stripped
            if line not in d.diagnosis
            and _is_evidence(line, lowered, d.recipient, single, has_code)
        ]
        if extra:
            d.diagnosis = "\n".join([d.diagnosis, *extra[:8]]).strip()


def _is_evidence(line: str, lowered: str, recipient: str, single: bool, has_code: bool) -> bool:
    if recipient in lowered:
        return not has_code
    if not single:
        return False
    if line.startswith("<<<"):
        return True
    return not has_code and bool(_CODE_LINE_RE.search(line))


_DELAY_RE = re.compile(
    r"this is a warning (?:message )?only|will be retried|delivery attempts will continue|"
    r"still being retried|has not yet been delivered|has been delayed|delayed for more than|"
    r"temporary failure report",
    re.IGNORECASE,
)


def is_delay_notice(report: str) -> bool:
    """True when the report says delivery is still being attempted (a delay warning)."""
    return bool(_DELAY_RE.search(report[:20000]))


def _usable(address: str, context: Context) -> bool:
    low = address.lower()
    if low in context.sender_addresses or is_daemon(low):
        return False
    return "@" in low and not low.startswith("@")


def _address_heads(lines: list[str], context: Context) -> dict[int, tuple[str, str]]:
    """Line index -> (address, rest of the line) for lines that start with an address."""
    heads: dict[int, tuple[str, str]] = {}
    for index, line in enumerate(lines):
        if len(line) > 400 or "@" not in line:
            continue
        match = _ADDRESS_HEAD_RE.match(line)
        if not match:
            continue
        prefix = line[: match.start("a")].lower()
        if "mail from" in prefix or prefix.strip().startswith(("from:", "sender:")):
            continue
        address = lower_domain(match.group("a").rstrip("."))
        if _usable(address, context):
            heads[index] = (address, line[match.end("a") :])
    return heads


def _failed_heads(lines: list[str], heads: dict[int, tuple[str, str]], context: Context) -> None:
    """X-Failed-Recipients addresses whose line shows only the local part (or nothing)."""
    named = {address for address, _ in heads.values()}
    for address in context.failed_recipients:
        if address in named:
            continue
        local = address.split("@")[0].lower()
        for index, line in enumerate(lines):
            if line.strip().strip('<>:"').lower() in (local, address.lower()):
                heads[index] = (address, "")
                break


def _blocks(lines: list[str], heads: dict[int, tuple[str, str]]) -> list[Delivery]:
    deliveries = []
    for index, (address, _rest) in heads.items():
        head = lines[index].strip()
        bare = head.strip("<>\"':*-\u2022 ").lower() == address.lower()
        diag = [] if bare else [head]
        diag.extend(_following(lines, index, heads))
        if not diag:
            diag = _preceding(lines, index, heads)
        deliveries.append(Delivery(recipient=address, diagnosis="\n".join(diag)))
    return deliveries


def _following(lines: list[str], index: int, heads: dict[int, tuple[str, str]]) -> list[str]:
    """The error lines that belong to the address on line ``index``."""
    out: list[str] = []
    blanks = 0
    for j in range(index + 1, min(len(lines), index + 1 + MAX_DIAG_LINES * 2)):
        line = lines[j]
        if j in heads and heads[j][0] != heads[index][0]:
            break
        if not line.strip():
            blanks += 1
            if (out and not out[-1].endswith(":")) or blanks > 2:
                break
            continue
        if _is_separator(line):
            if out:
                break
            continue
        out.append(line.strip())
        if len(out) >= MAX_DIAG_LINES:
            break
    return out


def _preceding(lines: list[str], index: int, heads: dict[int, tuple[str, str]]) -> list[str]:
    """The paragraph just above a bare address line ('Reason\\naddress' layouts)."""
    out: list[str] = []
    for j in range(index - 1, max(-1, index - 1 - MAX_DIAG_LINES), -1):
        line = lines[j]
        if j in heads or not line.strip():
            if out:
                break
            continue
        if _is_separator(line):
            if out:
                break
            continue
        out.append(line.strip())
    return list(reversed(out))


def _is_separator(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 8 and len(set(stripped)) <= 2 and not stripped[0].isalnum()


def _tails(lines: list[str], context: Context) -> list[Delivery]:
    """'Reason text: address' lines (the address closes the line)."""
    deliveries = []
    for index, line in enumerate(lines):
        stripped = line.strip().rstrip(".")
        match = ADDRESS_RE.search(stripped)
        if not match or not stripped.rstrip(">").endswith(match.group(1)):
            continue
        address = lower_domain(match.group(1).rstrip("."))
        before = stripped[: match.start()].strip(" <:")
        if not before or not _usable(address, context):
            continue
        if re.match(
            r"(?i)^(from|sender|reply-to|return-path|mail from|envelope-from|to|cc)\b", before
        ):
            continue
        nearby = [before]
        nearby.extend(x.strip() for x in lines[index + 1 : index + 3] if x.strip())
        deliveries.append(Delivery(recipient=address, diagnosis="\n".join(nearby)))
    return deliveries


def _anywhere(lines: list[str], context: Context) -> list[Delivery]:
    """Last resort: any usable address in the report, with its paragraph as the error."""
    text = "\n".join(lines)
    offset = 0
    for line in lines:
        # the address pattern is costly: only lines with an "@" can hold one
        for match in ADDRESS_RE.finditer(line) if "@" in line else ():
            address = lower_domain(match.group(1).rstrip("."))
            if _SENDER_PREFIX_RE.search(line[: match.start()].lower()):
                continue
            if _usable(address, context):
                return [
                    Delivery(recipient=address, diagnosis=_paragraph(text, offset + match.start()))
                ]
        offset += len(line) + 1
    return []


_SENDER_PREFIX_RE = re.compile(r"(from|sender|reply-to|return-path|envelope-from)\W*$")


def _paragraph(text: str, position: int) -> str:
    start = text.rfind("\n\n", 0, position)
    end = text.find("\n\n", position)
    start = 0 if start < 0 else start
    end = len(text) if end < 0 else end
    return text[start:end].strip()[:2000]


def _merge(deliveries: list[Delivery]) -> list[Delivery]:
    merged: dict[str, Delivery] = {}
    for d in deliveries:
        key = d.recipient.lower()
        if key in merged:
            if d.diagnosis and d.diagnosis not in merged[key].diagnosis:
                merged[key].diagnosis = f"{merged[key].diagnosis}\n{d.diagnosis}".strip()
        else:
            merged[key] = d
    return list(merged.values())
