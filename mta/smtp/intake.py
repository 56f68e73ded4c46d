"""What the intake listener accepts: relay control, limits, accounts, durable storage.

The SMTP session (`mta.smtp.session`) asks this object at each step and sends the
reply it returns (None means "go on"). Storage goes through the group committer, so
the 250 after DATA is sent only once the message is committed with fsync.

Mail for the engine's own names (`OwnNames`) is taken for postmaster and the
configured local mailboxes only, and goes to the operator, never out by MX. A campaign
name is checked where it enters (`read_campaign`): an unfit one refuses the message.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from typing import Any, Protocol, TypeVar

from mta.address import Address, address_domains, normalize_domain
from mta.config import Config, parse_hostport
from mta.egress.pools import check_pool_field, pool_for
from mta.queue.commit import GroupCommitter
from mta.queue.drain import TRACE_FIELD, DrainTrace, parse_trace, received_hold
from mta.queue.lanes import BULK, LANES, choose_lane
from mta.queue.schedule import parse_send_at
from mta.queue.spool import NewMessage, Spool, SpoolFullError, new_message_id
from mta.smtp.auth import InFlight, PasswordChecker
from mta.smtp.auth_limit import AuthLimit
from mta.smtp.session import Client, Envelope, Settings
from mta.text import name_problem, shown
from mta.wire import without_fields

log = logging.getLogger("mta.intake")
T = TypeVar("T")

_HEADER_CACHE_SECONDS = 1.0


class StorageGuard:
    """Refuses new mail before the disk or the LMDB map is full; re-checks every second."""

    def __init__(self, spool: Spool, min_free_disk: int, max_map_use: float) -> None:
        self.spool = spool
        self.min_free_disk = min_free_disk
        self.max_map_use = max_map_use
        self._checked = 0.0
        self._ok = True
        self.full_until = 0.0  # set when a commit failed for lack of space

    def ok(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= _HEADER_CACHE_SECONDS:
            self._checked = now
            self._ok = self._measure()
        return self._ok and now >= self.full_until

    def _measure(self) -> bool:
        try:
            free = shutil.disk_usage(self.spool.path).free
        except OSError:
            return False
        used, size = self.spool.usage()
        return free >= self.min_free_disk and used < size * self.max_map_use

    def commit_failed(self) -> None:
        self.full_until = time.monotonic() + _HEADER_CACHE_SECONDS


@functools.cache
def _field_re(name: bytes) -> re.Pattern[bytes]:
    # [^\r\n], not `.`: `.` matches CR, so "a\r\n b" would stop at the fold.
    return re.compile(rb"(?im)^" + re.escape(name)
                      + rb"[ \t]*:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")


def unfold(value: bytes) -> bytes:
    """A folded field value on one line: each fold and its white space read as a space."""
    return re.sub(rb"\r\n[ \t]+", b" ", value)


def header_value(headers: bytes, name: bytes) -> str:
    """The first value of header `name` in a raw header block (unfolded), or ''."""
    match = _field_re(name).search(headers)
    if not match:
        return ""
    return unfold(match.group(1)).strip().decode("utf-8", "replace")


def header_values(headers: bytes, name: bytes) -> list[bytes]:
    """Every value of header `name` in a raw header block, unfolded."""
    return [unfold(m.group(1)).strip() for m in _field_re(name).finditer(headers)]


_FIELD_END = re.compile(rb"\r\n(?![ \t])")


@functools.lru_cache(maxsize=8)
def _fields(headers: bytes) -> dict[bytes, list[bytes]]:
    """The raw values of a header block by lower-case field name, read once per message
    (intake asks for half a dozen fields). A field runs to the first CRLF not followed
    by white space; a bare CR or LF inside is part of it (and so of the value to check),
    never an end. The name is what comes before the first colon, blanks before the
    colon allowed."""
    found: dict[bytes, list[bytes]] = {}
    for field in _FIELD_END.split(headers):
        name, colon, value = field.partition(b":")
        if colon:
            found.setdefault(name.rstrip(b" \t").lower(), []).append(value)
    return found


def raw_field_values(headers: bytes, name: bytes) -> list[bytes]:
    """Every value of header `name`, unfolded and without surrounding blanks, and
    nothing else: no other character is dropped or rewritten."""
    return [unfold(value).strip(b" \t") for value in _fields(headers).get(name.lower(), ())]


def read_campaign(headers: bytes, header: str) -> tuple[str, str | None]:
    """The campaign a header block names ('' for none), or the refusal of a message
    whose campaign field is unfit: several of them, not UTF-8, or not a name
    (`mta.text.name_problem`; never truncated)."""
    values = raw_field_values(headers, header.encode())
    if not values:
        return "", None
    if len(values) > 1:
        return "", (f"550 5.6.0 {shown(header, ascii_only=True)}: appears {len(values)} "
                    "times; a message belongs to one campaign")
    try:
        name = values[0].decode("utf-8")
    except UnicodeDecodeError:
        return "", f"550 5.6.0 {shown(header, ascii_only=True)}: is not valid UTF-8"
    problem = name_problem(name)
    if problem:
        return "", (f"550 5.6.0 {shown(header, ascii_only=True)}: "
                    f"{shown(problem, ascii_only=True)}")
    return name, None


def read_send_at(headers: bytes, header: str) -> tuple[float, str | None]:
    """The send time a header block names (Unix seconds; 0.0 for none), or the refusal
    of a message whose field is unfit: several of them, or neither RFC 3339 nor Unix
    seconds (`mta.queue.schedule.parse_send_at`)."""
    values = raw_field_values(headers, header.encode())
    if not values:
        return 0.0, None
    name = shown(header, ascii_only=True)
    if len(values) > 1:
        return 0.0, f"550 5.6.0 {name}: appears {len(values)} times; give one send time"
    when = parse_send_at(values[0].decode("ascii", "replace"))
    if when is None:
        return 0.0, (f"550 5.6.0 {name}: not a date-time (RFC 3339, like "
                     "2026-12-06T09:00:00+01:00) nor Unix seconds")
    return when, None


def unquoted(local: str) -> str:
    """A local part as its mailbox reads it: `"a\\@b"` -> `a@b`."""
    if local.startswith('"'):
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def from_domains(headers: bytes) -> set[str]:
    """The domains of the From: addresses, read both as the DKIM signer reads them (the
    key it signs with) and as a full address-list parser does."""
    return set().union(*map(address_domains, header_values(headers, b"From")))


def sender_routed(local: str) -> bool:
    """True for a local part carrying a route of its own (user%host, host!user, "u@h")."""
    return any(c in unquoted(local) for c in "@%!")


class OwnNames:
    """The names the engine is a mail host for: `[engine] hostname`, localhost,
    localhost.localdomain, every name under .localhost (RFC 6761: loopback), and the
    address literals of loopback, of "any" and of the listen address."""

    def __init__(self, hostname: str, listen: str) -> None:
        self.names = {normalize_domain(hostname), "localhost", "localhost.localdomain"}
        try:
            self.listen = ipaddress.ip_address(parse_hostport(listen)[0])
        except ValueError:
            self.listen = None

    def __contains__(self, domain: str) -> bool:
        if domain.startswith("[") and domain.endswith("]"):
            return self._own_address(domain[1:-1])
        return domain in self.names or domain.endswith(".localhost")

    def _own_address(self, literal: str) -> bool:
        text = literal[5:] if literal.lower().startswith("ipv6:") else literal
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return False
        return address.is_loopback or address.is_unspecified or address == self.listen


def header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


class IntakePolicy(Protocol):
    """The sending contract's checks at intake (mta.policy.PolicyGuard): a refusal
    reply, or None to go on."""

    def check_mail(self, account: str, sender: Any) -> str | None: ...

    def check_rcpt(self, account: str, rcpt: str) -> str | None: ...

    async def admit(self, message: NewMessage) -> str | None: ...


def reception_event(message: NewMessage) -> dict[str, Any]:
    event = {
        "type": "Reception", "id": message.id, "account": message.account,
        "campaign": message.campaign, "sender": message.sender,
        "recipients": len(message.recipients), "size": len(message.data),
    }
    if message.send_at > message.received:
        event["send_at"] = message.send_at
    if message.lane:
        event["lane"] = message.lane
    return event


def with_events(op: Callable[[Any], T], events: list[dict[str, Any]],
                record: Callable[[Any, list[dict[str, Any]]], None]) -> Callable[[Any], T]:
    """`op`, then `record(txn, events)` in the same transaction."""

    def both(txn: Any) -> T:
        result = op(txn)
        record(txn, events)
        return result

    return both


class Intake:
    def __init__(self, cfg: Config, spool: Spool, committer: GroupCommitter,
                 on_stored: Callable[[NewMessage], None] | None = None,
                 emit: Callable[[dict[str, Any]], None] | None = None,
                 policy: IntakePolicy | None = None,
                 record_events: Callable[[Any, list[dict[str, Any]]], None] | None = None
                 ) -> None:
        self.cfg = cfg
        # The event outbox (mta.outbox.wiring): Reception events in the store's transaction.
        self.record_events = record_events
        self.spool = spool
        self.committer = committer
        self.policy = policy
        self.on_stored = on_stored
        self.emit = emit or (lambda event: None)
        self.guard = StorageGuard(spool, cfg.spool.min_free_disk, cfg.spool.max_map_use)
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.smtp.trusted_networks]
        self._local_domains = {d.lower() for d in cfg.smtp.local_domains}
        for domain in (cfg.bounce.domain, cfg.bounce.fbl_domain):
            if domain:
                self._local_domains.add(domain.lower())
        self.settings = session_settings(cfg)
        self._own_names = OwnNames(cfg.engine.hostname, cfg.smtp.listen)
        self._mailboxes = {"postmaster", *(m.lower() for m in cfg.engine.local_mailboxes)}
        self._operator = self._operator_address(cfg.engine.operator_address)
        self._passwords = PasswordChecker({a.name: a.password_hash for a in cfg.accounts})
        self._checks = InFlight()
        self._connections: dict[str, int] = {}
        self._total_connections = 0
        self.auth_limit = AuthLimit(spool, committer.submit, cfg.smtp.max_auth_failures,
                                    cfg.smtp.auth_failure_window)
        self._auth_pool: ThreadPoolExecutor | None = None
        # Sender domains an account claims are closed to the other accounts.
        self._claimed: dict[str, set[str]] = {}
        for acct in cfg.accounts:
            for domain in acct.sender_domains:
                self._claimed.setdefault(normalize_domain(domain), set()).add(acct.name)

    # --- connections -------------------------------------------------------

    def is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._trusted)

    def connection_opened(self, ip: str) -> str | None:
        if self._total_connections >= self.cfg.smtp.max_connections:
            return "421 4.3.2 Too many connections, try again later"
        if self._connections.get(ip, 0) >= self.cfg.smtp.max_connections_per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        self._connections[ip] = self._connections.get(ip, 0) + 1
        self._total_connections += 1
        return None

    def connection_closed(self, ip: str) -> None:
        self._total_connections -= 1
        left = self._connections.get(ip, 1) - 1
        if left > 0:
            self._connections[ip] = left
        else:
            self._connections.pop(ip, None)

    # --- authentication ------------------------------------------------------

    async def close(self) -> None:
        """Let password checks under way finish (they record their outcome) and stop."""
        if self._auth_pool is not None:
            await asyncio.to_thread(self._auth_pool.shutdown, wait=True)

    async def check_login(self, ip: str, user: str, password: bytes, channel: str = "smtp"
                          ) -> bool | None:
        """Whether the password is right; None: `ip` may not try any more.

        A password verified before is known at no cost. Any other is checked under a
        reservation of the engine-wide limit (`AuthLimit`: failures and attempts in
        progress on every worker), and its outcome recorded even if the client has hung
        up meanwhile. `channel` says where the attempt came (SMTP, the injection API)."""
        if self._passwords.known(user, password):
            self.auth_checked(ip, user, True, channel)
            return True
        return await self.check_limited(ip, user, lambda: self._verify(user, password),
                                        channel)

    async def check_limited(self, ip: str, identity: str,
                            verify: Callable[[], Awaitable[bool]], channel: str) -> bool | None:
        """`verify()` under the engine-wide limit of failed attempts per address, its
        outcome recorded, then announced (an Auth event: a failure it reports already
        slows the address's next attempt); None: `ip` may not try any more."""
        reservation = await self.auth_limit.reserve(ip)
        if reservation is None:
            return None
        ok = False
        try:
            ok = await verify()
        finally:
            await self.auth_limit.release(ip, reservation, failed=not ok)
        self.auth_checked(ip, identity, ok, channel)  # once a failure counts, on every worker
        return ok

    async def _verify(self, user: str, password: bytes) -> bool:
        """scrypt, on a small thread pool: it costs tens of milliseconds (more with a high
        log_n), which must not stall every session of the worker. The same password asked
        on several connections at once is checked once for all of them."""
        if self._auth_pool is None:
            self._auth_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")
        pool = self._auth_pool
        return await self._checks.run(
            self._passwords.token(user, password),
            lambda: asyncio.get_running_loop().run_in_executor(
                pool, self._passwords.check, user, password))

    def auth_checked(self, ip: str, user: str, ok: bool, channel: str = "smtp") -> None:
        """An authentication attempt, for the event and audit logs."""
        event = {"type": "Auth", "client": ip, "identity": user[:200], "ok": ok}
        self.emit(event if channel == "smtp" else event | {"channel": channel})

    def auth_delay(self, ip: str) -> float | None:
        """Seconds to wait before an AUTH attempt from ip (longer with each recent
        failure); None: refuse outright, the address has no guesses left."""
        recent = self.auth_limit.failures(ip)
        if recent >= self.cfg.smtp.max_auth_failures:
            return None
        return min(0.25 * recent, 2.0)

    def account_of(self, client: Client) -> str | None:
        """The account a client sends for: its AUTH identity, or the trusted default."""
        if client.login is not None:
            return client.login
        return self.cfg.smtp.trusted_account if client.trusted else None

    # --- envelope ------------------------------------------------------------

    def sender_domain_allowed(self, client: Client, domain: str) -> bool:
        """May this client send as `domain`? An account with `sender_domains` only as
        those; an authenticated account never as a domain (or subdomain) another claims."""
        account = self.account_of(client)
        if account is None:
            return True
        domain = normalize_domain(domain)
        cfg = self.cfg.account(account)
        if cfg is not None and cfg.sender_domains:
            return domain in {normalize_domain(d) for d in cfg.sender_domains}
        if client.login is None:
            return True  # trusted networks are the operator's own: the account may be shared
        labels = domain.split(".")
        for i in range(len(labels)):
            owners = self._claimed.get(".".join(labels[i:]))
            if owners and account not in owners:
                return False
        return True

    def _sender_rules_apply(self, client: Client) -> bool:
        account = self.account_of(client)
        if account is None:
            return False
        cfg = self.cfg.account(account)
        return bool(cfg is not None and cfg.sender_domains
                    or client.login is not None and self._claimed)

    def check_mail(self, client: Client, sender: Address, size: int) -> str | None:
        if not self.guard.ok():
            return "452 4.3.1 Insufficient system storage, try again later"
        account = self.account_of(client)
        if (account is not None and not sender.is_null
                and not self.sender_domain_allowed(client, sender.domain)):
            return f"553 5.7.1 Sender domain {sender.domain} is not allowed for this account"
        if self.policy is not None and account is not None:
            return self.policy.check_mail(account, sender)
        return None

    def check_rcpt(self, client: Client, envelope: Envelope, rcpt: Address) -> str | None:
        account = self.account_of(client)
        if account is None and sender_routed(rcpt.local):
            return "550 5.7.1 Relay access denied (sender-specified routing)"
        if rcpt.domain in self._local_domains:
            return None
        if rcpt.domain in self._own_names:  # for anyone, trusted or not
            if unquoted(rcpt.local).lower() in self._mailboxes:
                return None
            return f"550 5.1.1 <{shown(str(rcpt), 200, ascii_only=True)}>: no such mailbox here"
        if account is None:
            return "550 5.7.1 Relay access denied"
        if self.policy is not None:
            return self.policy.check_rcpt(account, str(rcpt))
        return None

    def data_limit(self, client: Client, envelope: Envelope) -> int:
        """The most data a transaction may bring (0: no limit). Mail that only the
        engine itself receives, from a client that did not authenticate (bounces,
        complaints, postmaster mail), is held to `[bounce] max_report_size`."""
        size = self.cfg.smtp.max_message_size
        if client.login is None and all(map(self._engine_bound, envelope.recipients)):
            report = self.cfg.bounce.max_report_size
            return min(size, report) if size else report
        return size

    def _engine_bound(self, rcpt: str) -> bool:
        domain = rcpt.rpartition("@")[2]
        return domain in self._local_domains or domain in self._own_names

    def _routed(self, rcpt: str) -> str:
        """Where a recipient's mail goes: a mailbox at the engine's own names to the
        operator address, or (none set) to the same mailbox at the bounce domain, which
        the engine keeps (`mta.delivery.inbound`); never out by MX."""
        local, _, domain = rcpt.rpartition("@")
        if domain in self._local_domains or domain not in self._own_names:
            return rcpt
        return self._operator or f"{unquoted(local).lower()}@{self.cfg.bounce.domain.lower()}"

    def _operator_address(self, address: str) -> str:
        """[engine] operator_address, unless mail to it would come back to the engine's
        own names: then '' (the mail is kept on the engine)."""
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if domain in self._own_names and domain not in self._local_domains:
            log.warning("[engine] operator_address %s is at the engine's own name: ignored, "
                        "postmaster mail is kept on the engine", address)
            return ""
        return address

    # --- data ----------------------------------------------------------------

    async def accept(self, client: Client, envelope: Envelope, content: bytes) -> str:
        """Store the message durably; the reply to the final dot."""
        prepared = await self.prepare(client, envelope, content)
        if isinstance(prepared, str):
            return prepared
        return await self.store([prepared]) or f"250 2.0.0 Ok: queued as {prepared.id}"

    async def prepare(self, client: Client, envelope: Envelope, content: bytes,
                      protocol: str = "", send_at: float | None = None) -> NewMessage | str:
        """The checks on a message's content (its campaign field, its send time, its From:
        domains, the policy's admission) and, when they pass, the record to store: the
        content under our Received header, without its send-time field. A string is the
        refusal to answer instead. `protocol` names the way the message came in the
        Received header (default: the SMTP session's); `send_at` (Unix seconds, the
        injection API's field) replaces the send time of the header."""
        headers = header_block(content)
        campaign, refusal = read_campaign(headers, self.cfg.smtp.campaign_header)
        if refusal:
            return refusal
        header_send_at, refusal = read_send_at(headers, self.cfg.smtp.send_at_header)
        if refusal:
            return refusal
        if header_send_at:  # the field is for the engine only: never sent on
            content = without_fields(content, self.cfg.smtp.send_at_header)
        drained = self._drained(client, headers)  # mail handed over by a drained node
        if raw_field_values(headers, TRACE_FIELD.encode()):
            content = without_fields(content, TRACE_FIELD)
        if drained is not None:
            campaign = drained.campaign
        lane, refusal = self._lane(headers)
        if refusal:
            return refusal
        if lane is not None:  # the field was there: for the engine only, never sent on
            content = without_fields(content, self.cfg.smtp.lane_header)
        pool_header = self.cfg.egress.campaign_pool_header
        pool_values = raw_field_values(headers, pool_header.encode())
        asked_pool, refusal = check_pool_field(
            [v.decode("ascii", "replace") for v in pool_values], pool_header)
        if refusal:
            return refusal
        if pool_values:  # the campaign's pool (mta.egress): for the engine only
            content = without_fields(content, pool_header)
        if self._sender_rules_apply(client):  # the From: domain picks the DKIM key
            for domain in sorted(from_domains(headers)):
                if not self.sender_domain_allowed(client, domain):
                    return f"550 5.7.1 From: domain {domain[:100]} is not allowed for this account"
        account = drained.account if drained is not None else self.account_of(client) or ""
        message = NewMessage(
            sender=envelope.sender or "", data=b"", account=account, campaign=campaign,
            recipients=list(dict.fromkeys(map(self._routed, envelope.recipients))),
            client=client.ip,
            message_id_header=header_value(headers, b"Message-ID")[:500],
            id=new_message_id(), send_at=header_send_at if send_at is None else send_at,
            lane=self._account_lane(account, lane or ""),
        )
        if drained is not None:  # its history goes on here
            message.received = drained.received or message.received
            message.send_at = drained.send_at or message.send_at
            message.lane = drained.lane
            message.extra = {"drained_from": drained.node, "attempts_before": drained.attempts}
            if drained.held:  # held there: held here too (mta.queue.drain)
                message.hold = await self._drained_hold(drained)
        if drained is not None and drained.pool and not asked_pool:
            asked_pool = drained.pool  # the pool it had there, if it may use it here
        if asked_pool and pool_for(self.cfg.egress, self.cfg.account(account), asked_pool
                                   ) == asked_pool:
            message.extra["pool"] = asked_pool  # honoured: one of the account's pools
        if self.policy is not None:
            refusal = await self.policy.admit(message)  # check_message + cluster limits
            if refusal:
                return refusal
        message.data = self._received_header(client, message.id, envelope, protocol) + content
        return message

    async def _drained_hold(self, trace: DrainTrace) -> str:
        """The hold of drained mail that was held there (a suspension's rule comes too)."""
        hold, carried = await self.committer.submit(
            lambda txn: received_hold(self.spool, txn, trace, time.time()))
        if carried is not None:
            self.emit({"type": "QueueRuleAdded", **carried.as_dict(), "held": 0})
        return str(hold)

    def _drained(self, client: Client, headers: bytes) -> DrainTrace | None:
        """The drain trace of a message another node of ours handed over (honoured from
        a trusted client only: anyone else could claim an account with it)."""
        if not client.trusted:
            return None
        values = raw_field_values(headers, TRACE_FIELD.encode())
        if len(values) != 1:
            return None
        return parse_trace(values[0].decode("utf-8", "replace"))

    def _lane(self, headers: bytes) -> tuple[str | None, str | None]:
        """The lane field's value (None: no field), or the refusal of an unfit one."""
        header = self.cfg.smtp.lane_header
        values = raw_field_values(headers, header.encode())
        if not values:
            return None, None
        name = shown(header, ascii_only=True)
        if len(values) > 1:
            return None, f"550 5.6.0 {name}: appears {len(values)} times; give one lane"
        asked = values[0].decode("ascii", "replace").strip().lower()
        if choose_lane(asked, BULK, []) is None:
            return None, f"550 5.6.0 {name}: not a lane ({' or '.join(LANES)})"
        return asked, None

    def _account_lane(self, account: str, asked: str) -> str:
        """The lane of the account's message ("" for bulk): the one it asked for when the
        account may use it, else the account's own."""
        cfg = self.cfg.account(account) if account else None
        default, allowed = (cfg.lane, cfg.lanes) if cfg is not None else (BULK, [])
        lane = choose_lane(asked, default, allowed) or default
        return "" if lane == BULK else lane

    async def store(self, messages: list[NewMessage]) -> str | None:
        """Commit `messages` to the spool in one transaction (one fsync), then announce
        each (a Reception event, the scheduler woken). None once they are stored; else
        the reply for all of them, none of which is kept."""
        events = [reception_event(message) for message in messages]
        op = self.spool.store_many_op(messages)
        if self.record_events is not None:
            op = with_events(op, events, self.record_events)
        try:
            # Awaited in this task: a shield would run it in a task of its own, and each
            # task between the commit and the 250 costs a turn of the (busy) loop. A
            # timeout ends only the wait; the queued write still commits.
            await self.committer.submit(op, timeout=self.cfg.smtp.commit_timeout)
        except SpoolFullError:
            self.guard.commit_failed()
            return "452 4.3.1 Insufficient system storage, try again later"
        except TimeoutError:
            log.warning("commit of %s took longer than %.0fs", _ids(messages),
                        self.cfg.smtp.commit_timeout)
            return "451 4.3.0 Storage too slow, try again later"
        except Exception:
            log.exception("could not store message %s", _ids(messages))
            return "451 4.3.0 Could not store the message, try again later"
        for message, event in zip(messages, events, strict=True):
            self.emit(event)
            if self.on_stored is not None:
                self.on_stored(message)
        return None

    def _received_header(self, client: Client, message_id: str, envelope: Envelope,
                         protocol: str = "") -> bytes:
        helo = (client.helo or "unknown").encode("ascii", "replace").decode()[:100]
        helo = re.sub(r"[^\x21-\x7e]", "?", helo)
        proto = protocol or ("ESMTP" if client.extended else "SMTP")
        if client.tls:
            proto += "S"
        if client.login is not None:
            proto += "A"
        rcpt = f"\r\n\tfor <{envelope.recipients[0]}>" if len(envelope.recipients) == 1 else ""
        return (f"Received: from {helo} ([{client.ip or 'unknown'}])\r\n\tby {self.cfg.engine.hostname} "
                f"with {proto} id {message_id}{rcpt};\r\n\t{_date(int(time.time()))}\r\n"
                ).encode("utf-8", "replace")


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """The Received header's date: made once a second, not once a message."""
    return formatdate(second, localtime=False)


def _ids(messages: list[NewMessage]) -> str:
    ids = ", ".join(m.id for m in messages[:3])
    return ids + (f" and {len(messages) - 3} more" if len(messages) > 3 else "")


def session_settings(cfg: Config) -> Settings:
    smtp = cfg.smtp
    return Settings(
        hostname=cfg.engine.hostname, max_message_size=smtp.max_message_size,
        max_command_line=smtp.max_command_line, max_recipients=smtp.max_recipients,
        max_unknown_commands=smtp.max_unknown_commands, max_errors=smtp.max_errors,
        max_junk_commands=smtp.max_junk_commands,
        idle_timeout=smtp.idle_timeout, data_timeout=smtp.data_timeout,
        greet_pause=smtp.greet_pause)
