"""HTTPS at the TLS policy's edges (aiohttp): the MTA-STS policy fetch (RFC 8461 3.3)
and the TLS-RPT report POST (RFC 8460 5.2).

Host names are resolved through the engine's own resolver (`[dns] nameservers`), and
certificates are verified against the engine's trust store (`[delivery] tls_ca_file`,
`tls_system_ca`). Addresses on loopback are refused unless `[delivery]
allow_loopback_mx` is set, as they are for MX hosts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import dns.name
import dns.rdatatype
from aiohttp.abc import AbstractResolver, ResolveResult

from mta.delivery.tls.model import STS_FETCH_ERROR, STS_INVALID, STS_WEBPKI_INVALID
from mta.delivery.tls.mtasts import MAX_POLICY_SIZE, StsError

Lookup = Callable[[dns.name.Name, dns.rdatatype.RdataType], Awaitable[Any]]


def https_context(ca_file: str = "", system: bool = True,
                  min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    """A verifying client context over the engine's trust store."""
    # Not `system`: only ca_file (none: nothing verifies). Both verify and check names.
    context = (ssl.create_default_context() if system
               else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = min_version
    return context


class EngineResolver(AbstractResolver):
    """aiohttp's resolver over the engine's DNS lookups (A, then AAAA)."""

    def __init__(self, lookup: Lookup, allow_loopback: bool = False) -> None:
        self.lookup = lookup
        self.allow_loopback = allow_loopback

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            name = dns.name.from_text(host)
            v4, v6 = await asyncio.gather(self.lookup(name, dns.rdatatype.A),
                                          self.lookup(name, dns.rdatatype.AAAA))
            addresses = [r.address for r in (*v4.records, *v6.records)]
        usable = [a for a in addresses if self.allow_loopback
                  or not ipaddress.ip_address(a).is_loopback]
        if not usable:
            raise OSError(f"{host} has no usable address")
        return [ResolveResult(hostname=host, host=a, port=port,
                              family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST) for a in usable]

    async def close(self) -> None:
        pass


class HttpsClient:
    """One aiohttp session (made in the running loop on first use) for both jobs."""

    def __init__(self, resolver: EngineResolver, context: ssl.SSLContext) -> None:
        self.resolver = resolver
        self.context = context
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.context, resolver=self.resolver,
                                             use_dns_cache=False, limit=100)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def fetch_policy(self, domain: str, port: int, timeout: float) -> str:
        """The text of `https://mta-sts.<domain>/.well-known/mta-sts.txt`, or StsError:
        no redirect followed, 200 only, text/plain only, at most 64 KiB, within `timeout`."""
        host = f"mta-sts.{domain}"
        url = f"https://{host}{'' if port == 443 else f':{port}'}/.well-known/mta-sts.txt"
        try:
            async with asyncio.timeout(timeout):
                async with self.session().get(url, allow_redirects=False) as resp:
                    if resp.status != 200:
                        where = resp.headers.get("Location", "")
                        extra = f" (redirect to {where[:100]} not followed)" if where else ""
                        raise StsError(STS_FETCH_ERROR, f"{url}: HTTP {resp.status}{extra}")
                    if resp.content_type != "text/plain":
                        raise StsError(STS_INVALID,
                                       f"{url}: Content-Type {resp.content_type}, not text/plain")
                    if (resp.content_length or 0) > MAX_POLICY_SIZE:
                        raise StsError(STS_INVALID, f"{url}: {resp.content_length} bytes, "
                                       f"more than {MAX_POLICY_SIZE}")
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(16384):
                        body += chunk
                        if len(body) > MAX_POLICY_SIZE:
                            raise StsError(STS_INVALID,
                                           f"{url}: more than {MAX_POLICY_SIZE} bytes")
        except StsError:
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            raise StsError(STS_WEBPKI_INVALID, f"{url}: {_describe(exc.certificate_error)}") \
                from None
        except aiohttp.ClientSSLError as exc:
            raise StsError(STS_WEBPKI_INVALID, f"{url}: {_describe(exc)}") from None
        except TimeoutError:
            raise StsError(STS_FETCH_ERROR, f"{url}: no answer within {timeout:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise StsError(STS_FETCH_ERROR, f"{url}: {_describe(exc)}") from None
        try:
            return body.decode(resp.charset or "utf-8")
        except (UnicodeDecodeError, LookupError):
            raise StsError(STS_INVALID, f"{url}: the policy is not text") from None

    async def post_report(self, url: str, payload: bytes, media_type: str,
                          timeout: float) -> str:
        """POST a report; "" when the receiver took it (2xx), else why not."""
        try:
            async with asyncio.timeout(timeout):
                async with self.session().post(url, data=payload, allow_redirects=False,
                                               headers={"Content-Type": media_type}) as resp:
                    await resp.read()
                    return "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return _describe(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]
