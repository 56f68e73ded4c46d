"""What the big mailbox providers mean by their own replies (receivers.toml).

Some wordings are only conclusive when a given provider said them: Yahoo's "dd This user
doesn't have a ... account" comes after DATA yet names an unknown mailbox; NTT docomo's
5.2.0 is its sender filter. The provider is recognised by the remote MTA's host name, by
the recipient's domain, or by its own name in the reply.
"""

from __future__ import annotations

import re
from functools import cache

from mta.bounce.model import Delivery
from mta.bounce.phrases import Provider, normalize, providers
from mta.bounce.reason import Decision

_HOST_PATTERNS = (
    re.compile(r"while talking to ([\w.-]+\.[a-z]{2,})", re.I),
    re.compile(r"\bhost ([\w.-]+\.[a-z]{2,}) ?\[", re.I),
    re.compile(r"\bremote host ([\w.-]+\.[a-z]{2,})", re.I),
    re.compile(r"\bRemote-MTA:\s*dns;\s*([\w.-]+\.[a-z]{2,})", re.I),
)
# Host names quoted inside a reply ("... [AM0PR01MB0001.eurprd01.prod.outlook.com]").
_QUOTED_HOST_RE = re.compile(r"\[([\w-]+(?:\.[\w-]+){2,})\]")


def remote_host(d: Delivery, report: str) -> str:
    if d.remote_host:
        return d.remote_host.lower().rstrip(".")
    for text in (d.diagnosis, report):
        for pattern in _HOST_PATTERNS:
            found = pattern.search(text or "")
            if found:
                return found.group(1).lower().rstrip(".")
    return ""


def provider_hint(d: Delivery, host: str) -> Decision | None:
    """A reason the provider's own reply settles, or None."""
    text = normalize(d.diagnosis)
    if not text:
        return None
    hosts = set().union(*map(_suffixes, [host, *_QUOTED_HOST_RE.findall(d.diagnosis.lower())]))
    domains = _suffixes(d.recipient.rpartition("@")[2].lower())
    for provider in _speaking(hosts, domains):
        decision = _read(provider, d.status, text)
        if decision:
            return decision
    return None


def _speaking(hosts: set[str], domains: set[str]) -> list[Provider]:
    """The providers these host names and recipient domain point to, in table order."""
    by_host, by_domain, anywhere = _index()
    found = set(anywhere)
    for name in hosts:
        found.update(by_host.get(name, ()))
    for name in domains:
        found.update(by_domain.get(name, ()))
    return [p for p in providers() if p.name in found]


@cache
def _index() -> tuple[dict[str, list[str]], dict[str, list[str]], tuple[str, ...]]:
    by_host: dict[str, list[str]] = {}
    by_domain: dict[str, list[str]] = {}
    for p in providers():
        for suffix in p.hosts:
            by_host.setdefault(suffix, []).append(p.name)
        for suffix in p.domains:
            by_domain.setdefault(suffix, []).append(p.name)
    anywhere = tuple(p.name for p in providers() if not p.hosts and not p.domains)
    return by_host, by_domain, anywhere


def _suffixes(name: str) -> set[str]:
    """'mx1.mail.example.com' -> {'mx1.mail.example.com', 'mail.example.com', 'example.com', 'com'}"""
    labels = name.split(".")
    return {".".join(labels[i:]) for i in range(len(labels))} if name else set()


def _read(provider: Provider, status: str, text: str) -> Decision | None:
    by_code = provider.by_code(status) if status else None
    if by_code:
        return Decision(by_code[0], f"receiver {provider.name}: its own status code", by_code[1])
    found = provider.find(text)
    if found:
        reason, said = found
        return Decision(
            reason, f"receiver {provider.name}: its own reply", said.phrase, provider.name
        )
    return None
