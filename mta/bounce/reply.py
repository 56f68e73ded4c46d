"""Classifying the SMTP replies the engine itself receives while delivering."""

from __future__ import annotations

from mta.bounce.model import Delivery
from mta.bounce.phrases import book, normalize
from mta.bounce.reason import find_reason, kind_of
from mta.bounce.status import find_status, is_status


def classify_reply(
    code: int, enhanced: str | None, text: str, command: str | None = None
) -> tuple[str, str]:
    """(kind, reason) for an SMTP reply: kind is "hard" or "soft"; 4xx is always soft.

    ``command`` is the SMTP command the reply answered (RCPT, DATA, ...) when the
    caller knows it; without it a "user unknown" wording counts as a bad address,
    as it does for a live RCPT rejection.
    """
    text = text or ""
    status = enhanced if enhanced and is_status(enhanced) else find_status(text, str(code)[:1])
    delivery = Delivery(
        status=status,
        diagnosis=f"{code} {enhanced or ''} {text}".strip(),
        reply_code=str(code),
        command=(command or "").upper(),
        diag_type="SMTP",
    )
    reason = find_reason(delivery)
    if reason == "filtered" and command is None and book().said("userunknown", normalize(text)):
        reason = "userunknown"
    if reason in ("onhold", "undefined", "delivered"):
        reason = "undefined" if code >= 400 else "delivered"
    if 400 <= code < 500:
        return "soft", reason
    kind = kind_of(reason, status, str(code), text)
    return ("soft" if kind not in ("hard", "soft") else kind), reason
