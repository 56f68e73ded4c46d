"""A `[[webhooks]]` endpoint as an event sink: one signed POST per batch (aiohttp client).

The body is the batch as a JSON array; `X-MTA-Signature` signs it (mta.outbox.signing).
A batch is taken only on a 2xx answer; anything else (connection error, timeout, 3xx,
4xx, 5xx) raises SinkFailed and the dispatcher retries the same batch later. Redirects
are not followed. https trusts the system's CA store and, when set, `ca_file`. The
secret is never logged nor shown; the URL is shown without its user info and query.
"""

from __future__ import annotations

import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from mta.config import WebhookConfig
from mta.outbox import codec
from mta.outbox.signing import HEADER, signature_header
from mta.outbox.sink import EventFilter, SinkFailed

USER_AGENT = "mta-webhook/1"


def shown_url(url: str) -> str:
    """The URL without user info, query or fragment (they may carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def encode_batch(events: list[dict[str, Any]]) -> bytes:
    return codec.encode(events)


class WebhookSink:
    def __init__(self, cfg: WebhookConfig) -> None:
        self.name = cfg.name
        self.url = cfg.url
        self.batch_size = cfg.batch_size
        self.batch_wait = cfg.batch_wait
        self.max_age = cfg.max_age
        self.timeout = cfg.timeout
        self._secret = cfg.secret.encode()
        self.filter = EventFilter.of(cfg.events, cfg.accounts)
        self._ca_file = cfg.ca_file
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the secret
        return f"WebhookSink({self.name!r}, {shown_url(self.url)!r})"

    def describe(self) -> dict[str, Any]:
        return {"kind": "webhook", "url": shown_url(self.url),
                **self.filter.describe(),
                "batch_size": self.batch_size, "batch_wait": self.batch_wait,
                "max_age": self.max_age}

    def wants(self, event: dict[str, Any]) -> bool:
        return self.filter.wants(event)

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.url.startswith("https:"):
            return False
        context = ssl.create_default_context()  # the system's store
        if self._ca_file:
            context.load_verify_locations(self._ca_file)
        return context

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=1)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": USER_AGENT})
        return self._session

    async def deliver(self, events: list[dict[str, Any]]) -> None:
        body = encode_batch(events)
        headers = {"Content-Type": "application/json",
                   HEADER: signature_header(self._secret, int(time.time()), body)}
        try:
            async with self._open().post(self.url, data=body, headers=headers,
                                         allow_redirects=False) as response:
                await response.read()
                if not 200 <= response.status < 300:
                    raise SinkFailed(f"HTTP {response.status}")
        except TimeoutError:
            raise SinkFailed(f"no answer within {self.timeout:g}s") from None
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise SinkFailed(f"{type(exc).__name__}: {exc}"[:300]) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
