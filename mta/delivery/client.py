"""One SMTP transaction on one outbound connection, with per-recipient results.

aiosmtplib carries the protocol; this module opens a connection to the first
reachable address of a destination (opportunistic STARTTLS, or required TLS)
and turns every reply or failure into a `RcptResult` per recipient.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import (
    SMTPDataError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from mta.queue.outcome import RcptResult, enhanced_status


@dataclass(frozen=True)
class Target:
    host: str  # the MX host name (for logs and DSNs)
    address: str  # the IP address to connect to


@dataclass
class ConnectSettings:
    port: int
    helo: str
    connect_timeout: float
    command_timeout: float
    source_address: str = ""
    tls_required: bool = False


@dataclass
class ConnectFailure:
    target: Target
    code: int
    text: str
    enhanced: str


class Connection:
    def __init__(self, smtp: aiosmtplib.SMTP, target: Target) -> None:
        self.smtp = smtp
        self.target = target
        self.sent = 0

    @property
    def usable(self) -> bool:
        return self.smtp.is_connected

    async def close(self) -> None:
        if self.smtp.is_connected:
            try:
                await self.smtp.quit(timeout=5)
            except (SMTPException, OSError):
                self.smtp.close()

    async def send(self, sender: str, recipients: list[str], data: bytes) -> list[RcptResult]:
        """One transaction; a result for every recipient. Never raises for SMTP trouble."""
        host = self.target.host
        try:
            await self.smtp.mail(sender, options=self._mail_options(sender, recipients, data))
        except SMTPResponseException as exc:
            self._after_refusal(exc.code)
            return [_result(r, exc.code, exc.message, host) for r in recipients]
        except (SMTPException, OSError) as exc:
            return self._lost(recipients, exc, in_data=False)
        results: dict[str, RcptResult] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                await self.smtp.rcpt(rcpt)
                accepted.append(rcpt)
            except SMTPRecipientRefused as exc:
                results[rcpt] = _result(rcpt, exc.code, exc.message, host)
                if exc.code == 421:
                    return self._finish(recipients, results, 421, exc.message)
            except (SMTPException, OSError) as exc:
                return self._merge(recipients, results, self._lost(recipients, exc, False))
        if not accepted:
            await self._reset()
            return [results[r] for r in recipients]
        try:
            reply = await self.smtp.data(data)
            code, text = reply.code, reply.message
        except SMTPDataError as exc:
            code, text = exc.code, exc.message
            self._after_refusal(code)
        except (SMTPException, OSError) as exc:
            lost = self._lost(accepted, exc, in_data=True)
            return self._merge(recipients, results, lost)
        for rcpt in accepted:
            results[rcpt] = _result(rcpt, code, text, host)
        self.sent += 1
        return [results[r] for r in recipients]

    def _mail_options(self, sender: str, recipients: list[str], data: bytes) -> list[str]:
        options = []
        if self.smtp.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        if self.smtp.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        if self.smtp.supports_extension("smtputf8") and not (
                sender.isascii() and all(r.isascii() for r in recipients)):
            options.append("SMTPUTF8")
        return options

    async def _reset(self) -> None:
        try:
            await self.smtp.rset()
        except (SMTPException, OSError):
            self.smtp.close()

    def _after_refusal(self, code: int) -> None:
        if code == 421:
            self.smtp.close()

    def _lost(self, recipients: list[str], exc: BaseException, in_data: bool) -> list[RcptResult]:
        self.smtp.close()
        if isinstance(exc, SMTPTimeoutError):
            text = "timed out waiting for the remote server's reply"
        elif isinstance(exc, SMTPServerDisconnected):
            text = "connection lost" + (" after the message was sent" if in_data else "")
        else:
            text = f"connection error: {exc}"
        return [RcptResult(r, 0, text, "4.4.2", self.target.host, possible_duplicate=in_data)
                for r in recipients]

    def _finish(self, recipients: list[str], results: dict[str, RcptResult], code: int,
                text: str) -> list[RcptResult]:
        self.smtp.close()
        for rcpt in recipients:
            results.setdefault(rcpt, _result(rcpt, code, text, self.target.host))
        return [results[r] for r in recipients]

    @staticmethod
    def _merge(recipients: list[str], known: dict[str, RcptResult],
               rest: list[RcptResult]) -> list[RcptResult]:
        merged = dict(known)
        for result in rest:
            merged.setdefault(result.recipient, result)
        return [merged[r] for r in recipients]


def _result(rcpt: str, code: int, text: str, host: str) -> RcptResult:
    return RcptResult(rcpt, code, text, enhanced_status(code, text), host)


async def connect(targets: list[Target], settings: ConnectSettings
                  ) -> tuple[Connection | None, list[ConnectFailure]]:
    """A connection to the first target that takes one; the failures on the way."""
    failures: list[ConnectFailure] = []
    for target in targets:
        smtp = aiosmtplib.SMTP(
            hostname=target.address, port=settings.port, timeout=settings.command_timeout,
            local_hostname=settings.helo, validate_certs=False,
            start_tls=True if settings.tls_required else None,
            source_address=(settings.source_address, 0) if settings.source_address else None,
        )
        try:
            await smtp.connect(timeout=settings.connect_timeout)
            if settings.tls_required and smtp.get_transport_info("sslcontext") is None:
                smtp.close()
                failures.append(ConnectFailure(target, 0, "TLS is required but was not set up",
                                               "4.7.10"))
                continue
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo()
            return Connection(smtp, target), failures
        except SMTPResponseException as exc:
            failures.append(ConnectFailure(target, exc.code, exc.message,
                                           enhanced_status(exc.code, exc.message)))
        except (SMTPException, OSError, ssl.SSLError) as exc:
            failures.append(ConnectFailure(target, 0, f"cannot connect to {target.host}"
                                           f" [{target.address}]: {_describe(exc)}", "4.4.1"))
        smtp.close()
    return None, failures


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]
