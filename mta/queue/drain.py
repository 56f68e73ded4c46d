"""Draining a node: its queued mail handed to another node over SMTP.

`Drain.run()` takes the spool's messages one at a time: their waiting jobs are held
(reason ``drain``, so this node's own scheduler leaves them alone), the message is sent
to the other node (MAIL FROM the original sender, RCPT TO every recipient still
waiting) with a trace field that carries what the other node needs to keep the
message's history, and the jobs are removed here only once the other node answered
250 (the message is on its disk). A crash or a stop of either side leaves every
message either here (held for the drain, taken again by the next run, which resumes
where the last one was) or there: nothing lost; a message the other node took just
before a crash here may go out twice (at-least-once).

The trace field (`TRACE_FIELD`) is ``account=..; campaign=..; received=<unix>;
attempts=<n>; from=<node>; send_at=<unix>; lane=..``, each value percent-encoded. The receiving intake honours
it only from a trusted client (`[smtp] trusted_networks`) and always removes it.
"""

from __future__ import annotations

import smtplib
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mta.queue import jobs
from mta.queue.jobs import Job
from mta.queue.spool import Spool

TRACE_FIELD = "X-MTA-Drained"
DRAIN_HOLD = "drain"


@dataclass
class DrainTrace:
    account: str = ""
    campaign: str = ""
    received: float = 0.0
    attempts: int = 0
    node: str = ""
    send_at: float = 0.0
    lane: str = ""


def trace_value(trace: DrainTrace) -> str:
    quote = urllib.parse.quote
    return (f"account={quote(trace.account)}; campaign={quote(trace.campaign)}; "
            f"received={trace.received:.3f}; attempts={trace.attempts}; "
            f"from={quote(trace.node)}; send_at={trace.send_at:.3f}; lane={quote(trace.lane)}")


def parse_trace(value: str) -> DrainTrace | None:
    """The trace of a field value, or None when it is not one."""
    fields = {}
    for part in value.split(";"):
        key, eq, raw = part.strip().partition("=")
        if not eq:
            return None
        fields[key] = urllib.parse.unquote(raw)
    try:
        return DrainTrace(fields.get("account", ""), fields.get("campaign", ""),
                          float(fields.get("received", "0")), int(fields.get("attempts", "0")),
                          fields.get("from", ""), float(fields.get("send_at", "0")),
                          fields.get("lane", ""))
    except ValueError:
        return None


@dataclass
class DrainReport:
    sent: int = 0  # messages the other node took
    recipients: int = 0
    refused: list[str] = field(default_factory=list)  # messages it refused for good (kept here)


Sender = Callable[[str, list[str], bytes], None]  # raises on anything but 250


class Drain:
    def __init__(self, spool: Spool, send: Sender, node: str) -> None:
        self.spool = spool
        self.send = send
        self.node = node

    def waiting_messages(self) -> Iterator[str]:
        """Ids of messages with a waiting job, oldest first (ids are time-ordered)."""
        with self.spool.read() as txn:
            ids = sorted({job.msg for job in self.spool.jobs(txn) if job.waiting()})
        yield from ids

    def run(self, on_message: Callable[[str], None] | None = None) -> DrainReport:
        report = DrainReport()
        for message_id in self.waiting_messages():
            taken = self._take(message_id)
            if taken is None:
                continue
            message, found = taken
            recipients = [r for job in found for r in job.waiting()]
            trace = DrainTrace(message.get("account", ""), message.get("campaign", ""),
                               message["received"], max(j.attempts for j in found), self.node,
                               message.get("send_at", 0.0), message.get("lane", ""))
            data = f"{TRACE_FIELD}: {trace_value(trace)}\r\n".encode() + message["data"]
            try:
                self.send(message.get("from", ""), recipients, data)
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code >= 500:
                    self._give_back(found)
                    report.refused.append(message_id)
                    continue
                raise  # a 4xx: stop here; the next run resumes with this message
            except smtplib.SMTPRecipientsRefused:
                self._give_back(found)
                report.refused.append(message_id)
                continue
            self._remove(found)
            report.sent += 1
            report.recipients += len(recipients)
            if on_message is not None:
                on_message(message_id)
        return report

    def _take(self, message_id: str) -> tuple[dict[str, Any], list[Job]] | None:
        """Hold the message's waiting jobs for the drain; (message, jobs) or None."""

        def take(txn: Any) -> tuple[dict[str, Any], list[Job]] | None:
            message = self.spool.get_message(txn, message_id)
            found = [j for j in jobs.message_jobs(self.spool, txn, message_id) if j.waiting()]
            if message is None or not found:
                return None
            for job in found:
                if job.held != DRAIN_HOLD:
                    if job.held:
                        self.spool.release_job(txn, job, job.next_ms)
                    self.spool.hold_job(txn, job, DRAIN_HOLD)
            return message, found

        return self._write(take)

    def _remove(self, found: list[Job]) -> None:
        def remove(txn: Any) -> None:
            jobs.remove(self.spool, txn, jobs.jobs_by_ids(self.spool, txn,
                                                          [j.id for j in found]))

        self._write(remove)

    def _give_back(self, found: list[Job]) -> None:
        def give_back(txn: Any) -> None:
            held = jobs.jobs_by_ids(self.spool, txn, [j.id for j in found])
            jobs.release(self.spool, txn, held, min(j.next_ms for j in found), DRAIN_HOLD)

        self._write(give_back)

    def _write(self, op: Callable[[Any], Any]) -> Any:
        [result] = self.spool.apply([op])
        if isinstance(result, BaseException):
            raise result
        return result


def smtp_sender(host: str, port: int, helo: str, timeout: float = 60.0) -> tuple[
        Sender, Callable[[], None]]:
    """A Sender over one SMTP session to host:port (reopened when it drops), and its
    closer."""
    state: dict[str, smtplib.SMTP | None] = {"client": None}

    def client() -> smtplib.SMTP:
        if state["client"] is None:
            c = smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout)
            c.ehlo()
            state["client"] = c
        return state["client"]  # type: ignore[return-value]

    def send(sender: str, recipients: list[str], data: bytes) -> None:
        try:
            refused = client().sendmail(sender, recipients, data)
        except smtplib.SMTPServerDisconnected:
            state["client"] = None
            raise
        if refused:  # some recipients refused, the others taken: keep it simple and safe
            raise smtplib.SMTPRecipientsRefused(refused)

    def close() -> None:
        c = state["client"]
        if c is not None:
            try:
                c.quit()
            except (smtplib.SMTPException, OSError):
                c.close()

    return send, close
