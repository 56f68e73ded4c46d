"""Unsubscribes: one-click (RFC 8058) and the List-Unsubscribe mailto.

A valid signed token names the account, campaign and recipient: that recipient, and
nobody else, is unsubscribed (the mailto path never takes the address from the mail's
From:, which anyone can write). The address is suppressed for the account and counts
toward the campaign's rate once; it is written (and judged) before the caller answers.
"""

from __future__ import annotations

import email.policy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Any

from mta.policy.counting import Counting
from mta.policy.ledger import Batch, Outcome
from mta.policy.model import normalize_address
from mta.policy.tokens import UnsubscribeTarget, find_token, read_token


class InvalidUnsubscribe(ValueError):
    """A forged, altered or malformed unsubscribe token."""


@dataclass(frozen=True)
class UnsubscribeResult:
    account: str
    campaign: str
    recipient: str
    counted: bool  # False: this address had already unsubscribed from this campaign


class Unsubscribes:
    def __init__(self, secret: bytes, counting: Counting, counts: Counter[str],
                 emit: Callable[[dict[str, Any]], None]) -> None:
        self.secret = secret
        self.counting = counting
        self.counts = counts
        self.emit = emit

    def read_token(self, token: str) -> UnsubscribeTarget:
        target = read_token(self.secret, token)
        if target is None:
            self.counts["forged_tokens"] += 1
            raise InvalidUnsubscribe("this unsubscribe link is not valid")
        return target

    async def unsubscribe(self, token: str, via: str = "one-click") -> UnsubscribeResult:
        """Record an unsubscribe: suppress the address, count it toward the campaign's rate.

        Raises InvalidUnsubscribe for a forged, altered or malformed token. Durable when
        it returns (the HTTP endpoint answers after this).
        """
        target = self.read_token(token)
        address = normalize_address(target.recipient)
        await self.counting.flush()  # judge against everything counted so far
        batch = Batch(outcomes=[Outcome("unsubscribe", target.account, target.campaign,
                                        address, False, via)])
        applied = await self.counting.apply(batch, lambda applied: [{
            "type": "Unsubscribe", "account": target.account, "campaign": target.campaign,
            "recipient": address, "via": via, "counted": applied.counted > 0}])
        counted = applied.counted > 0
        self.counts["unsubscribes"] += counted
        self.emit(applied.events[0])  # recorded with the unsubscribe (the event outbox)
        await self.counting.announce(applied)
        return UnsubscribeResult(target.account, target.campaign, address, counted)

    async def unsubscribe_mail(self, subject: str, rcpt_to: str = "") -> UnsubscribeResult:
        """A mail to the List-Unsubscribe mailto: the token is in its subject (or in the
        local part after '+'), and names the recipient."""
        token = find_token(subject) or find_token(rcpt_to.partition("@")[0].partition("+")[2])
        if token is None:
            self.counts["forged_tokens"] += 1
            raise InvalidUnsubscribe("no unsubscribe token in this mail")
        return await self.unsubscribe(token, via="mailto")

    async def mailbox(self, rcpt: str, data: bytes) -> tuple[int, str]:
        """The inbound handler of the List-Unsubscribe mailto (`[policy] unsubscribe_mailbox`).
        Answers 250 even to a bad request (no backscatter)."""
        headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        try:
            result = await self.unsubscribe_mail(str(headers.get("Subject", "")), rcpt)
        except InvalidUnsubscribe as exc:
            return 250, f"2.0.0 ignored: {exc}"
        return 250, f"2.0.0 {result.recipient} unsubscribed"
