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
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mta.bounce import parse_bounce
from mta.bounce.model import BounceResult
from mta.bounce.provenance import parse_networks, provenance
from mta.bounce.verp import decode_return_path, make_return_path
from mta.config import Config
from mta.delivery.deliverer import Transform
from mta.egress.counters import name_sources
from mta.queue.outcome import RcptResult
from mta.queue.scheduler import Item
from mta.queue.spool import SentOrigin, Spool
from mta.wire import without_fields

log = logging.getLogger("mta.inbound")

EVENT_BY_KIND = {"hard": "Bounce", "soft": "Bounce", "complaint": "Complaint",
                 "autoreply": "AutoReply"}

# A mailbox handler takes (envelope recipient, message bytes) and returns a reply.
MailboxHandler = Callable[[str, bytes], Awaitable[tuple[int, str]]]


def verp_secret(cfg: Config, spool: Spool) -> bytes:
    """[bounce] verp_secret, or the spool's own random key when it is empty."""
    return cfg.bounce.verp_secret.encode() or spool.secret("verp")


def verp_transform(cfg: Config, secret: bytes) -> Transform:
    """Outgoing mail's return path names the message and its (first) recipient.

    Campaign mail goes one recipient per transaction (mta.delivery.deliverer.envelopes),
    so its bounces can only ever count for the one recipient the token names; other
    mail may carry several recipients, named by the first.
    """
    prefix, domain = cfg.bounce.verp_prefix, cfg.bounce.domain
    cfbl_address = f"fbl@{cfg.bounce.fbl_domain or domain}" if cfg.bounce.cfbl else ""

    def transform(item: Item, recipients: list[str], sender: str, data: bytes
                  ) -> tuple[str, bytes]:
        if not sender:
            return sender, data  # DSNs and notices keep the null sender
        first = recipients[0] if recipients else item.message["rcpts"][0]
        index = item.message["rcpts"].index(first) if first in item.message["rcpts"] else 0
        return_path = make_return_path(secret, prefix, domain, item.message["id"], first, index)
        if cfbl_address and item.message.get("campaign"):
            data = with_cfbl(data, cfbl_address, return_path.split("@")[0].split("+", 1)[1])
        return return_path, data

    return transform


def with_cfbl(data: bytes, address: str, token: str) -> bytes:
    """RFC 9477 fields (replacing any the message brought): where complaints go, and the
    token a feedback loop quotes back (it proves the message and recipient)."""
    fields = f"CFBL-Address: {address}; report=arf\r\nCFBL-Feedback-ID: {token}\r\n"
    return fields.encode("ascii") + without_fields(data, "CFBL-Address", "CFBL-Feedback-ID")


def unverified_event(rcpt: str, result: BounceResult, client: str) -> dict[str, Any]:
    """A report that proves nothing: shown to operators, never counted (no "source")."""
    return {"type": "UnverifiedFeedback", "kind": result.kind, "reason": result.reason,
            "status": result.status, "to": rcpt, "client": client,
            "claimed": result.recipients[:10], "campaign": (result.campaign or "")[:200],
            "feedback_type": result.feedback_type}


class InboundHandler:
    """Processes the items the deliverer routes to the engine's own domains."""

    def __init__(self, cfg: Config, spool: Spool, emit: Callable[[dict[str, Any]], None],
                 complete: Callable[[Item, list[RcptResult]], Awaitable[Any]],
                 secret: bytes, mailboxes: dict[str, MailboxHandler] | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.emit = emit
        self.complete = complete
        self.secret = secret  # of the VERP tokens (`verp_secret`)
        self.unparsed_dir = Path(cfg.bounce.unparsed_dir)
        self.sources = parse_networks(cfg.bounce.feedback_sources)
        self.mailboxes = mailboxes or {}  # local-part prefix -> handler
        self.unparsed = 0
        self._unparsed_bytes: int | None = None  # in unparsed_dir, counted at first use

    async def __call__(self, item: Item) -> None:
        results = []
        for rcpt in item.job.waiting():
            handler = self.mailboxes.get(rcpt.split("@")[0].split("+")[0].lower())
            if handler is not None:
                code, text = await handler(rcpt, item.message["data"])
            else:
                code, text = self.process_report(rcpt, item.message)
            results.append(RcptResult(rcpt, code, text, "2.0.0" if code < 300 else "5.0.0"))
        await self.complete(item, results)

    def process_report(self, rcpt: str, message: dict[str, Any]) -> tuple[int, str]:
        """A bounce, ARF report or auto-reply sent to `rcpt`: an event per recipient it
        proves (mta.bounce.provenance), or one UnverifiedFeedback event."""
        result = parse_bounce(message["data"], self.secret)
        if result.kind == "unknown":
            kept = self._keep_unparsed(message)
            self.emit({"type": "Unparsed", "id": message["id"], "to": rcpt,
                       "sender": message["from"], "kept": kept})
            return 250, "kept for an operator: not a recognisable report"
        for event in self.events(rcpt, result, str(message.get("client") or "")):
            self.emit(event)
        return 250, f"processed as {result.kind}"

    def events(self, rcpt: str, result: BounceResult, client: str = "") -> list[dict[str, Any]]:
        if result.kind == "autoreply":  # nothing is counted for it
            return [self._event("AutoReply", result, result.recipient or "", "", "", "")]
        claimed = self._claimed_id(rcpt, result)
        origin = self._origin(claimed)
        proof = provenance(result, rcpt, self.secret, client, self.sources,
                           origin.recipients if origin else None)
        if proof is None or not proof.recipients:
            return [unverified_event(rcpt, result, client)]
        if proof.message_id != claimed:  # proved by another path than the claim: its record
            origin = self._origin(proof.message_id)
        account, campaign = (origin.account, origin.campaign) if origin else ("", "")
        event_type = EVENT_BY_KIND[result.kind]
        if result.kind == "complaint" and (result.feedback_type or "").lower() == "opt-out":
            event_type = "Unsubscribe"
        events = [self._event(event_type, result, recipient, proof.message_id, account,
                              campaign or result.campaign or "", str(proof.proof))
                  for recipient in proof.recipients]
        return name_sources(events, origin.sources if origin else {})

    @staticmethod
    def _event(event_type: str, result: BounceResult, recipient: str, message_id: str,
               account: str, campaign: str, proof: str = "") -> dict[str, Any]:
        return {"type": event_type, "source": "async", "kind": result.kind,
                "reason": result.reason, "status": result.status, "recipient": recipient,
                "id": message_id, "account": account, "campaign": campaign,
                "feedback_type": result.feedback_type, "proof": proof,
                "reply": (result.diagnostic or "")[:500]}

    def _claimed_id(self, rcpt: str, result: BounceResult) -> str:
        """The message a report names (proved or not): to find its recipients by index."""
        token = decode_return_path(self.secret, rcpt)
        return token.message_id if token is not None else result.verp_message_id or ""

    def _origin(self, message_id: str) -> SentOrigin | None:
        if not message_id:
            return None
        with self.spool.read() as txn:
            return self.spool.sent_origin(txn, message_id)

    def _keep_unparsed(self, message: dict[str, Any]) -> bool:
        """Keep the report for an operator (mode 0600), within `[bounce] unparsed_quota`;
        False when it was not kept."""
        self.unparsed += 1
        data = message["data"]
        try:
            self.unparsed_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._unparsed_bytes is None:
                self._unparsed_bytes = sum(p.stat().st_size for p in self.unparsed_dir.iterdir())
            if self._unparsed_bytes + len(data) > self.cfg.bounce.unparsed_quota:
                log.warning("unparsed report %s not kept: %s is over its quota of %d bytes",
                            message["id"], self.unparsed_dir, self.cfg.bounce.unparsed_quota)
                return False
            path = self.unparsed_dir / f"{time.strftime('%Y%m%d')}-{message['id']}.eml"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        except OSError as exc:
            log.warning("could not keep unparsed report %s: %s", message["id"], exc)
            return False
        self._unparsed_bytes += len(data)
        return True
