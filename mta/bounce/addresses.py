"""Finding and normalizing e-mail addresses in bounce text."""

from __future__ import annotations

import re

_LOCAL = r"""(?:"[^"\r\n]{1,64}"|[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.{1,4}[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\.{0,4})"""
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?\.)+[A-Za-z][A-Za-z0-9-]{0,62}"
ADDRESS_PATTERN = rf"{_LOCAL}@{_DOMAIN}"
ADDRESS_RE = re.compile(rf"(?<![\w.+-])({ADDRESS_PATTERN})(?![\w-])")
_ADDRESS_ONLY_RE = re.compile(rf"{_LOCAL}@{_DOMAIN}")

# Mailboxes that send bounces, never receive them as failed recipients.
_DAEMONS = re.compile(
    r"^(mailer-daemon|postmaster|post_master|poostmaster|mail-daemon|mailerdaemon|"
    r"double-bounce|no-?reply|bounces?)(\+.*)?@",
    re.IGNORECASE,
)


def clean_address(value: str) -> str:
    """'<User@Example.JP>' -> 'User@example.jp'; '' when ``value`` holds no address."""
    value = (value or "").strip()
    match = ADDRESS_RE.search(value)
    if not match:
        if value.startswith("@") or "@" not in value:
            return value.strip("<> ") if value.startswith("@") else ""
        return ""
    return lower_domain(match.group(1).rstrip("."))


def lower_domain(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower().rstrip('.')}"


def find_addresses(text: str) -> list[str]:
    """Every address in ``text`` in order of appearance, without duplicates."""
    if not text or "@" not in text:
        return []
    seen: dict[str, None] = {}
    for match in ADDRESS_RE.finditer(text or ""):
        address = lower_domain(match.group(1).rstrip("."))
        seen.setdefault(address, None)
    return list(seen)


def is_address(value: str) -> bool:
    return bool(value) and _ADDRESS_ONLY_RE.fullmatch(value) is not None


def is_daemon(address: str) -> bool:
    return _DAEMONS.match(address or "") is not None


def same_address(a: str, b: str) -> bool:
    return a.strip('"').lower() == b.strip('"').lower()
