"""Whether a report proves where it came from, and for which recipient.

Feedback counts against an account only when it proves it concerns mail the engine
sent: a valid VERP token (the envelope recipient the report was sent to, the quoted
original's Return-Path, or the original's CFBL-Feedback-ID header, RFC 9477) binds
one message and one recipient, and the report's own recipient list can never widen
that; or, for complaints, it arrived from a feedback-loop source the operator
configured (`[bounce] feedback_sources`). Anything else is unverified: kept and shown,
never acted on. Plain functions, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from mta.bounce.model import BounceResult
from mta.bounce.verp import VerpToken, decode_return_path, decode_token

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Proof(StrEnum):
    ENVELOPE = "verp"  # the report was sent to a VERP return path
    QUOTED = "verp-quoted"  # the quoted original carries one (Return-Path, CFBL-Feedback-ID)
    SOURCE = "feedback-source"  # a configured feedback loop sent it


@dataclass(frozen=True)
class Provenance:
    proof: Proof
    message_id: str  # "" when a trusted source names no message of ours
    recipients: list[str]  # what the report may count for


def parse_networks(networks: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(n.strip(), strict=False) for n in networks]


def from_source(client: str, sources: list[Network]) -> bool:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in network for network in sources)


def provenance(result: BounceResult, envelope_rcpt: str, secret: bytes, client: str,
               sources: list[Network], sent_recipients: list[str] | None = None
               ) -> Provenance | None:
    """What the report proves, or None (unverified).

    `sent_recipients`: the original message's envelope recipients when the spool still
    knows them, to resolve a token that names a recipient by its index.
    """
    token = decode_return_path(secret, envelope_rcpt)
    how = Proof.ENVELOPE
    if token is None and result.verp_feedback_id:
        token, how = decode_token(secret, result.verp_feedback_id), Proof.QUOTED
    if token is None and result.verp_message_id:
        token = _quoted(result)
        how = Proof.QUOTED
    if token is not None:
        recipient = _recipient(token, sent_recipients or [])
        return Provenance(how, token.message_id, [recipient] if recipient else [])
    if result.kind == "complaint" and from_source(client, sources):
        return Provenance(Proof.SOURCE, "", list(result.recipients))
    return None


def _quoted(result: BounceResult) -> VerpToken | None:
    """The token parse_bounce verified in the quoted original's return path."""
    recipient = result.verp_recipient or ""
    if recipient.startswith("#"):
        return VerpToken(result.verp_message_id or "", None, int(recipient[1:]))
    return VerpToken(result.verp_message_id or "", recipient or None, None)


def _recipient(token: VerpToken, sent_recipients: list[str]) -> str:
    if token.recipient is not None:
        return token.recipient
    index = token.recipient_index
    if index is not None and 0 <= index < len(sent_recipients):
        return sent_recipients[index].lower()
    return ""
