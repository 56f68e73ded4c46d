"""The contract's changes to every outgoing message, made before DKIM signing.

The footer ("Email Marketing by ...", not for PRO accounts) and, for campaign mail,
List-Unsubscribe with a signed one-click link (RFC 8058). The engine's own mail (DSNs,
pause notices) and mail with a null sender pass unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from mta.config import AccountConfig, PolicyConfig
from mta.policy.footer import add_footer
from mta.policy.headers import HeaderInjection, Unsubscriber
from mta.queue.scheduler import Item

log = logging.getLogger("mta.policy")


class PolicyTransform:
    def __init__(self, pc: PolicyConfig, accounts: dict[str, AccountConfig],
                 unsubscriber: Unsubscriber, counts: Counter[str]) -> None:
        self.pc = pc
        self.accounts = accounts
        self.unsubscriber = unsubscriber
        self.counts = counts

    def __call__(self, item: Item, recipients: list[str], sender: str, data: bytes
                 ) -> tuple[str, bytes]:
        message = item.message
        if not sender or message.get("notice") or message.get("dsn_for"):
            return sender, data
        account, campaign = message.get("account", ""), message.get("campaign", "")
        config = self.accounts.get(account)
        if config is not None and config.plan != "pro" and self.pc.footer_text:
            data = self._with_footer(message, data)
        if campaign and len(recipients) == 1:  # campaign mail goes one recipient at a time
            data = self._with_unsubscribe(item, data, account, campaign, recipients[0])
        return sender, data

    def _with_footer(self, message: dict[str, Any], data: bytes) -> bytes:
        try:
            out = add_footer(data, self.pc.footer_text, self.pc.footer_html)
        except Exception:
            log.exception("footer not added to %s", message.get("id"))
            return data
        self.counts["footers"] += out is not data
        return out

    def _with_unsubscribe(self, item: Item, data: bytes, account: str, campaign: str,
                          recipient: str) -> bytes:
        try:
            data = self.unsubscriber.apply(data, account, campaign, recipient)
        except HeaderInjection:
            log.error("no List-Unsubscribe for %s: unsafe header value", item.message.get("id"))
            return data
        self.counts["list_unsubscribe"] += 1
        return data
