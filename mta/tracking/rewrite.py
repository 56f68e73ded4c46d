"""The tracking transform: links rewritten to signed redirects and an open pixel added.

Runs at delivery after the policy transform (footer, visible unsubscribe link,
List-Unsubscribe) and before DKIM signing, on campaign mail (one recipient per
transaction, so each token names its recipient). The MIME walk, decoding and
re-encoding are the footer's (mta.policy.footer): structure, transfer encodings and
charsets are kept. Every ``http(s)`` link of the inline text and HTML parts becomes
``<public_url>/c/<token>`` except the unsubscribe link (and mailto: and anything else
that is not http(s)); the same URL gets the same index in every part. The first HTML
part also gets the pixel ``<public_url>/o/<token>.gif`` and, if configured, a hidden link
only a bot follows. The per-campaign header (`[tracking] header`: "off", "opens" or
"clicks") is read and removed from every message, tracked or not.
"""

from __future__ import annotations

import html
import logging
import re
import time
from collections import Counter
from typing import Any

from mta.config import Config
from mta.policy.footer import parse, replace_body, serialize, text_bodies, with_html_footer
from mta.policy.mimeparts import Leaf, change_text_parts
from mta.queue.scheduler import Item
from mta.tracking.tokens import CLICK, HIDDEN, OPEN, TrackTarget, make_token
from mta.wire import take_fields

log = logging.getLogger("mta.tracking")

_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(?:"([^"]*)"|'([^']*)')""", re.I)
_TEXT_URL = re.compile(r"""https?://[^\s<>"'`{}|\\^\[\]]+""", re.I)
_TRAILING = ".,;:!?)"
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def text_urls(body: str) -> list[str]:
    """What `_TEXT_URL.finditer` finds, found from each "://" instead: a case-insensitive
    pattern has no literal prefix to skip ahead by, and tried at every character of a
    4 KB body it cost more than the rest of the tracking."""
    found: list[str] = []
    taken = 0  # matches do not overlap: none starts before the end of the last
    at = body.find("://")
    while at >= 0:
        for start in (at - 5, at - 4):
            if start >= taken and body[start:at].lower() in ("https", "http"):
                match = _TEXT_URL.match(body, start)
                if match:
                    found.append(match.group(0))
                    taken = match.end()
                break
        at = body.find("://", max(at + 3, taken))
    return found


def base_url(public_url: str, path: str) -> str:
    return f"{public_url.rstrip('/')}/{path.strip('/')}/"


def take_header(data: bytes, name: str) -> tuple[bytes, str | None]:
    """The message without the per-campaign tracking header, and its (first) value
    (None: none)."""
    data, values = take_fields(data, name)
    return data, values[0].decode("latin-1").strip().lower() if values else None


class TrackingTransform:
    def __init__(self, cfg: Config, secret: bytes, counts: Counter[str] | None = None) -> None:
        self.tc = cfg.tracking
        self.secret = secret
        self.counts = counts if counts is not None else Counter()
        self.click_base = base_url(cfg.http.public_url, self.tc.click_path)
        self.open_base = base_url(cfg.http.public_url, self.tc.open_path)
        self.skip = (base_url(cfg.http.public_url, cfg.policy.unsubscribe_path),
                     self.click_base, self.open_base)
        self.off = {a.name for a in cfg.accounts if not a.tracking}

    def __call__(self, item: Item, recipients: list[str], sender: str, data: bytes
                 ) -> tuple[str, bytes]:
        wanted = None
        if self.tc.header:
            data, wanted = take_header(data, self.tc.header)
        message = item.message
        account, campaign = message.get("account", ""), message.get("campaign", "")
        if (not sender or message.get("notice") or message.get("dsn_for") or not campaign
                or len(recipients) != 1 or account in self.off):
            return sender, data
        opens, clicks = self.tc.opens, self.tc.clicks
        if wanted is not None:
            opens = opens and wanted in ("opens", "on", "yes", "true", "1")
            clicks = clicks and wanted in ("clicks", "on", "yes", "true", "1")
        if not (opens or clicks):
            return sender, data
        try:
            out = self.rewrite(data, message, recipients[0], opens, clicks)
        except Exception:
            log.exception("tracking not added to %s", message.get("id"))
            return sender, data
        self.counts["tracked"] += out is not data
        return sender, out

    # --- rewriting ---------------------------------------------------------------------

    def trackable(self, url: str) -> bool:
        return (url[:8].lower().startswith(("http://", "https://"))
                and not url.startswith(self.skip) and "{{" not in url
                and not _UNSAFE.search(url))

    def rewrite(self, data: bytes, message: dict[str, Any], recipient: str, opens: bool,
                clicks: bool) -> bytes:
        links: dict[str, int] = {}
        kinds: set[str] = set()

        def collect(leaf: Leaf, body: str, ordinal: int) -> None:
            kinds.add(leaf.ctype)
            for url in self._urls(leaf.ctype, body):
                links.setdefault(url, len(links))

        if clicks:
            if change_text_parts(data, collect) is None:
                return self.rewrite_parsed(data, message, recipient, opens, clicks)
            if not links and "text/html" not in kinds:
                return data  # plain text without links: nothing to change
        target = self._target(message, recipient, len(links))
        tokens = {url: self._url(target, CLICK, i, url) for url, i in links.items()}

        def change(leaf: Leaf, body: str, ordinal: int) -> str:
            if leaf.ctype != "text/html":
                return self._text(body, tokens)
            new = self._html(body, tokens)
            return with_html_footer(new, self._extras(target, opens, clicks)) if ordinal == 0 else new

        out = change_text_parts(data, change)
        if out is None:
            return self.rewrite_parsed(data, message, recipient, opens, clicks)
        return out

    def _target(self, message: dict[str, Any], recipient: str, links: int) -> TrackTarget:
        return TrackTarget(CLICK, message.get("account", ""), message.get("campaign", ""),
                           str(message.get("id", "")), recipient, int(time.time()), links, 0, "")

    def rewrite_parsed(self, data: bytes, message: dict[str, Any], recipient: str,
                       opens: bool, clicks: bool) -> bytes:
        """The same with the email package, for messages the fast path leaves alone."""
        parsed = parse(data)
        bodies = text_bodies(parsed)
        links: dict[str, int] = {}
        if clicks:
            for part, body in bodies:
                for url in self._urls(part.get_content_type(), body):
                    links.setdefault(url, len(links))
        target = self._target(message, recipient, len(links))
        tokens = {url: self._url(target, CLICK, i, url) for url, i in links.items()}
        first_html = True
        changed = False
        for part, body in bodies:
            is_html = part.get_content_type() == "text/html"
            new = self._html(body, tokens) if is_html else self._text(body, tokens)
            if is_html and first_html:
                first_html = False
                new = with_html_footer(new, self._extras(target, opens, clicks))
            if new != body:
                replace_body(part, new)
                changed = True
        return serialize(parsed) if changed else data

    def _urls(self, ctype: str, body: str) -> list[str]:
        if ctype == "text/html":
            found = (html.unescape(m.group(2) if m.group(2) is not None else m.group(3)).strip()
                     for m in _HREF.finditer(body))
        else:
            found = (url.rstrip(_TRAILING) for url in text_urls(body))
        return [url for url in found if self.trackable(url)]

    def _url(self, target: TrackTarget, kind: str, index: int, url: str) -> str:
        token = make_token(self.secret, TrackTarget(
            kind, target.account, target.campaign, target.message, target.recipient,
            target.sent_at, target.links, index, url))
        if kind == OPEN:
            return f"{self.open_base}{token}.gif"
        return f"{self.click_base}{token}"

    def _html(self, body: str, tokens: dict[str, str]) -> str:
        if not tokens:
            return body

        def swap(m: re.Match[str]) -> str:
            raw = m.group(2) if m.group(2) is not None else m.group(3)
            new = tokens.get(html.unescape(raw).strip())
            return m.group(0) if new is None else f'{m.group(1)}"{new}"'

        return _HREF.sub(swap, body)

    def _text(self, body: str, tokens: dict[str, str]) -> str:
        if not tokens:
            return body

        def swap(m: re.Match[str]) -> str:
            whole = m.group(0)
            url = whole.rstrip(_TRAILING)
            new = tokens.get(url)
            return whole if new is None else new + whole[len(url):]

        return _TEXT_URL.sub(swap, body)

    def _extras(self, target: TrackTarget, opens: bool, clicks: bool) -> str:
        extra = ""
        if clicks and self.tc.hidden_link:
            extra += (f'<a href="{self._url(target, CLICK, HIDDEN, "")}" style="display:none" '
                      'aria-hidden="true" tabindex="-1"></a>')
        if opens:
            extra += (f'<img src="{self._url(target, OPEN, -1, "")}" width="1" height="1" '
                      'alt="" style="border:0;width:1px;height:1px">')
        return extra
