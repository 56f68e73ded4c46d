"""MTA-STS (RFC 8461) as plain functions: the `_mta-sts` TXT record, the policy text,
MX patterns, and when a cached policy is used, fetched again or dropped.

The DNS lookup, the HTTPS fetch and the LMDB cache are done around these by
mta/delivery/tls/service.py, mta/delivery/tls/http.py and mta/delivery/tls/store.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mta.delivery.tls.model import STS_INVALID

RECORD_VERSION = "v=STSv1"
POLICY_VERSION = "STSv1"
MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 3.3: a policy is at most 64 KiB
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: max_age is at most a year
STS_MODES = ("enforce", "testing", "none")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_FIELD = re.compile(r"([A-Za-z0-9_]+):[ \t]*(.*?)[ \t]*")


class StsError(Exception):
    """A record, a fetch or a policy that cannot be used: `result` is its TLS-RPT type."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail


@dataclass(frozen=True)
class StsRecord:
    """What the `_mta-sts.<domain>` TXT lookup said: the policy id, or why there is none."""

    id: str | None
    problem: str = ""  # several records, a bad id, a DNS failure
    tempfail: bool = False  # the lookup failed (SERVFAIL, timeout)


@dataclass(frozen=True)
class StsPolicy:
    domain: str
    id: str  # the TXT record's id when the policy was fetched
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched: float  # when (epoch seconds)
    lines: tuple[str, ...] = ()  # the policy as served, line by line (TLS-RPT policy-string)

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def to_record(self) -> dict[str, object]:
        return {"domain": self.domain, "id": self.id, "mode": self.mode, "mx": list(self.mx),
                "max_age": self.max_age, "fetched": self.fetched, "lines": list(self.lines)}

    @classmethod
    def from_record(cls, record: dict[str, object]) -> StsPolicy:
        return cls(str(record["domain"]), str(record["id"]), str(record["mode"]),
                   tuple(str(m) for m in record["mx"]),  # type: ignore[attr-defined]
                   int(record["max_age"]), float(record["fetched"]),  # type: ignore[arg-type]
                   tuple(str(x) for x in record.get("lines", ())))  # type: ignore[attr-defined]


def parse_sts_record(texts: Sequence[str]) -> StsRecord:
    """The policy id of a domain's TXT records at `_mta-sts.<domain>` (RFC 8461 3.1).

    Records not starting with v=STSv1 are ignored; several that do mean no policy."""
    records = [t for t in texts if t.startswith(RECORD_VERSION)]
    if not records:
        return StsRecord(None)
    if len(records) > 1:
        return StsRecord(None, "more than one v=STSv1 TXT record: treated as none")
    fields = {}
    for part in records[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key not in fields:
            fields[key.strip()] = value.strip()
    if fields.get("v") != "STSv1":
        return StsRecord(None, f"TXT record {records[0]!r} is not v=STSv1")
    policy_id = fields.get("id", "")
    if not _ID.fullmatch(policy_id):
        return StsRecord(None, f"TXT record {records[0]!r} has no valid id")
    return StsRecord(policy_id)


def parse_policy(domain: str, policy_id: str, text: str, now: float) -> StsPolicy:
    """The policy file (RFC 8461 3.2); StsError(sts-policy-invalid) when it is not one."""
    lines = tuple(line for line in re.split(r"\r\n|\n", text) if line.strip())
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in lines:
        match = _FIELD.fullmatch(line)
        if match is None:
            raise StsError(STS_INVALID, f"not a policy line: {line[:80]!r}")
        key, value = match.group(1), match.group(2)
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)  # a repeated field: the first one counts
    if fields.get("version") != POLICY_VERSION:
        raise StsError(STS_INVALID, f"version is {fields.get('version')!r}, not STSv1")
    mode = fields.get("mode", "")
    if mode not in STS_MODES:
        raise StsError(STS_INVALID, f"mode is {mode!r}, not enforce, testing or none")
    max_age = fields.get("max_age", "")
    if not max_age.isdigit() or len(max_age) > 10:
        raise StsError(STS_INVALID, f"max_age is {max_age!r}, not a number of seconds")
    if mode != "none" and not mx:
        raise StsError(STS_INVALID, "no mx line")
    for pattern in mx:
        if not _valid_pattern(pattern):
            raise StsError(STS_INVALID, f"mx {pattern!r} is not a host name or *.domain")
    return StsPolicy(domain, policy_id, mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT), now,
                     lines)


def _valid_pattern(pattern: str) -> bool:
    name = pattern[2:] if pattern.startswith("*.") else pattern
    return bool(name) and all(re.fullmatch(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", label)
                              for label in name.split("."))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: an exact name, or `*.domain` for exactly one more label in front."""
    host = host.rstrip(".").lower()
    pattern = pattern.rstrip(".").lower()
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def sts_action(record: StsRecord, cached: StsPolicy | None, now: float) -> str:
    """What to do for a domain now (RFC 8461 5.1): "cached" (use the cached policy),
    "fetch" (fetch it: new, changed id, or expired) or "none" (no policy)."""
    fresh = cached is not None and cached.expires > now
    if record.id is None:  # no record (or the lookup failed): a fresh cached one holds
        return "cached" if fresh else "none"
    if fresh and cached is not None and cached.id == record.id:
        return "cached"
    return "fetch"
