"""Data shapes shared by the bounce parser's stages."""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("hard", "soft", "complaint", "autoreply", "unknown")

REASONS = frozenset(
    {
        "userunknown", "hostunknown", "hasmoved", "mailboxfull", "systemfull", "blocked",
        "spamdetected", "filtered", "rejected", "expired", "policyviolation", "securityerror",
        "toomanyconn", "systemerror", "networkerror", "mesgtoobig", "suspend", "feedback",
        "vacation", "authfailure", "requireptr", "notaccept", "mailererror", "exceedlimit",
        "contenterror", "notcompliantrfc", "norelaying", "virusdetected", "syntaxerror",
        "delivered", "onhold", "undefined",
    }
)  # fmt: skip


@dataclass
class Delivery:
    """One failed (or reported) recipient as read from a bounce, before classification."""

    recipient: str = ""
    alias: str = ""
    status: str = ""
    diagnosis: str = ""
    diag_type: str = ""
    action: str = ""
    command: str = ""
    reply_code: str = ""
    remote_host: str = ""
    reason: str = ""
    reason_is_final: bool = False
    feedback_type: str = ""
    rule: str = ""  # the rule that chose the reason, for explanations
    evidence: str = ""  # the words or code that rule read
    writer: str = ""  # who writes those words, when the tables say
    status_inferred: bool = False  # the report stated no code; status stands for the reason


@dataclass
class BounceResult:
    """What a bounce, complaint or auto-reply says, attributed to its recipient.

    kind: hard | soft | complaint | autoreply | unknown
    reason: a word of the fixed taxonomy (model.REASONS)
    status: the enhanced status code (RFC 3463) the bounce states; when it states none, the
        code the reason stands for (reasons.toml); None for complaints and auto-replies
    recipient: the failed (or complaining / auto-replying) address, or None
    recipients: every failed address the bounce names
    message_id: Message-ID of the original message, when quoted
    verp_token: the local-part token of the engine's VERP return path, when found
    verp_address: the whole VERP address the token was read from
    verp_message_id / verp_recipient: what a verified token names (parse_bounce with
        verp_secret); verp_recipient is "#<index>" for index-form tokens
    verp_feedback_id: the quoted original's CFBL-Feedback-ID (RFC 9477), when found: a
        token of the engine's own, checked by mta.bounce.provenance
    campaign: the engine's X-Campaign-ID of the original message, when quoted
    feedback_type: ARF Feedback-Type (abuse, opt-out, auth-failure, ...) for complaints
    diagnostic: the remote server's words, for operators
    reply_code: the SMTP reply code quoted, or None
    command: the SMTP command the remote rejected (RCPT, DATA, ...), or None
    remote_host: the remote MTA named by the bounce, or None
    """

    kind: str = "unknown"
    reason: str = "undefined"
    status: str | None = None
    recipient: str | None = None
    recipients: list[str] = field(default_factory=list)
    message_id: str | None = None
    verp_token: str | None = None
    verp_address: str | None = None
    verp_message_id: str | None = None
    verp_recipient: str | None = None
    verp_feedback_id: str | None = None
    campaign: str | None = None
    feedback_type: str | None = None
    diagnostic: str | None = None
    reply_code: str | None = None
    command: str | None = None
    remote_host: str | None = None
