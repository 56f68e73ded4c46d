"""What the big mailbox providers mean by their own error texts.

Some wordings are only conclusive when a given provider said them: Yahoo's
"dd This user doesn't have a ... account" comes after DATA yet names an
unknown mailbox. The provider is recognised by the remote MTA's host name;
Gmail's help-page keys (``?p=NoSuchUser``) and Microsoft's numbered
enhanced codes identify themselves.
"""

from __future__ import annotations

import re

from mta.bounce.model import Delivery
from mta.bounce.rules import normalize

_HOST_PATTERNS = (
    re.compile(r"while talking to ([\w.-]+\.[a-z]{2,})", re.I),
    re.compile(r"\bhost ([\w.-]+\.[a-z]{2,}) ?\[", re.I),
    re.compile(r"\bremote host ([\w.-]+\.[a-z]{2,})", re.I),
    re.compile(r"\bRemote-MTA:\s*dns;\s*([\w.-]+\.[a-z]{2,})", re.I),
)

_YAHOO_HOSTS = (".yahoodns.net", ".yahoo.com", ".yahoo.co.jp", ".aol.com")
_YAHOO = (
    ("yahoo requires all senders to authenticate with either spf or dkim", "authfailure"),
    (" because the ip is in spamhaus's list;", "blocked"),
    ("not accepted from ip addresses on spamhaus xbl", "blocked"),
    ("relaying denied for ", "norelaying"),
    ("headers are not rfc compliant", "notcompliantrfc"),
    ("not accepted for policy reasons", "policyviolation"),
    ("temporarily deferred due to unexpected volume or user complaints", "rejected"),
    (" will be permanently deferred", "rejected"),
    ("user is receiving mail too quickly", "toomanyconn"),
    (" is no longer valid.", "suspend"),
    ("this mailbox is disabled", "suspend"),
    ("max message per connection reached", "toomanyconn"),
    ("dd this user doesn't have a ", "userunknown"),
    ("mailbox not found", "userunknown"),
)

# Gmail names the help page of each rejection: https://support.google.com/mail/?p=<Key>
_GMAIL_KEYS = {
    "nosuchuser": "userunknown",
    "disableduser": "suspend",
    "overquotatemp": "mailboxfull",
    "overquotaperm": "mailboxfull",
    "rfcmessagenoncompliant": "notcompliantrfc",
    "dmarcrejection": "authfailure",
    "senderauthentication": "authfailure",
    "unsolicitedmessageerror": "spamdetected",
    "unsolicitediperror": "blocked",
    "unsolicitedratelimiterror": "toomanyconn",
    "receivingratelimit": "toomanyconn",
    "ipv6authrequired": "requireptr",
    "maxsizeerror": "mesgtoobig",
    "toomanyrecipients": "toomanyconn",
}
_GMAIL_KEY_RE = re.compile(r"support\.google\.com/mail/(?:answer/\d+)?\?p=([A-Za-z0-9]+)")

_MICROSOFT_HOSTS = (".protection.outlook.com", ".prod.outlook.com", ".outlook.com", ".hotmail.com")
# (enhanced code or prefix, low, high, phrase) -> reason; low/high bound the last number.
_MICROSOFT: tuple[tuple[str, int, int, str, str], ...] = (
    ("5.7.", 606, 649, "banned sending ip", "blocked"),
    ("4.7.", 500, 899, "please try again later", "blocked"),
    ("5.7.", 509, 509, "does not pass dmarc verification", "authfailure"),
    ("5.7.", 515, 515, "required authentication level", "authfailure"),
    ("5.7.", 23, 23, "sender policy framework violation", "authfailure"),
    ("5.4.", 1, 1, "recipient address rejected: access denied", "userunknown"),
    ("5.1.", 10, 10, "recipientnotfound", "userunknown"),
    ("5.4.", 300, 316, "message expired", "expired"),
    ("5.2.", 3, 3, "recipsizelimit", "mesgtoobig"),
)


def remote_host(d: Delivery, report: str) -> str:
    if d.remote_host:
        return d.remote_host.lower().rstrip(".")
    for text in (d.diagnosis, report):
        for pattern in _HOST_PATTERNS:
            found = pattern.search(text or "")
            if found:
                return found.group(1).lower().rstrip(".")
    return ""


def provider_reason(d: Delivery, host: str) -> str:
    """A reason the provider's own wording settles, or ''."""
    text = normalize(d.diagnosis)
    if not text:
        return ""
    gmail = _GMAIL_KEY_RE.search(d.diagnosis)
    if gmail and gmail.group(1).lower() in _GMAIL_KEYS:
        return _GMAIL_KEYS[gmail.group(1).lower()]
    dotted = "." + host
    if dotted.endswith(_YAHOO_HOSTS):
        return next((reason for phrase, reason in _YAHOO if phrase in text), "")
    if dotted.endswith(_MICROSOFT_HOSTS) or "outlook.com" in text:
        return _microsoft(d.status, text)
    return ""


def _microsoft(status: str, text: str) -> str:
    for prefix, low, high, phrase, reason in _MICROSOFT:
        if not status.startswith(prefix) or phrase not in text:
            continue
        try:
            number = int(status.rsplit(".", 1)[1])
        except ValueError:
            continue
        if low <= number <= high:
            return reason
    return ""
