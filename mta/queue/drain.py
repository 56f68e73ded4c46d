"""Draining a node: its queued mail handed to another node over SMTP.

`Drain.run()` takes the spool's messages one at a time: their waiting jobs are held
(reason ``drain``, or ``drain|<the hold it had>``, so this node's own scheduler leaves
them alone and a crash forgets nothing), the message is sent to the other node (MAIL
FROM the original sender, RCPT TO every recipient still waiting; one transaction per
hold the jobs had) with a trace field that carries what the other node needs to keep the
message's history, and the recipients the other node accepted are removed here only
once it answered 250 to the data (the message is on its disk). Recipients it refused
stay here, with the hold they had (a refusal for good is reported; a temporary one
stops the run, to be resumed). Messages are taken TAKE_BATCH at a time (one write);
when the run stops (the other node gone, a refusal for now), those taken and not handed
over get back the hold they had (or none: this node delivers them itself if the drain is
not run again). A crash of either side leaves every message either here (after a crash
here, held for the drain: taken again by the next run, which resumes where the last
one was) or there: nothing lost; a message the other node took just before a crash may
go out twice (at-least-once).

Held mail keeps its hold: a job held here (a campaign paused, an operator's suspension,
a review) is drained with its reason in the trace (``held``; for an operator's
suspension also ``held_until``, the rule's expiry), and the other node stores it held
for the same reason; for a suspension it also takes the rule when it has none of its
own (mta.queue.rules.carry_rule): listed there, lifted there at the same expiry or by
an operator's resume there, which releases the mail.

The trace field (`TRACE_FIELD`) is ``account=..; campaign=..; received=<unix>;
attempts=<n>; from=<node>; send_at=<unix>; lane=..; held=..; held_until=<unix>;
pool=..`` (held, held_until and pool only when set), each value percent-encoded. The receiving intake honours it only from a trusted client
(`[smtp] trusted_networks`) and always removes it.
"""

from __future__ import annotations

import smtplib
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mta.queue import jobs
from mta.queue.jobs import Job, RcptState
from mta.queue.rules import Rule, carry_rule, rule_for_hold
from mta.queue.spool import Spool

TRACE_FIELD = "X-MTA-Drained"
TAKE_BATCH = 100  # messages taken for the drain per write transaction
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
    held: str = ""  # the hold it had here ("": none)
    held_until: float = 0.0  # an operator's suspension: the rule's expiry
    pool: str = ""  # its egress pool (mta.egress), when it had one


def trace_value(trace: DrainTrace) -> str:
    quote = urllib.parse.quote
    return (f"account={quote(trace.account)}; campaign={quote(trace.campaign)}; "
            f"received={trace.received:.3f}; attempts={trace.attempts}; "
            f"from={quote(trace.node)}; send_at={trace.send_at:.3f}; lane={quote(trace.lane)}"
            + (f"; held={quote(trace.held)}; held_until={trace.held_until:.3f}"
               if trace.held else "")
            + (f"; pool={quote(trace.pool)}" if trace.pool else ""))


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
                          fields.get("lane", ""), fields.get("held", "")[:300],
                          float(fields.get("held_until", "0")), fields.get("pool", "")[:100])
    except ValueError:
        return None


def drain_hold(original: str) -> str:
    """The hold of a job taken for the drain, keeping the one it had."""
    return f"{DRAIN_HOLD}|{original}" if original else DRAIN_HOLD


def original_hold(held: str) -> str:
    """The hold a job had before the drain took it (itself when not taken)."""
    if held == DRAIN_HOLD:
        return ""
    return held.removeprefix(f"{DRAIN_HOLD}|")


def received_hold(spool: Spool, txn: Any, trace: DrainTrace, now: float
                  ) -> tuple[str, Rule | None]:
    """On the receiving node (in a write transaction): the hold drained mail is stored
    with, and the suspension rule carried with it (None: none was needed). A suspension
    neither carried nor here any more holds nothing (it would never be lifted)."""
    if not trace.held.startswith("suspend:"):
        return trace.held, None
    carried = carry_rule(spool, txn, trace.held, trace.held_until, trace.node, now)
    if carried is None and rule_for_hold(spool, txn, trace.held) is None:
        return "", None
    return trace.held, carried


@dataclass
class DrainReport:
    sent: int = 0  # messages the other node took (all or some of their recipients)
    recipients: int = 0  # recipients it took (removed here)
    held: int = 0  # of them, held ones (they keep their hold there)
    refused: list[str] = field(default_factory=list)  # messages it refused for good (kept here)
    kept: int = 0  # recipients it refused (for good or for now): kept here


class DrainDeferred(Exception):
    """The other node refused some recipients for now (4xx): they are kept here; run the
    drain again later."""


# (sender, recipients, data) -> the refused recipients {address: (code, text)}; raises
# on a refusal of the whole message (smtplib.SMTPResponseException) or a broken session.
Sender = Callable[[str, list[str], bytes], dict[str, tuple[int, bytes]]]


class Drain:
    def __init__(self, spool: Spool, send: Sender, node: str) -> None:
        self.spool = spool
        self.send = send
        self.node = node
        self.report = DrainReport()

    def waiting_messages(self) -> Iterator[str]:
        """Ids of messages with a waiting job, oldest first (ids are time-ordered)."""
        with self.spool.read() as txn:
            ids = sorted({job.msg for job in self.spool.jobs(txn) if job.waiting()})
        yield from ids

    def run(self, on_message: Callable[[str], None] | None = None) -> DrainReport:
        """Hand over every waiting message; the report (also `self.report`, which says
        how far a run that raised got)."""
        report = self.report = DrainReport()
        for batch in _chunks(self.waiting_messages(), TAKE_BATCH):
            taken = self._take(batch)
            for n, (message_id, message, found) in enumerate(taken):
                try:
                    took = [self._hand_over(message_id, message, held, group, report)
                            for held, group in _by_hold(found).items()]
                except BaseException:
                    self._give_back(taken[n:])  # a stop: this node keeps them as they were
                    raise
                if any(took):
                    report.sent += 1
                    if on_message is not None:
                        on_message(message_id)
        return report

    def _give_back(self, taken: list[tuple[str, dict[str, Any], list[Job]]]) -> None:
        """Taken messages not handed over: back to the hold they had (or none)."""
        for _, _, found in taken:
            for held, group in _by_hold(found).items():
                self._settle(group, set(), held)

    def _hand_over(self, message_id: str, message: dict[str, Any], held: str,
                   found: list[Job], report: DrainReport) -> bool:
        """Send the recipients of `found` (jobs of one hold); True when the other node
        took some. Raises when it could not be asked or refused for now (`run` gives the
        jobs back)."""
        recipients = [r for job in found for r in job.waiting()]
        trace = DrainTrace(message.get("account", ""), message.get("campaign", ""),
                           message["received"], max(j.attempts for j in found), self.node,
                           message.get("send_at", 0.0), message.get("lane", ""), held,
                           self._held_until(held), message.get("pool", ""))
        data = f"{TRACE_FIELD}: {trace_value(trace)}\r\n".encode() + message["data"]
        try:
            refused = self.send(message.get("from", ""), recipients, data)
        except smtplib.SMTPRecipientsRefused as exc:
            refused = dict(exc.recipients)
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code < 500:
                raise  # a 4xx: stop here; the next run resumes with this message
            self._settle(found, set(), held)
            report.refused.append(message_id)
            report.kept += len(recipients)
            return False
        accepted = {r for r in recipients if r not in refused}
        self._settle(found, accepted, held)
        report.recipients += len(accepted)
        report.held += len(accepted) if held else 0
        report.kept += len(refused)
        if any(code < 500 for code, _ in refused.values()):
            raise DrainDeferred(f"{len(refused)} recipients of {message_id} refused for now "
                                f"(kept here)")
        if refused:
            report.refused.append(message_id)
        return bool(accepted)

    def _held_until(self, held: str) -> float:
        if not held.startswith("suspend:"):
            return 0.0
        with self.spool.read() as txn:
            rule = rule_for_hold(self.spool, txn, held)
        return rule.expires if rule is not None else 0.0

    def _take(self, message_ids: list[str]) -> list[tuple[str, dict[str, Any], list[Job]]]:
        """Hold the messages' waiting jobs for the drain (keeping the hold each had, in
        its drain hold); (id, message, jobs) of those that still wait."""

        def take(txn: Any) -> list[tuple[str, dict[str, Any], list[Job]]]:
            taken = []
            for message_id in message_ids:
                message = self.spool.get_message(txn, message_id)
                found = [j for j in jobs.message_jobs(self.spool, txn, message_id)
                         if j.waiting()]
                if message is None or not found:
                    continue
                for job in found:
                    hold = drain_hold(original_hold(job.held))
                    if job.held != hold:
                        if job.held:
                            self.spool.release_job(txn, job, job.next_ms)
                        self.spool.hold_job(txn, job, hold)
                taken.append((message_id, message, found))
            return taken

        result: list[tuple[str, dict[str, Any], list[Job]]] = self._write(take)
        return result

    def _settle(self, found: list[Job], accepted: set[str], held: str) -> None:
        """The other node took `accepted`: those recipients leave the jobs here (a job
        with none left goes); the others get back the hold they had."""

        def settle(txn: Any) -> None:
            for job in jobs.jobs_by_ids(self.spool, txn, [j.id for j in found]):
                for rcpt in job.rcpts:
                    if rcpt.state == RcptState.QUEUED and rcpt.address in accepted:
                        rcpt.state, rcpt.code = RcptState.DELIVERED, 250
                        rcpt.reply = "handed over by a drain"
                if not job.waiting():
                    self.spool.remove_job(txn, job)
                    continue
                self.spool.release_job(txn, job, job.next_ms)
                if held and (not held.startswith("suspend:")
                             or rule_for_hold(self.spool, txn, held) is not None):
                    self.spool.hold_job(txn, job, held)

        self._write(settle)

    def _write(self, op: Callable[[Any], Any]) -> Any:
        [result] = self.spool.apply([op])
        if isinstance(result, BaseException):
            raise result
        return result


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _by_hold(found: list[Job]) -> dict[str, list[Job]]:
    """The jobs by the hold each had before the drain took it."""
    groups: dict[str, list[Job]] = {}
    for job in found:
        groups.setdefault(original_hold(job.held), []).append(job)
    return groups


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

    def send(sender: str, recipients: list[str], data: bytes
             ) -> dict[str, tuple[int, bytes]]:
        try:
            return client().sendmail(sender, recipients, data)  # the refused ones
        except (smtplib.SMTPServerDisconnected, OSError):
            state["client"] = None
            raise

    def close() -> None:
        c = state["client"]
        if c is not None:
            try:
                c.quit()
            except (smtplib.SMTPException, OSError):
                c.close()

    return send, close
