"""The contract's changes to every outgoing message, made before DKIM signing.

The footer ("Email Marketing by ...", not for PRO accounts) and, for campaign mail,
a visible unsubscribe link in the text and HTML parts (every plan, PRO included: in place
of the customer's placeholder, else appended to the footer) and List-Unsubscribe with
the same signed one-click link (RFC 8058). The engine's own mail (DSNs,
pause notices) and mail with a null sender pass unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from mta.config import AccountConfig, PolicyConfig
from mta.policy.footer import UnsubscribeLink, add_footer
from mta.policy.headers import HeaderInjection, Unsubscriber, set_list_unsubscribe
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
        branded = config is not None and config.plan != "pro" and bool(self.pc.footer_text)
        fields, link = b"", None
        if campaign and len(recipients) == 1:  # campaign mail goes one recipient at a time
            try:
                token = self.unsubscriber.token(account, campaign, recipients[0])
                fields = self.unsubscriber.token_fields(token)
                link = UnsubscribeLink(self.unsubscriber.url(token),
                                       self.pc.unsubscribe_placeholder,
                                       self.pc.unsubscribe_label)
            except HeaderInjection:
                log.error("no unsubscribe link for %s: unsafe header value", message.get("id"))
        if branded or link is not None:
            data = self._with_footer(message, data, self.pc.footer_text if branded else "",
                                     link)
        if fields:
            data = set_list_unsubscribe(data, fields)
            self.counts["list_unsubscribe"] += 1
        return sender, data

    def _with_footer(self, message: dict[str, Any], data: bytes, text: str,
                     link: UnsubscribeLink | None) -> bytes:
        try:
            out = add_footer(data, text, self.pc.footer_html if text else "", link)
        except Exception:
            log.exception("footer not added to %s", message.get("id"))
            return data
        changed = out is not data
        self.counts["footers"] += changed and bool(text)
        self.counts["unsubscribe_links"] += changed and link is not None
        return out
