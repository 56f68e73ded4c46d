"""TLS reporting (RFC 8460) as plain functions: the `_smtp._tls` record, session counts
per policy, the aggregate report (JSON, gzip) and the mail that carries it.

Counts are kept per UTC day and policy (`ReportScope`), merged into the spool's LMDB
by mta/delivery/tls/store.py; mta/delivery/tls/reporter.py sends the reports.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any

from mta.delivery.tls.model import ReportScope, Verdict

RECORD_VERSION = "v=TLSRPTv1"
MEDIA_TYPE = "application/tlsrpt+gzip"
_URI = re.compile(r"(mailto:[^\s,;@]+@[^\s,;]+|https://[^\s,;]+)", re.I)


def parse_tlsrpt_record(texts: Sequence[str]) -> tuple[str, ...]:
    """The rua URIs of a domain's `_smtp._tls` TXT records (RFC 8460 3); () if none.

    Exactly one record must start with v=TLSRPTv1; only mailto: and https: are used."""
    records = [t for t in texts if t.startswith(RECORD_VERSION)]
    if len(records) != 1:
        return ()
    fields: dict[str, str] = {}
    for part in records[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            fields.setdefault(key.strip().lower(), value.strip())
    if fields.get("v") != "TLSRPTv1":
        return ()
    uris = []
    for item in fields.get("rua", "").split(","):
        item = item.strip()
        if _URI.fullmatch(item):
            uris.append(item)
    return tuple(uris)


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def day_range(day: str) -> tuple[datetime, datetime]:
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    return start, start + timedelta(days=1) - timedelta(seconds=1)


@dataclass
class PolicyCounts:
    """One policy's sessions in one day: successes and failures by detail."""

    scope: ReportScope
    success: int = 0
    failures: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    # (result type, sending MTA IP, receiving MX host name, receiving IP) -> sessions

    def add(self, result: str, sending_ip: str = "", mx: str = "", receiving_ip: str = "",
            count: int = 1) -> None:
        if not result:
            self.success += count
            return
        key = (result, sending_ip, mx, receiving_ip)
        self.failures[key] = self.failures.get(key, 0) + count

    def merge(self, other: PolicyCounts) -> None:
        self.success += other.success
        for key, count in other.failures.items():
            self.failures[key] = self.failures.get(key, 0) + count

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def to_record(self) -> dict[str, Any]:
        s = self.scope
        return {"scope": [s.domain, s.type, list(s.strings), list(s.mx_host)],
                "success": self.success,
                "failures": [[*key, count] for key, count in self.failures.items()]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PolicyCounts:
        domain, kind, strings, mx = record["scope"]
        counts = cls(ReportScope(domain, kind, tuple(strings), tuple(mx)), int(record["success"]))
        for *key, count in record["failures"]:
            counts.failures[tuple(key)] = int(count)  # type: ignore[index]
        return counts


class SessionLedger:
    """Sessions counted since the last flush, by (day, policy)."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, str, str], PolicyCounts] = {}

    def add(self, scope: ReportScope, verdict: Verdict | None, result: str = "",
            mx: str = "", receiving_ip: str = "", sending_ip: str = "",
            now: float | None = None) -> None:
        day = day_of(time.time() if now is None else now)
        key = (day, scope.domain, scope.digest)
        counts = self.pending.get(key)
        if counts is None:
            counts = self.pending[key] = PolicyCounts(scope)
        counts.add(verdict.result if verdict is not None else result, sending_ip, mx,
                   receiving_ip)

    def take(self) -> dict[tuple[str, str, str], PolicyCounts]:
        pending, self.pending = self.pending, {}
        return pending


def build_report(domain: str, day: str, policies: Iterable[PolicyCounts], *,
                 organization: str, contact: str, report_id: str) -> dict[str, Any]:
    """The report of RFC 8460 section 4 for one policy domain and one UTC day."""
    start, end = day_range(day)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "end-datetime": end.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "contact-info": contact,
        "report-id": report_id,
        "policies": [_policy_entry(domain, counts) for counts in policies],
    }


def _policy_entry(domain: str, counts: PolicyCounts) -> dict[str, Any]:
    scope = counts.scope
    policy: dict[str, Any] = {"policy-type": scope.type, "policy-domain": domain}
    if scope.strings:
        policy["policy-string"] = list(scope.strings)
    if scope.mx_host:
        policy["mx-host"] = list(scope.mx_host)
    entry: dict[str, Any] = {
        "policy": policy,
        "summary": {"total-successful-session-count": counts.success,
                    "total-failure-session-count": counts.failed},
    }
    details = []
    for (result, sending_ip, mx, receiving_ip), count in sorted(counts.failures.items()):
        detail: dict[str, Any] = {"result-type": result, "failed-session-count": count}
        if sending_ip:
            detail["sending-mta-ip"] = sending_ip
        if mx:
            detail["receiving-mx-hostname"] = mx
        if receiving_ip:
            detail["receiving-ip"] = receiving_ip
        details.append(detail)
    if details:
        entry["failure-details"] = details
    return entry


def compress(report: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(report, separators=(",", ":")).encode(), mtime=0)


def report_filename(submitter: str, domain: str, day: str, unique: str) -> str:
    """RFC 8460 5.3: sender!policy-domain!begin!end!unique.json.gz (UNIX timestamps)."""
    start, end = day_range(day)
    return (f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}"
            f"!{unique}.json.gz")


def report_mail(*, sender: str, to: str, domain: str, submitter: str, report_id: str,
                day: str, payload: bytes, unique: str, hostname: str,
                now: float | None = None) -> bytes:
    """The report as mail (RFC 8460 5.3): multipart/report; report-type=tlsrpt."""
    now = time.time() if now is None else now
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = make_msgid("tlsrpt", domain=hostname)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(f"This is an aggregate TLS report from {submitter} for {domain}, "
                    f"{day} (UTC).\n")
    msg.add_attachment(payload, maintype="application", subtype="tlsrpt+gzip",
                       filename=report_filename(submitter, domain, day, unique))
    msg.set_type("multipart/report")  # keeps the boundary
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes(policy=SMTP)
