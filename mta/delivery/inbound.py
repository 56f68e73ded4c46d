"""Mail for the engine's own domains: bounces, feedback-loop reports, unsubscribe mails.

Outgoing mail carries a VERP return path ``<prefix>+<token>@<bounce domain>``
(see `verp_transform`); what comes back to that domain is handed here instead of
being relayed. Each message is parsed by `mta.bounce`, attributed to the
original message, account, campaign and recipient, and becomes an event
(Bounce, Complaint, Unsubscribe, AutoReply). What cannot be parsed is kept as a
file for an operator and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mta.bounce import parse_bounce
from mta.bounce.model import BounceResult
from mta.bounce.verp import decode_return_path, make_return_path
from mta.config import Config
from mta.queue.outcome import RcptResult, all_recipients
from mta.queue.scheduler import Item
from mta.queue.spool import Spool

log = logging.getLogger("mta.inbound")

EVENT_BY_KIND = {"hard": "Bounce", "soft": "Bounce", "complaint": "Complaint",
                 "autoreply": "AutoReply"}

# A mailbox handler takes (envelope recipient, message bytes) and returns a reply.
MailboxHandler = Callable[[str, bytes], Awaitable[tuple[int, str]]]


def verp_secret(cfg: Config, spool: Spool) -> bytes:
    """[bounce] verp_secret, or the spool's own random key when it is empty."""
    return cfg.bounce.verp_secret.encode() or spool.secret("verp")


def verp_transform(cfg: Config, secret: bytes) -> Callable[[Item, str, bytes], tuple[str, bytes]]:
    """Outgoing mail's return path names the message and its (first) recipient.

    One transaction carries every recipient of a domain, so a job with several
    recipients is named by its first; the bounce's own text names the failed one.
    """
    prefix, domain = cfg.bounce.verp_prefix, cfg.bounce.domain

    def transform(item: Item, sender: str, data: bytes) -> tuple[str, bytes]:
        if not sender:
            return sender, data  # DSNs and notices keep the null sender
        rcpts = all_recipients(item.job)
        first = rcpts[0] if rcpts else item.message["rcpts"][0]
        index = item.message["rcpts"].index(first) if first in item.message["rcpts"] else 0
        return make_return_path(secret, prefix, domain, item.message["id"], first, index), data

    return transform


class InboundHandler:
    """Processes the items the deliverer routes to the engine's own domains."""

    def __init__(self, cfg: Config, spool: Spool, emit: Callable[[dict[str, Any]], None],
                 complete: Callable[[Item, list[RcptResult]], Awaitable[Any]],
                 secret: bytes) -> None:
        self.cfg = cfg
        self.spool = spool
        self.emit = emit
        self.complete = complete
        self.secret = secret  # of the VERP tokens (`verp_secret`)
        self.unparsed_dir = Path(cfg.bounce.unparsed_dir)
        self.mailboxes: dict[str, MailboxHandler] = {}  # local-part prefix -> handler
        self.unparsed = 0

    async def __call__(self, item: Item) -> None:
        results = []
        for rcpt in all_recipients(item.job):
            handler = self.mailboxes.get(rcpt.split("@")[0].split("+")[0].lower())
            if handler is not None:
                code, text = await handler(rcpt, item.message["data"])
            else:
                code, text = self.process_report(rcpt, item.message)
            results.append(RcptResult(rcpt, code, text, "2.0.0" if code < 300 else "5.0.0"))
        await self.complete(item, results)

    def process_report(self, rcpt: str, message: dict[str, Any]) -> tuple[int, str]:
        """A bounce, ARF report or auto-reply sent to `rcpt`: one event per recipient named."""
        result = parse_bounce(message["data"], self.secret)
        if result.kind == "unknown":
            self._keep_unparsed(message)
            self.emit({"type": "Unparsed", "id": message["id"], "to": rcpt,
                       "sender": message["from"]})
            return 250, "kept for an operator: not a recognisable report"
        for event in self.events(rcpt, result):
            self.emit(event)
        return 250, f"processed as {result.kind}"

    def events(self, rcpt: str, result: BounceResult) -> list[dict[str, Any]]:
        original_id, verp_recipient = self._attribution(rcpt, result)
        account, campaign = self._origin(original_id)
        recipients = result.recipients or [result.recipient or verp_recipient or ""]
        kind = result.kind
        event_type = EVENT_BY_KIND[kind]
        if kind == "complaint" and (result.feedback_type or "").lower() == "opt-out":
            event_type = "Unsubscribe"
        return [{
            "type": event_type, "source": "async", "kind": kind, "reason": result.reason,
            "status": result.status, "recipient": recipient, "id": original_id,
            "account": account, "campaign": campaign or result.campaign or "",
            "feedback_type": result.feedback_type, "reply": (result.diagnostic or "")[:500],
        } for recipient in recipients if recipient]

    def _attribution(self, rcpt: str, result: BounceResult) -> tuple[str, str]:
        """(original message id, recipient) from the VERP address the report came to."""
        token = decode_return_path(self.secret, rcpt)
        if token is not None:
            return token.message_id, token.recipient or ""
        recipient = result.verp_recipient or ""
        return result.verp_message_id or "", "" if recipient.startswith("#") else recipient

    def _origin(self, message_id: str) -> tuple[str, str]:
        if not message_id:
            return "", ""
        with self.spool.read() as txn:
            origin = self.spool.sent_origin(txn, message_id)
        return origin if origin is not None else ("", "")

    def _keep_unparsed(self, message: dict[str, Any]) -> None:
        self.unparsed += 1
        try:
            self.unparsed_dir.mkdir(parents=True, exist_ok=True)
            path = self.unparsed_dir / f"{time.strftime('%Y%m%d')}-{message['id']}.eml"
            path.write_bytes(message["data"])
        except OSError as exc:
            log.warning("could not keep unparsed report %s: %s", message["id"], exc)
