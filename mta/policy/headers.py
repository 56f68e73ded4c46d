"""List-Unsubscribe (RFC 2369) and one-click List-Unsubscribe-Post (RFC 8058) headers.

The engine's own fields replace any the message brought, so each outgoing campaign
message has exactly one of each, and the DKIM signature made afterwards covers them.
Header values are built from tokens and configuration only, and anything holding CR,
LF or NUL is refused (`HeaderInjection`), never written.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from mta.policy.tokens import make_token
from mta.wire import without_fields

ONE_CLICK = "List-Unsubscribe=One-Click"
_FORBIDDEN = re.compile(r"[\r\n\0]")
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")  # what quote() leaves as it is


class HeaderInjection(ValueError):
    """A header value would carry CR, LF or NUL."""


def safe_value(value: str) -> str:
    if _FORBIDDEN.search(value):
        raise HeaderInjection(f"refusing a header value with CR, LF or NUL: {value[:60]!r}")
    return value


def unsubscribe_url(base_url: str, path: str, token: str) -> str:
    return safe_value(f"{base_url.rstrip('/')}/{path.strip('/')}/{token}")


def unsubscribe_mailto(mailbox: str, domain: str, token: str) -> str:
    quoted = token if _URL_SAFE.fullmatch(token) else quote(token)  # tokens are URL-safe
    return safe_value(f"mailto:{mailbox}@{domain}?subject=unsubscribe%20{quoted}")


def header_fields(url: str, mailto: str) -> bytes:
    """The two fields, folded between the URIs, CRLF-terminated."""
    value = f"<{safe_value(url)}>,\r\n <{safe_value(mailto)}>"
    return (f"List-Unsubscribe: {value}\r\nList-Unsubscribe-Post: {ONE_CLICK}\r\n"
            ).encode("ascii")


def set_list_unsubscribe(data: bytes, fields: bytes) -> bytes:
    """The message with its List-Unsubscribe fields replaced by `fields` (at the top)."""
    return fields + without_fields(data, "List-Unsubscribe", "List-Unsubscribe-Post")


class Unsubscriber:
    """Builds the fields for one recipient of one campaign."""

    def __init__(self, secret: bytes, base_url: str, path: str, mailbox: str,
                 domain: str) -> None:
        self.secret = secret
        self.base_url = safe_value(base_url)
        self.path = safe_value(path)
        self.mailbox = safe_value(mailbox)
        self.domain = safe_value(domain)

    def token(self, account: str, campaign: str, recipient: str) -> str:
        return make_token(self.secret, account, campaign, recipient)

    def url(self, token: str) -> str:
        """The one-click URL of a token (the visible link in the body uses it too)."""
        return unsubscribe_url(self.base_url, self.path, token)

    def fields(self, account: str, campaign: str, recipient: str) -> bytes:
        return self.token_fields(self.token(account, campaign, recipient))

    def token_fields(self, token: str) -> bytes:
        return header_fields(self.url(token),
                             unsubscribe_mailto(self.mailbox, self.domain, token))

    def apply(self, data: bytes, account: str, campaign: str, recipient: str) -> bytes:
        return set_list_unsubscribe(data, self.fields(account, campaign, recipient))
