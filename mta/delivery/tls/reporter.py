"""TLS reporting's I/O (RFC 8460): session counts into LMDB, and the daily reports out.

Every worker flushes its sessions' counts into the spool's LMDB once a second (merged
per UTC day and policy); worker 0 looks every `[tlsrpt] check_interval` for finished
days, and for each policy domain that publishes `_smtp._tls` with `rua` sends the
report: gzip JSON POSTed to https: URIs as application/tlsrpt+gzip, and to mailto:
URIs as a mail the engine itself delivers (From: `[tlsrpt] sender@reporting_domain`,
DKIM-signed by the engine's key for that domain). `mta tls report` does the same on
demand. A day's counts for a domain are forgotten once its report went out (or when
the domain asks for none).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mta.config import Config, ConfigError
from mta.delivery.tls.http import HttpsClient
from mta.delivery.tls.report import (
    MEDIA_TYPE,
    SessionLedger,
    build_report,
    compress,
    day_of,
    parse_tlsrpt_record,
    report_mail,
)
from mta.delivery.tls.service import LookupFn, Submit, txt_strings
from mta.delivery.tls.store import TlsStore
from mta.queue.spool import NewMessage

log = logging.getLogger("mta.delivery.tls")

FLUSH_INTERVAL = 1.0  # seconds between a worker's writes of its session counts


def check_tlsrpt_config(cfg: Config) -> None:
    """Reports go out from a configured domain, DKIM-signed (RFC 8460 3): a key for it."""
    t = cfg.tlsrpt
    if not t.enabled:
        return
    if not t.reporting_domain:
        raise ConfigError("[tlsrpt] enabled needs [tlsrpt] reporting_domain")
    domain = t.reporting_domain.lower().rstrip(".")
    keys = {k.domain.lower().rstrip(".") for k in cfg.dkim.keys}
    if domain not in keys and cfg.dkim.fallback_domain.lower().rstrip(".") != domain:
        raise ConfigError(f"[tlsrpt] reporting_domain {t.reporting_domain}: mailed reports "
                          "must be DKIM-signed, and [[dkim.keys]] has no key for it")


@dataclass
class ReportResult:
    """One policy domain's report of one day, and what became of it."""

    day: str
    domain: str
    rua: tuple[str, ...]
    report: dict[str, Any]
    sent: dict[str, str] = field(default_factory=dict)  # URI -> "" (done) or why not


class TlsReporter:
    def __init__(self, cfg: Config, store: TlsStore, lookup: LookupFn, https: HttpsClient,
                 submit: Submit, on_stored: Callable[[NewMessage], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        t = cfg.tlsrpt
        self.cfg = cfg
        self.store = store
        self.lookup = lookup
        self.https = https
        self.submit = submit
        self.on_stored = on_stored
        self.clock = clock
        self.submitter = t.reporting_domain or cfg.engine.hostname
        self.sender = f"{t.sender}@{self.submitter}"
        self.organization = t.organization or self.submitter
        self.contact = t.contact or self.sender
        self.timeout = t.post_timeout

    async def flush(self, ledger: SessionLedger) -> None:
        counts = ledger.take()
        if counts:
            await self.submit(self.store.add_counts_op(counts))

    def finished_days(self) -> list[str]:
        today = day_of(self.clock())
        return [day for day in self.store.days() if day < today]

    async def send_due(self) -> list[ReportResult]:
        results: list[ReportResult] = []
        for day in self.finished_days():
            results += await self.send_day(day)
        return results

    async def send_day(self, day: str, dry_run: bool = False) -> list[ReportResult]:
        """Every policy domain's report of `day`: sent (and forgotten), or only built."""
        results = []
        for domain, policies in sorted(self.store.day_counts(day).items()):
            texts, _ = await txt_strings(self.lookup, f"_smtp._tls.{domain}")
            rua = parse_tlsrpt_record(texts)
            report_id = f"{day}.{secrets.token_hex(8)}@{self.submitter}"
            report = build_report(domain, day, policies, organization=self.organization,
                                  contact=self.contact, report_id=report_id)
            result = ReportResult(day, domain, rua, report)
            results.append(result)
            if dry_run:
                continue
            payload = compress(report)
            for uri in rua:
                result.sent[uri] = await self._send(uri, domain, day, report_id, payload)
                if result.sent[uri]:
                    log.warning("TLS report for %s (%s) to %s: %s", domain, day, uri,
                                result.sent[uri])
            await self.submit(self.store.drop_op(day, domain))
        return results

    async def _send(self, uri: str, domain: str, day: str, report_id: str,
                    payload: bytes) -> str:
        if uri.lower().startswith("https:"):
            return await self.https.post_report(uri, payload, MEDIA_TYPE, self.timeout)
        address = uri[len("mailto:"):]
        data = report_mail(sender=self.sender, to=address, domain=domain,
                           submitter=self.submitter, report_id=report_id, day=day,
                           payload=payload, unique=report_id.split(".")[1].split("@")[0],
                           hostname=self.cfg.engine.hostname, now=self.clock())
        message = NewMessage(sender="", recipients=[address], data=data,
                             extra={"notice": "TlsReport", "tlsrpt_domain": domain})
        try:
            await self.submit(self.store.spool.store_op(message))
        except Exception as exc:
            return f"not spooled: {exc}"
        if self.on_stored is not None:
            self.on_stored(message)
        return ""

    async def run(self, ledger: SessionLedger | None, leader: bool,
                  check_interval: float) -> None:
        """Flush the counts every second; the leader sends the finished days' reports."""
        next_check = self.clock() + min(check_interval, 60.0) if leader else float("inf")
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                if ledger is not None:
                    await self.flush(ledger)
                if self.clock() >= next_check:
                    next_check = self.clock() + check_interval
                    await self.send_due()
            except Exception:
                log.exception("TLS reporting failed")
