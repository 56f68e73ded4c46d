"""One injection request, from its body to the reply: through intake like SMTP mail.

`Injector.inject(client, body)`:

1. the request read and checked (`parse_request`: 400, 413), its templates compiled and
   every recipient's message built (`mta.inject.build`: 422, 413): nothing is stored
   unless every message could be built;
2. intake's own checks, as for an SMTP transaction from the same account: MAIL FROM
   (`Intake.check_mail`), each recipient (`Intake.check_rcpt`), each message
   (`Intake.prepare`: its campaign field and From: domains, the policy guard's
   admission); a recipient refused there is in `failed_recipients` with the reply SMTP
   would have given;
3. every accepted message stored in one spool transaction, one fsync
   (`Intake.store`), before the reply.

The reply is KumoMTA's: `{"success_count", "fail_count", "failed_recipients",
"errors"}`, `errors[i]` the reply (code, enhanced status, reason) for
`failed_recipients[i]`. Storage trouble (4.3.x) stores nothing and is a 503.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from mta.address import Address
from mta.inject.build import Built, Settings, build_each, make_builder
from mta.inject.request import InjectRequest, Limits, parse_request
from mta.queue.spool import NewMessage
from mta.smtp.intake import Intake
from mta.smtp.session import Client, Envelope

YIELD_EVERY = 64  # recipients handled between two chances for the event loop's other work
PROTOCOL = "HTTP"  # the Received header's "with" (plus S and A, as for SMTP)
_SYSTEM = re.compile(r"4\d\d 4\.3\.")  # mail system status (RFC 3463): the spool's trouble


@dataclass
class Outcome:
    """The reply to one request."""

    stored: list[tuple[str, NewMessage]] = field(default_factory=list)  # (recipient, message)
    failed_recipients: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def fail(self, recipient: str, reply: str) -> None:
        self.failed_recipients.append(recipient)
        self.errors.append(reply)

    @property
    def status(self) -> int:
        """200; 503 when the engine's own trouble (4.3.x: no room, storage too slow) kept
        everything out: the request may be sent again as it is."""
        trouble = any(_SYSTEM.match(reply) for reply in self.errors)
        return 503 if trouble and not self.stored else 200

    def as_json(self) -> dict[str, Any]:
        return {"success_count": len(self.stored), "fail_count": len(self.failed_recipients),
                "failed_recipients": self.failed_recipients, "errors": self.errors}


class Injector:
    def __init__(self, intake: Intake, limits: Limits, settings: Settings) -> None:
        self.intake = intake
        self.limits = limits
        self.settings = settings

    async def inject(self, client: Client, body: bytes) -> Outcome:
        """The request in `body` from `client` (logged in as its account) handled; raises
        BadRequest when it is refused as a whole (nothing stored)."""
        request = parse_request(body, self.limits)
        sender = request.envelope_sender
        built = await self._build(request)
        outcome = Outcome()
        refusal = self.intake.check_mail(client, sender, 0)
        for n, item in enumerate(built):
            await _now_and_then(n)
            reply = refusal or await self._admit(client, sender, item, request.send_at)
            if isinstance(reply, str):
                outcome.fail(item.recipient.email, reply)
            else:
                outcome.stored.append((item.recipient.email, reply))
        await self._store(outcome)
        return outcome

    async def _build(self, request: InjectRequest) -> list[Built]:
        """Every recipient's message, or the reply refusing its address; raises
        BadRequest (422, 413) when any message cannot be built."""
        built = []
        builder = make_builder(request, self.settings)
        for n, item in enumerate(build_each(builder, request.recipients, self.settings)):
            await _now_and_then(n)
            built.append(item)
        return built

    async def _admit(self, client: Client, sender: Address, item: Built,
                     send_at: float | None = None) -> NewMessage | str:
        """Intake's checks of one recipient and its message, as in an SMTP transaction."""
        if isinstance(item.data, str) or item.address is None:
            return str(item.data)
        envelope = Envelope(str(sender), [])
        refusal = self.intake.check_rcpt(client, envelope, item.address)
        if refusal:
            return refusal
        envelope.recipients.append(str(item.address))
        return await self.intake.prepare(client, envelope, item.data, PROTOCOL, send_at)

    async def _store(self, outcome: Outcome) -> None:
        if not outcome.stored:
            return
        refusal = await self.intake.store([message for _, message in outcome.stored])
        if refusal:
            for recipient, _ in outcome.stored:
                outcome.fail(recipient, refusal)
            outcome.stored = []


async def _now_and_then(n: int) -> None:
    """Let the event loop's other work run, once every YIELD_EVERY recipients."""
    if n % YIELD_EVERY == YIELD_EVERY - 1:
        await asyncio.sleep(0)
