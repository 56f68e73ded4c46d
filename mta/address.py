"""Addresses, parsed without sockets: RFC 5321 paths, From: fields, domains.

The one address module of the engine, a leaf: intake, the DKIM signer and the
policy guard all read addresses here.

`parse_path("<user@example.com> SIZE=100")` -> (Address, {"SIZE": "100"}).
Anything that is not a valid RFC 5321 (or RFC 6531, with UTF-8) path raises
`AddressError` with the SMTP reply to give. Source routes are accepted and
ignored, as RFC 5321 4.1.1.3 asks; the relay decision is made on the real
domain only.

`address_domain(from_value)` is the domain the DKIM signer picks its key by;
`address_domains(from_value)` every domain a From: value may be read as.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from email.utils import getaddresses

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff\-]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LITERAL = re.compile(r"\[([^\[\]\\\s]+)\]")
_ROUTE = re.compile(rf"@{_DOMAIN.pattern}(?:,@{_DOMAIN.pattern})*:")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_XTEXT_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNDECODABLE = re.compile(r"[\ud800-\udfff]")  # bytes that were not UTF-8 (surrogateescape)
_ANGLE_ADDR = re.compile(rb'<[^<>@"()\\]*@([^<>@"()\\\s]+)>[ \t]*\Z')
_BARE_ADDR = re.compile(rb'\s*[^\s<>@"(),;:\\]+@([^\s<>@"(),;:\\]+)\s*')

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """An unacceptable path or parameter; `reply` is the SMTP reply to send."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class Address:
    local: str
    domain: str  # lower-cased; an address literal keeps its brackets

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local


NULL = Address("", "")


def parse_path(text: str, allow_null: bool = False) -> tuple[Address, dict[str, str | None]]:
    """Parse `<path> [params]` as given after `MAIL FROM:` or `RCPT TO:`."""
    if _CONTROL.search(text):
        raise AddressError("501 5.5.2 Control characters are not allowed in commands")
    if _UNDECODABLE.search(text):
        raise AddressError("501 5.5.2 Invalid UTF-8 in command")
    text = text.strip()
    if not text.startswith("<"):
        raise AddressError("501 5.5.4 Syntax: the address must be enclosed in <>")
    end = _closing_bracket(text)
    inner, rest = text[1:end], text[end + 1:]
    if rest and not rest.startswith(" "):
        raise AddressError("501 5.5.4 Syntax: unexpected text after the address")
    params = parse_params(rest)
    if not inner:
        if not allow_null:
            raise AddressError("501 5.1.3 A null address is not allowed here")
        return NULL, params
    if len(inner) > MAX_PATH:
        raise AddressError("501 5.1.3 Address too long")
    route = _ROUTE.match(inner)
    if route:
        inner = inner[route.end():]
    return parse_mailbox(inner), params


def _closing_bracket(text: str) -> int:
    """Index of the `>` closing the path, skipping quoted strings and literals."""
    quoted = literal = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "[":
            literal = True
        elif ch == "]":
            literal = False
        elif ch == ">" and not literal:
            return i
    raise AddressError("501 5.5.4 Syntax: missing closing >")


def parse_mailbox(text: str) -> Address:
    """`local@domain` -> Address; raises AddressError."""
    local_match = _QUOTED.match(text) or _DOT_STRING.match(text)
    if not local_match or text[local_match.end():local_match.end() + 1] != "@":
        raise AddressError("553 5.1.3 Bad address syntax")
    local = local_match.group(0)
    domain = text[local_match.end() + 1:]
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError("553 5.1.3 Local part too long")
    return Address(local, _parse_domain(domain))


def _parse_domain(domain: str) -> str:
    literal = _LITERAL.fullmatch(domain)
    if literal:
        body = literal.group(1)
        try:
            if body.lower().startswith("ipv6:"):
                ipaddress.IPv6Address(body[5:])
            else:
                ipaddress.IPv4Address(body)
        except ValueError:
            raise AddressError("553 5.1.3 Bad address literal") from None
        return domain.lower()
    if not _DOMAIN.fullmatch(domain) or len(domain) > MAX_DOMAIN:
        raise AddressError("553 5.1.3 Bad domain in address")
    return domain.lower().rstrip(".")


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters `KEY[=VALUE] ...` -> {KEY: VALUE or None}, keys upper-cased."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _XTEXT_VALUE.fullmatch(value)):
            raise AddressError(f"501 5.5.4 Bad parameter {item[:40]!r}")
        key = key.upper()
        if key in params:
            raise AddressError(f"501 5.5.4 Parameter {key} given twice")
        params[key] = value if eq else None
    return params


# --- From: fields and domains ---------------------------------------------------------


def normalize_domain(domain: str) -> str:
    """Lowercase, no trailing dot, IDNA A-label form when it has non-ASCII characters."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def address_domain(value: bytes) -> str:
    """The domain of the first address in a From: value, '' if it has none."""
    if value.count(b"@") == 1:  # the common case, without the cost of a full parse
        simple = _ANGLE_ADDR.search(value) or _BARE_ADDR.fullmatch(value)
        if simple:
            return normalize_domain(simple.group(1).decode("utf-8", "replace"))
    for address in _listed(value):
        if "@" in address:
            return normalize_domain(address.rpartition("@")[2])
    return ""


def address_domains(value: bytes) -> set[str]:
    """Every domain of a From: value, read both as `address_domain` reads it and as a full
    address-list parser does (they may differ on hostile input)."""
    domains = {address_domain(value)}
    domains.update(normalize_domain(a.rpartition("@")[2]) for a in _listed(value) if "@" in a)
    domains.discard("")
    return domains


def _listed(value: bytes) -> list[str]:
    text = value.replace(b"\r\n", b"").decode("utf-8", "replace")  # unfolded if not canonical
    return [address for _, address in getaddresses([text])]


def address_key(address: str) -> str:
    """An address as a lookup key: no angle brackets or blanks around it, lower case."""
    return address.strip().strip("<>").strip().lower()
