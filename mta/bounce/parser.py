"""parse_bounce: one e-mail in, one BounceResult out, never an exception."""

from __future__ import annotations

import re

from mta.bounce import arf, autoreply, formats, prose
from mta.bounce.addresses import find_addresses, is_address
from mta.bounce.dsn import parse_fields, read_deliveries, settle_status
from mta.bounce.families import agent_hint, family_command, family_hint, family_of
from mta.bounce.mime import MailParts, from_message, load
from mta.bounce.model import BounceResult, Delivery
from mta.bounce.providers import provider_hint, remote_host
from mta.bounce.reason import REFINABLE, Decision, decide, inferred_status, is_temporary, kind_of
from mta.bounce.status import find_reply_code, find_status
from mta.bounce.verp import looks_like_token, parse_return_path

CAMPAIGN_HEADER = "x-campaign-id"
_MESSAGE_ID_RE = re.compile(r"<([^<>\s]{3,250})>")
_BOUNCE_SUBJECT_RE = re.compile(
    r"(undeliver|undelivered|delivery (status )?notification|returned mail|mail delivery|"
    r"failure notice|delivery fail|non[- ]?remis|non recapitabile|unzustellbar|"
    r"mail system error|could not send|delivery report|delivery status|warning: )",
    re.IGNORECASE,
)


def parse_bounce(data: bytes, verp_secret: bytes | None = None) -> BounceResult:
    """Classify a bounce, feedback report or auto-reply given as a whole e-mail.

    Never raises: anything unreadable comes back as kind "unknown". When
    ``verp_secret`` is given, a valid VERP return path fills in the recipient
    and message id that the bounce text does not name.
    """
    return analyse(data, verp_secret)[0]


def analyse(data: bytes, verp_secret: bytes | None = None) -> tuple[BounceResult, list[Delivery]]:
    """parse_bounce, with the classified deliveries (each with its rule and evidence)."""
    try:
        return _parse(bytes(data), verp_secret)
    except (RecursionError, MemoryError):
        return BounceResult(), []
    except Exception:  # noqa: BLE001 - the parser must never raise on hostile input
        return BounceResult(), []


def _parse(data: bytes, verp_secret: bytes | None) -> tuple[BounceResult, list[Delivery]]:
    parts = load(data)
    deliveries = [
        d for d in _deliveries(parts) if d.recipient or d.reason or d.diagnosis or d.status
    ]
    result = _result(deliveries, parts)
    _identify(result, parts, verp_secret)
    return _printable(result), deliveries


def _printable(result: BounceResult) -> BounceResult:
    """Replace undecodable bytes (surrogate escapes from raw headers) so the result is valid text."""
    for name, value in vars(result).items():
        if isinstance(value, str):
            setattr(result, name, _valid_text(value))
        elif isinstance(value, list):
            setattr(result, name, [_valid_text(v) for v in value])
    return result


def _valid_text(value: str) -> str:
    if value.isascii():
        return value
    return value.encode("utf-8", "replace").decode("utf-8")


def _deliveries(parts: MailParts, depth: int = 0) -> list[Delivery]:
    if arf.is_feedback(parts):
        return arf.read_feedback(parts)
    report, quoted = prose.split_report("\n".join(parts.texts))
    parts.original = parts.original or quoted
    parts.report = report
    context = _context(parts, report)
    special = formats.read(parts, report, context)
    texts = special or prose.scan(report, context)
    dsn = _dsn_deliveries(parts, report)
    if dsn:
        return _read_as_family(_dsn_with_prose(dsn, texts, report, parts), parts, report)
    if special is not None or _is_bounce(parts, report):
        return _read_as_family(_prose_bounce(parts, texts, report, context, depth), parts, report)
    inner = _attached_bounce(parts, depth)
    if inner:
        return inner
    if autoreply.is_autoreply(parts):
        return [Delivery(recipient=autoreply.replier(parts), reason="vacation")]
    return []


def _dsn_with_prose(
    dsn: list[Delivery], texts: list[Delivery], report: str, parts: MailParts
) -> list[Delivery]:
    _enrich(dsn, texts, report)
    hint = formats.powermta_reason(parts)
    for d in dsn:
        if hint and not d.reason:
            d.reason, d.reason_is_final = hint, True
            d.rule, d.evidence = "PowerMTA bounce category", "X-PowerMTA-BounceCategory"
    return dsn


def _read_as_family(deliveries: list[Delivery], parts: MailParts, report: str) -> list[Delivery]:
    """What the reporting MTA family's own wording says: the SMTP command, the reason."""
    family = family_of(parts, report)
    single = len(deliveries) == 1
    for d in deliveries:
        d.command = d.command or family_command(family, d) or prose.command_token(d.diagnosis)
        if not d.command and single:
            d.command = prose.command_token(report)
        if family is not None and not d.reason:
            settle_status(d)
            _apply(d, family_hint(family, d), final=False)
    return deliveries


def _apply(d: Delivery, decision: Decision | None, final: bool) -> None:
    if decision is None:
        return
    d.reason, d.rule, d.evidence, d.writer = decision
    d.reason_is_final = final or decision.reason not in REFINABLE


def _prose_bounce(
    parts: MailParts, texts: list[Delivery], report: str, context: prose.Context, depth: int
) -> list[Delivery]:
    """A bounce without a DSN part: the prose, X-Failed-Recipients, an attached bounce."""
    if texts:
        _enrich(texts, texts, report)
        if prose.is_delay_notice(report):
            for d in texts:
                d.action = d.action or "delayed"
        return texts
    if context.failed_recipients:
        return [Delivery(recipient=r, diagnosis=report[:2000]) for r in context.failed_recipients]
    inner = _attached_bounce(parts, depth)
    if inner:
        return inner
    return [_unattributed(parts, report, context)] if report.strip() else []


def _unattributed(parts: MailParts, report: str, context: prose.Context) -> Delivery:
    """A bounce that names no recipient: its text still says why; the original's To says who."""
    recipient = ""
    for name, value in parse_fields(_original_head(parts.original)):
        if name == "to":
            found = [a for a in find_addresses(value) if a.lower() not in context.sender_addresses]
            recipient = found[0] if len(found) == 1 else ""
            break
    return Delivery(recipient=recipient, diagnosis=report[:4000], command=prose.command_in(report))


def _attached_bounce(parts: MailParts, depth: int) -> list[Delivery]:
    """A bounce forwarded as an attachment (message/rfc822) is read in place of the outer mail."""
    if depth >= 2 or parts.attached is None:
        return []
    inner = from_message(parts.attached)
    if not (inner.reports or "mailer-daemon" in inner.header("From").lower()):
        return []
    return _deliveries(inner, depth + 1)


def _dsn_deliveries(parts: MailParts, report: str) -> list[Delivery]:
    deliveries: list[Delivery] = []
    for text in parts.reports:
        deliveries.extend(read_deliveries(text))
    if not deliveries:
        deliveries = read_deliveries(report)
    return deliveries


_BOUNCE_TEXT_RE = re.compile(
    r"could not be delivered|couldn't be delivered|undeliverable|undelivered mail|"
    r"delivery (?:has )?failed|delivery to the following recipient|was not delivered|"
    r"unable to deliver|permanent (?:fatal )?errors?|could not deliver|delivery failure|"
    r"did not reach the following recipient|transcript of session follows|"
    r"following address(?:es)? (?:had|failed)|returned mail|failed permanently|has been delayed",
    re.IGNORECASE,
)


def _is_bounce(parts: MailParts, report: str) -> bool:
    """Bounce marks: a daemon sender, failure headers or subject, a DSN part, failure text."""
    if _has_bounce_headers(parts):
        return True
    if autoreply.is_autoreply(parts):
        return False
    if _BOUNCE_TEXT_RE.search(report[:20000]):
        return True
    if not parts.header("Return-Path").strip("<> "):
        return bool(find_status(report) or find_reply_code(report))
    return False


def _has_bounce_headers(parts: MailParts) -> bool:
    sender = parts.header("From").lower()
    daemons = ("mailer-daemon", "postmaster", "post_master", "mail delivery")
    if any(word in sender for word in daemons):
        return True
    if parts.header("X-Failed-Recipients") or _BOUNCE_SUBJECT_RE.search(parts.header("Subject")):
        return True
    return bool(parts.reports)


# Matched on the lower-cased report: much faster than an IGNORECASE alternation.
_ENVELOPE_SENDER_RE = re.compile(
    r"(?:mail from:?|envelope-(?:sender|from)|return-path:?)\s*<?([^\s<>]+@[^\s<>]+)>?"
)


def _context(parts: MailParts, report: str) -> prose.Context:
    senders: set[str] = set()
    for name in ("To", "From", "Reply-To", "Sender", "Cc"):
        senders.update(a.lower() for a in find_addresses(parts.header(name)))
    for name, value in parse_fields(_original_head(parts.original)):
        if name in ("from", "return-path", "sender", "reply-to"):
            senders.update(a.lower() for a in find_addresses(value))
    for match in _ENVELOPE_SENDER_RE.finditer(report.lower()):
        senders.update(find_addresses(match.group(1)))
    failed = tuple(find_addresses(parts.header("X-Failed-Recipients")))
    failed_set = {f.lower() for f in failed}
    return prose.Context(sender_addresses=frozenset(senders - failed_set), failed_recipients=failed)


def _enrich(deliveries: list[Delivery], texts: list[Delivery], report: str) -> None:
    """Fill what a DSN leaves out (error text, command, recipient, hints) from the prose."""
    by_address = {t.recipient.lower(): t for t in texts}
    single = len(deliveries) == 1
    for d in deliveries:
        match = by_address.get(d.recipient.lower()) or by_address.get(d.alias.lower())
        if match is None and single and len(texts) == 1:
            match = texts[0]
        if (not d.recipient or not is_address(d.recipient)) and match is not None:
            d.recipient = match.recipient
        if match is not None and match is not d:
            if not d.diagnosis.strip() or d.diagnosis.strip().isdigit():
                d.diagnosis = match.diagnosis
            d.command = d.command or match.command or prose.command_in(match.diagnosis)
            if match.reason and not d.reason:
                d.reason, d.reason_is_final = match.reason, match.reason_is_final
                d.rule, d.evidence, d.writer = match.rule, match.evidence, match.writer
            d.action = d.action or match.action
            _specific_status(d, match.diagnosis)
        d.command = d.command or prose.command_in(d.diagnosis)
        if not d.command and single:
            d.command = prose.command_in(report)


def _specific_status(d: Delivery, text: str) -> None:
    """A DSN that says only X.0.0 (or nothing) while its prose quotes the specific code."""
    if d.status and not d.status.endswith(".0.0"):
        return
    found = find_status(text, d.status[:1])
    if found and not found.endswith(".0.0"):
        d.status = found


def _result(deliveries: list[Delivery], parts: MailParts) -> BounceResult:
    if not deliveries:
        return BounceResult()
    report = parts.report[:20000]
    for d in deliveries:
        _finish(d, report, single=len(deliveries) == 1)
    first = deliveries[0]
    recipients = [d.recipient for d in deliveries if d.recipient]
    return BounceResult(
        kind=kind_of(first.reason, first.status, first.reply_code, first.diagnosis),
        reason=first.reason,
        status=first.status or None,
        recipient=first.recipient or None,
        recipients=list(dict.fromkeys(recipients)),
        feedback_type=first.feedback_type or None,
        diagnostic=_short(first.diagnosis),
        reply_code=first.reply_code or None,
        command=first.command or None,
        remote_host=first.remote_host or None,
    )


_NOT_BOUNCES = {"feedback": "feedback report (ARF)", "vacation": "automatic reply (RFC 3834)"}


def _finish(d: Delivery, report: str, single: bool) -> None:
    if d.reason in ("feedback", "vacation"):
        d.status = ""
        d.rule = d.rule or _NOT_BOUNCES[d.reason]
        return
    settle_status(d)
    if single and (not d.status or d.status.endswith(".0.0")):
        _status_from_report(d, report)
    host = remote_host(d, report)
    d.remote_host = d.remote_host or host
    if not d.reason_is_final and d.reason in REFINABLE:
        _apply(d, agent_hint(d) or provider_hint(d, host), final=True)
    d.reason, d.rule, d.evidence, d.writer = decide(d)
    if not d.status and d.reason != "delivered":
        d.status = inferred_status(d.reason, _temporary(d))
        d.status_inferred = True


_STATUS_SEARCH_CHARS = 8000  # the remote server's reply is quoted near the top of the report


def _status_from_report(d: Delivery, report: str) -> None:
    """A specific code the report states elsewhere (the remote server's reply it quotes)."""
    text = report[:_STATUS_SEARCH_CHARS]
    if d.status:
        _specific_status(d, text)
    else:
        d.status = find_status(text, d.reply_code[:1])


def _temporary(d: Delivery) -> bool:
    if d.action.lower() in ("delayed", "expired"):
        return True
    return is_temporary("", d.reply_code, d.diagnosis)


def _short(text: str) -> str | None:
    text = re.sub(r"\s+", " ", text or "").strip()
    return text[:500] or None


def _identify(result: BounceResult, parts: MailParts, verp_secret: bytes | None) -> None:
    """Original Message-ID, campaign and VERP token, wherever the bounce quotes them."""
    fields = parse_fields(_original_head(parts.original))
    for name, value in fields:
        if name == "message-id" and result.message_id is None:
            match = _MESSAGE_ID_RE.search(value)
            result.message_id = match.group(1) if match else value.strip() or None
        elif name == CAMPAIGN_HEADER and result.campaign is None:
            result.campaign = value.strip() or None
        elif name == "cfbl-feedback-id" and result.verp_feedback_id is None:
            result.verp_feedback_id = value.strip()[:200] or None
    if result.message_id is None:
        for text in parts.reports:
            for name, value in parse_fields(text):
                if name in ("x-original-message-id", "original-message-id"):
                    match = _MESSAGE_ID_RE.search(value)
                    result.message_id = match.group(1) if match else value.strip() or None
    address = _verp_address(parts, fields)
    if address:
        result.verp_token = address.split("@")[0].split("+", 1)[1]
        _apply_verp(result, address, verp_secret)


_HEADER_LINE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,60}:")


def _original_head(original: str) -> str:
    """The header block of the quoted original message (skipping a marker line or two)."""
    lines = original.splitlines()
    start = 0
    while start < min(len(lines), 4) and not _HEADER_LINE_RE.match(lines[start]):
        start += 1
    head: list[str] = []
    for line in lines[start:]:
        if not line.strip():
            break
        head.append(line)
    return "\n".join(head)


def _verp_address(parts: MailParts, original_fields: list[tuple[str, str]]) -> str:
    candidates: list[str] = []
    for name in ("To", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To"):
        candidates.extend(find_addresses(parts.header(name)))
    for name, value in original_fields:
        if name in ("return-path", "sender", "errors-to"):
            candidates.extend(find_addresses(value))
    for address in candidates:
        local = address.split("@")[0]
        if "+" in local and looks_like_token(local.split("+", 1)[1]):
            return address
    return ""


def _apply_verp(result: BounceResult, address: str, secret: bytes | None) -> None:
    result.verp_address = address
    if secret is None:
        return
    decoded = parse_return_path(secret, address)
    if decoded is None:
        return
    result.verp_message_id, result.verp_recipient = decoded
    if not result.recipient and not result.verp_recipient.startswith("#"):
        result.recipient = result.verp_recipient
        result.recipients = result.recipients or [result.verp_recipient]
