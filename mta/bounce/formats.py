"""Readers for bounce layouts that need more than the generic scanner.

Each reader recognises one family by its own marks (sender, subject, fixed
sentences) and returns the failed deliveries, or None when the mail is not of
its family. Reason hints set here are the family's documented meaning of its
own sentences (e.g. Exchange's "The recipient name is not recognized").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from mta.bounce.addresses import clean_address, find_addresses, is_daemon
from mta.bounce.mime import MailParts
from mta.bounce.model import Delivery
from mta.bounce.prose import Context, command_in

Reader = Callable[[MailParts, str, Context], "list[Delivery] | None"]


def read(parts: MailParts, report: str, context: Context) -> list[Delivery] | None:
    """Deliveries for a recognised special format, or None to use the generic path."""
    for reader in READERS:
        found = reader(parts, report, context)
        if found:
            for d in found:
                if d.reason and not d.rule:
                    d.rule = f"format {reader.__name__.removeprefix('read_')}: its own wording"
            return found
    return None


# --- Amazon SES notifications delivered by SNS e-mail (JSON body) ----------------------

_SES_SUBTYPES = {
    "noemail": "userunknown",
    "suppressed": "suppressed",
    "onaccountsuppressionlist": "suppressed",
    "mailboxfull": "mailboxfull",
    "messagetoolarge": "mesgtoobig",
    "contentrejected": "contenterror",
    "attachmentrejected": "securityerror",
}


def read_ses_json(parts: MailParts, report: str, context: Context) -> list[Delivery] | None:
    data = _ses_notification("\n".join(parts.texts).strip())
    if not isinstance(data, dict):
        return None
    kind = str(data.get("notificationType") or data.get("eventType") or "").lower()
    if kind == "bounce":
        return _ses_bounce(data.get("bounce") or {})
    if kind == "complaint":
        return _ses_complaint(data.get("complaint") or {})
    return None


def _ses_notification(text: str) -> object:
    """The SES notification object: bare, or as the "Message" string of an SNS envelope."""
    for mark in ('{"notificationType"', '{"eventType"'):
        start = text.find(mark)
        if start >= 0:
            return _json_object(text[start:])
    start = text.find("{")
    if start < 0 or '"Message"' not in text:
        return None
    envelope = _json_object(text[start:])
    inner = envelope.get("Message") if isinstance(envelope, dict) else None
    if not isinstance(inner, str):
        return None
    try:
        return json.loads(inner)
    except ValueError:
        return None


def _json_object(text: str) -> object:
    """Decode the JSON object at the start of ``text``, undoing MTA line splitting."""
    for candidate in (text, re.sub(r"!\r?\n ", "", text), re.sub(r"\r?\n[ \t]?", "", text)):
        try:
            return json.JSONDecoder().raw_decode(candidate)[0]
        except ValueError:
            continue
    return None


def _ses_bounce(bounce: dict) -> list[Delivery]:
    subtype = str(bounce.get("bounceSubType") or "").lower()
    permanent = str(bounce.get("bounceType") or "").lower() == "permanent"
    out = []
    for item in bounce.get("bouncedRecipients") or []:
        if not isinstance(item, dict):
            continue
        d = Delivery(
            recipient=clean_address(str(item.get("emailAddress") or "")),
            status=str(item.get("status") or ""),
            diagnosis=str(item.get("diagnosticCode") or ""),
            action=str(item.get("action") or ""),
        )
        hint = _SES_SUBTYPES.get(subtype, "")
        d.reason = "rejected" if hint == "suppressed" else hint
        d.reason_is_final = bool(d.reason)
        d.evidence = f"bounceSubType {subtype}" if d.reason else ""
        if not d.diagnosis and not permanent:
            d.action = "delayed"
        out.append(d)
    return out


def _ses_complaint(complaint: dict) -> list[Delivery]:
    feedback = str(complaint.get("complaintFeedbackType") or "abuse")
    return [
        Delivery(
            recipient=clean_address(str(i.get("emailAddress") or "")),
            reason="feedback",
            feedback_type=feedback,
        )
        for i in complaint.get("complainedRecipients") or []
        if isinstance(i, dict)
    ]


# --- Google Groups: posting to a group that does not exist or refuses the sender -------


def read_google_groups(parts: MailParts, report: str, context: Context) -> list[Delivery] | None:
    if "mailer-daemon@googlemail.com" not in parts.header("From").lower():
        return None
    if "groups.google.com" not in report and "Google Groups" not in report:
        return None
    recipients = context.failed_recipients
    if not recipients:
        return None
    diagnosis = " ".join(report.split())[:1000]
    return [
        Delivery(
            recipient=r,
            reason="rejected",
            reason_is_final=True,
            diagnosis=diagnosis,
            evidence="groups.google.com",
        )
        for r in recipients
    ]


# --- Gmail (legacy text layout): "Technical details of permanent failure:" -------------

_GMAIL_STATES = {
    "6": ("MAIL", "securityerror"),
    "8": ("AUTH", "systemerror"),
    "9": ("AUTH", "securityerror"),
    "12": ("AUTH", "norelaying"),
    "13": ("EHLO", "blocked"),
    "14": ("RCPT", "userunknown"),
    "15": ("DATA", "filtered"),
    "17": ("DATA", "filtered"),
    "18": ("DATA", "filtered"),
}
_GMAIL_MESSAGES = (
    ("dns error: could not contact dns servers", "expired"),
    ("delivery to the following recipient has been delayed", "expired"),
    ("the recipient server did not accept our requests to connect", "expired"),
    ("dns error: domain name not found", "hostunknown"),
    ("dns error: dns server returned answer with no data", "hostunknown"),
)


def read_gmail(parts: MailParts, report: str, context: Context) -> list[Delivery] | None:
    if "Technical details of " not in report or "Delivery to the following recipient" not in report:
        return None
    head, _, details = report.partition("Technical details of ")
    recipients = [
        a
        for a in find_addresses(head.split("Delivery to the following recipient", 1)[1])
        if a.lower() not in context.sender_addresses and not is_daemon(a)
    ]
    if not recipients:
        return None
    diagnosis = " ".join(("Technical details of " + details).split())
    reason, command, evidence = "", "", ""
    state = re.search(r"\(state (\d+)\)", diagnosis)
    if state and state.group(1) in _GMAIL_STATES:
        command, reason = _GMAIL_STATES[state.group(1)]
        evidence = state.group(0)
    lowered = diagnosis.lower() + " " + head.lower()
    if not reason:
        reason, evidence = next(((r, p) for p, r in _GMAIL_MESSAGES if p in lowered), ("", ""))
    action = "delayed" if "has been delayed" in head else ""
    return [
        Delivery(
            recipient=r,
            diagnosis=diagnosis,
            reason=reason,
            command=command,
            action=action,
            reason_is_final=bool(reason),
            evidence=evidence,
        )
        for r in recipients
    ]


# --- Microsoft Exchange 2003 and older: "did not reach the following recipient(s)" -----

_EXCHANGE_CODES = {
    "000C05A6": "userunknown",
    "000C0595": "hostunknown",
    "000C0524": "hasmoved",
    "000C05A5": "userunknown",
    "00010256": "mailboxfull",
    "000B099C": "mailboxfull",
    "00010259": "systemerror",
    "000B09AA": "expired",
    "000B09B6": "expired",
    "000D059C": "mesgtoobig",
}
_EXCHANGE_SENTENCES = (
    ("the recipient name is not recognized", "userunknown"),
    ("the e-mail account does not exist at the organization", "userunknown"),
    ("the message could not be delivered because the recipient's mailbox is full", "mailboxfull"),
    ("the message reached the recipient's e-mail system, but delivery was refused", "filtered"),
    ("the recipient's e-mail system could not be reached", "networkerror"),
    ("could not deliver the message in the time limit specified", "expired"),
)


def read_exchange_legacy(parts: MailParts, report: str, context: Context) -> list[Delivery] | None:
    if "did not reach the following recipient" not in report:
        return None
    body = report.split("did not reach the following recipient", 1)[1]
    out: list[Delivery] = []
    for block in re.split(r"\n(?=\s{0,4}\S+@\S+ on )", body):
        found = re.match(r"\s*(\S+@\S+?)\s+on\s", block)
        if not found:
            continue
        diagnosis = " ".join(block.split())
        code = re.search(r"\(([0-9A-F]{8})\)", diagnosis)
        reason = _EXCHANGE_CODES.get(code.group(1), "") if code else ""
        evidence = code.group(1) if reason else ""
        lowered = diagnosis.lower()
        if not reason:
            reason, evidence = next(
                ((r, t) for t, r in _EXCHANGE_SENTENCES if t in lowered), ("", "")
            )
        out.append(
            Delivery(
                recipient=clean_address(found.group(1)),
                diagnosis=diagnosis,
                reason=reason,
                reason_is_final=bool(reason),
                evidence=evidence,
            )
        )
    return out or None


# --- au/KDDI EZweb: a summary sentence names the reason --------------------------------

_EZWEB_SENTENCES = (
    ("The user(s) account is temporarily over quota", "mailboxfull"),
    ("The user(s) account is disabled.", "suspend"),
    ("The user(s) account is temporarily limited.", "suspend"),
    ("Your message was not delivered within ", "expired"),
)


def read_ezweb(parts: MailParts, report: str, context: Context) -> list[Delivery] | None:
    sender = parts.header("From").lower()
    if "postmaster@ezweb.ne.jp" not in sender and "postmaster@au.com" not in sender:
        return None
    reason, evidence = next(((r, t) for t, r in _EZWEB_SENTENCES if t in report), ("", ""))
    if parts.header("X-SPASIGN").upper() == "NG":
        reason, evidence = "filtered", "X-SPASIGN: NG"
    if not reason:
        return None
    recipients = [a for a in find_addresses(report) if a.lower() not in context.sender_addresses]
    return [
        Delivery(
            recipient=r,
            reason=reason,
            reason_is_final=True,
            evidence=evidence,
            diagnosis=" ".join(report.split())[:1000],
        )
        for r in recipients[:1]
    ] or None


# --- Verizon Wireless (vtext.com) SMS gateway --------------------------------------------


def read_verizon(parts: MailParts, report: str, context: Context) -> list[Delivery] | None:
    if "vtext.com" not in parts.header("From").lower():
        return None
    rcpt = re.search(r"(?mi)^\s*RCPT TO:\s*<?(\S+@[^\s>]+)", report)
    if not rcpt:
        return None
    diagnosis = " ".join(report.split("Message details:", 1)[0].split())
    evidence = "invalid user address" if "invalid user address" in diagnosis.lower() else ""
    reason = "userunknown" if evidence else ""
    return [
        Delivery(
            recipient=clean_address(rcpt.group(1)),
            diagnosis=diagnosis,
            reason=reason,
            reason_is_final=bool(reason),
            evidence=evidence,
            command="RCPT",
        )
    ]


# --- PowerMTA: X-PowerMTA-BounceCategory in the delivery-status part ---------------------

_PMTA_CATEGORIES = {
    "bad-mailbox": "userunknown",
    "bad-domain": "hostunknown",
    "inactive-mailbox": "suspend",
    "quota-issues": "mailboxfull",
    "spam-related": "spamdetected",
    "policy-related": "policyviolation",
    "content-related": "contenterror",
    "message-expired": "expired",
    "no-answer-from-host": "expired",
    "relaying-issues": "norelaying",
    "routing-errors": "systemerror",
    "bad-connection": "networkerror",
    "protocol-errors": "syntaxerror",
    "virus-related": "virusdetected",
}


def powermta_reason(parts: MailParts) -> str:
    """The reason X-PowerMTA-BounceCategory names, or ''."""
    for text in parts.reports:
        found = re.search(r"(?mi)^X-PowerMTA-BounceCategory:\s*([\w-]+)", text)
        if found:
            return _PMTA_CATEGORIES.get(found.group(1).lower(), "")
    return ""


# --- fml mailing list manager: errors about posts to a list ----------------------------

_FML_SENTENCES = (
    ("You are not a member of this mailing list", "rejected"),
    ("NOT MEMBER article from ", "rejected"),
    ("reject mail from ", "rejected"),
    ("reject spammers:", "rejected"),
    (" header may cause mail loop", "rejected"),
    ("Duplicated Message-ID", "systemerror"),
    ("Security alert:", "securityerror"),
    (" has detected a loop condition so that", "systemerror"),
    ("Loop Back Warning:", "systemerror"),
)
_FML_SUBJECTS = (
    (" are not member", "rejected"),
    ("NOT MEMBER article from ", "rejected"),
    ("reject mail ", "rejected"),
    ("Loop Alert: ", "systemerror"),
    ("Loop Back Warning: ", "systemerror"),
    ("fml system error message", "systemerror"),
    ("Security Alert", "securityerror"),
)


def read_fml(parts: MailParts, report: str, context: Context) -> list[Delivery] | None:
    if not parts.header("X-MLServer") or "-admin@" not in parts.header("From"):
        return None
    subject = parts.header("Subject")
    reason, evidence = next(((r, t) for t, r in _FML_SENTENCES if t in report), ("", ""))
    if not reason:
        reason, evidence = next(((r, t) for t, r in _FML_SUBJECTS if t in subject), ("", ""))
    found = re.search(r"<([^<>\s]+@[^<>\s]+)>", report)
    if not found or not reason:
        return None
    return [
        Delivery(
            recipient=clean_address(found.group(1)),
            reason=reason,
            reason_is_final=True,
            evidence=evidence,
            diagnosis=" ".join(report.split())[:1000],
        )
    ]


READERS: tuple[Reader, ...] = (
    read_fml,
    read_ses_json,
    read_google_groups,
    read_gmail,
    read_exchange_legacy,
    read_ezweb,
    read_verizon,
)

__all__ = ["command_in", "powermta_reason", "read"]
