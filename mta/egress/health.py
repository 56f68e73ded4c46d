"""Which events are warm-up health signals, and for which (source, provider).

A delivery, a hard bounce, a complaint, or a deferral that says the receiver does not like
the sender's address or pace: a "slow down" reply (mta.throttle.classify) or one whose
bounce reason (mta/bounce/reasons.toml) is about the sender's reputation. Other deferrals
(full mailbox, greylisting, a broken host) say nothing about the source and are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mta.throttle.classify import Signal, classify

# Bounce reasons (mta/bounce/reasons.toml) that judge the sending address itself.
REPUTATION_REASONS = frozenset({"blocked", "spamdetected", "policyviolation", "requireptr"})
SOURCE_KEYS = ("egress_source", "source")  # inbound reports use "source" for "async"
# The provider key is the one the gate was asked with: the [provider.X] name, else the
# deliverer's destination name (a site "mx:..." or the domain); "egress_provider" first.


@dataclass(frozen=True)
class HealthSignal:
    source: str
    provider: str
    name: str  # one of mta.egress.warmup.SIGNAL_NAMES


def source_of(event: dict[str, Any], sources: frozenset[str]) -> str | None:
    """The warming source `event` names, if any."""
    for key in SOURCE_KEYS:
        value = event.get(key)
        if isinstance(value, str) and value in sources:
            return value
    return None


def signal_name(event: dict[str, Any]) -> str | None:
    """Which health counter `event` adds to, if any."""
    kind = event.get("type")
    if event.get("dsn") or event.get("notice"):
        return None  # the engine's own mail is not a campaign's signal
    if kind == "Delivery":
        return "delivered"
    if kind == "Bounce" and event.get("kind") == "hard":
        return "hard_bounces"
    if kind == "Complaint":
        return "complaints"
    if kind == "TransientFailure" and is_reputation_deferral(event):
        return "deferrals"
    return None


def is_reputation_deferral(event: dict[str, Any]) -> bool:
    if event.get("reason") in REPUTATION_REASONS:
        return True
    code = event.get("code")
    if not isinstance(code, int):
        return False
    status = event.get("status")
    text = event.get("reply")
    return classify(code, status if isinstance(status, str) else None,
                    text if isinstance(text, str) else "") is Signal.SLOW_DOWN


def recipient_domain(event: dict[str, Any]) -> str:
    recipient = event.get("recipient")
    if isinstance(recipient, str) and "@" in recipient:
        return recipient.rpartition("@")[2].lower().rstrip(".")
    domain = event.get("domain")
    return domain.lower().rstrip(".") if isinstance(domain, str) else ""


class SignalReader:
    """Turns events into health signals. Learns which provider serves a domain from the
    events that name both, for events (complaints) that name only the recipient."""

    def __init__(self, sources: frozenset[str], max_domains: int = 100_000) -> None:
        self.sources = sources
        self.providers: dict[str, str] = {}
        self.max_domains = max_domains

    def read(self, event: dict[str, Any]) -> HealthSignal | None:
        name = signal_name(event)
        if name is None:
            return None
        source = source_of(event, self.sources)
        if source is None:
            return None
        domain = recipient_domain(event)
        provider = event.get("egress_provider") or event.get("provider")
        if isinstance(provider, str) and provider:
            if domain and len(self.providers) < self.max_domains:
                self.providers[domain] = provider
        else:
            provider = self.providers.get(domain, domain)
        if not provider:
            return None
        return HealthSignal(source, provider, name)
