"""What the intake listener accepts: relay control, limits, accounts, durable storage.

The SMTP protocol class asks this object at each step and sends the reply it
returns (None means "go on"). Storage goes through the group committer, so
the 250 after DATA is sent only once the message is committed with fsync.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate, getaddresses
from typing import Any

from mta.config import Config
from mta.dkim.signer import address_domain, normalize_domain
from mta.queue.commit import GroupCommitter
from mta.queue.spool import NewMessage, Spool, SpoolFullError, new_message_id
from mta.smtp.address import Address
from mta.smtp.auth import PasswordChecker
from mta.smtp.server import make_authenticator

log = logging.getLogger("mta.intake")

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


def _field_re(name: bytes) -> re.Pattern[bytes]:
    # [^\r\n], not `.`: `.` matches CR, so "a\r\n b" would stop at the fold.
    return re.compile(rb"(?im)^" + re.escape(name)
                      + rb"[ \t]*:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")


def header_value(headers: bytes, name: bytes) -> str:
    """The first value of header `name` in a raw header block (unfolded), or ''."""
    match = _field_re(name).search(headers)
    if not match:
        return ""
    return re.sub(rb"\r\n[ \t]+", b" ", match.group(1)).strip().decode("utf-8", "replace")


def header_values(headers: bytes, name: bytes) -> list[bytes]:
    """Every value of header `name` in a raw header block, unfolded."""
    return [re.sub(rb"\r\n[ \t]+", b" ", m.group(1)).strip()
            for m in _field_re(name).finditer(headers)]


def from_domains(headers: bytes) -> set[str]:
    """The domains of the From: addresses, read both as the DKIM signer reads them (the
    key it signs with) and as a full address-list parser does."""
    domains: set[str] = set()
    for value in header_values(headers, b"From"):
        domains.add(address_domain(value))
        for _, address in getaddresses([value.decode("utf-8", "replace")]):
            if "@" in address:
                domains.add(normalize_domain(address.rpartition("@")[2]))
    domains.discard("")
    return domains


def sender_routed(local: str) -> bool:
    """True for a local part carrying a route of its own (user%host, host!user, "u@h")."""
    if local.startswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return any(c in local for c in "@%!")


def header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


class Intake:
    def __init__(self, cfg: Config, spool: Spool, committer: GroupCommitter,
                 on_stored: Callable[[NewMessage], None] | None = None,
                 emit: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.committer = committer
        self.on_stored = on_stored
        self.emit = emit or (lambda event: None)
        self.guard = StorageGuard(spool, cfg.spool.min_free_disk, cfg.spool.max_map_use)
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.smtp.trusted_networks]
        self._local_domains = {d.lower() for d in cfg.smtp.local_domains}
        for domain in (cfg.bounce.domain, cfg.bounce.fbl_domain):
            if domain:
                self._local_domains.add(domain.lower())
        self._passwords = PasswordChecker({a.name: a.password_hash for a in cfg.accounts})
        self.authenticate = make_authenticator(self._check_password)
        self._connections: dict[str, int] = {}
        self._total_connections = 0
        self._auth_failures: dict[str, list[float]] = {}
        self._auth_pending: dict[str, int] = {}  # AUTH attempts in progress, by address
        self._auth_pool: ThreadPoolExecutor | None = None
        self._campaign_header = cfg.smtp.campaign_header.encode()
        # Sender domains an account claims are closed to the other accounts.
        self._claimed: dict[str, set[str]] = {}
        for acct in cfg.accounts:
            for domain in acct.sender_domains:
                self._claimed.setdefault(normalize_domain(domain), set()).add(acct.name)
        self.policy: Any = None  # the policy guard, when wired in

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

    def _check_password(self, ip: str, user: str, password: bytes) -> bool:
        ok = self._passwords.check(user, password)
        self._auth_checked(ip, user, ok)
        return ok

    async def check_login(self, ip: str, user: str, password: bytes) -> bool:
        """The password check, on a small thread pool: scrypt costs tens of milliseconds
        (more with a high log_n), which must not stall every session of the worker."""
        if self._auth_pool is None:
            self._auth_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")
        future = asyncio.get_running_loop().run_in_executor(
            self._auth_pool, self._passwords.check, user, password)

        def record(done: asyncio.Future[bool]) -> None:
            # Recorded even if the client hangs up meanwhile (its session task cancelled).
            if not done.cancelled() and done.exception() is None:
                self._auth_checked(ip, user, done.result())

        future.add_done_callback(record)
        return await asyncio.shield(future)

    def _auth_checked(self, ip: str, user: str, ok: bool) -> None:
        if not ok:
            self._auth_failures.setdefault(ip, []).append(time.monotonic())
        self.emit({"type": "Auth", "client": ip, "identity": user[:200], "ok": ok})

    def auth_delay(self, ip: str) -> float | None:
        """Seconds to wait before an AUTH attempt from ip; None: refuse outright.

        An address with recent failures has its attempts in progress counted too, so
        parallel connections cannot get more guesses in than the limit. The caller calls
        auth_finished(ip) when the attempt is over."""
        window = self.cfg.smtp.auth_failure_window
        now = time.monotonic()
        recent = [t for t in self._auth_failures.get(ip, []) if now - t < window]
        self._auth_failures[ip] = recent
        pending = self._auth_pending.get(ip, 0)
        limit = self.cfg.smtp.max_auth_failures
        if len(recent) >= limit or (recent and len(recent) + pending >= limit):
            return None
        self._auth_pending[ip] = pending + 1
        return min(0.25 * len(recent), 2.0)

    def auth_finished(self, ip: str) -> None:
        left = self._auth_pending.get(ip, 1) - 1
        if left > 0:
            self._auth_pending[ip] = left
        else:
            self._auth_pending.pop(ip, None)

    def account_of(self, session: Any) -> str | None:
        """The account a session sends for: its AUTH identity, or the trusted default."""
        if session.authenticated and session.auth_data is not None:
            return session.auth_data.login.decode("utf-8", "replace")
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        if self.is_trusted(peer):
            return self.cfg.smtp.trusted_account
        return None

    # --- envelope ------------------------------------------------------------

    def sender_domain_allowed(self, session: Any, domain: str) -> bool:
        """May this session send as `domain`? An account with `sender_domains` only as
        those; an authenticated account never as a domain (or subdomain) another claims."""
        account = self.account_of(session)
        if account is None:
            return True
        domain = normalize_domain(domain)
        cfg = self.cfg.account(account)
        if cfg is not None and cfg.sender_domains:
            return domain in {normalize_domain(d) for d in cfg.sender_domains}
        if not session.authenticated:
            return True  # trusted networks are the operator's own: the account may be shared
        labels = domain.split(".")
        for i in range(len(labels)):
            owners = self._claimed.get(".".join(labels[i:]))
            if owners and account not in owners:
                return False
        return True

    def _sender_rules_apply(self, session: Any) -> bool:
        account = self.account_of(session)
        if account is None:
            return False
        cfg = self.cfg.account(account)
        return bool(cfg is not None and cfg.sender_domains
                    or session.authenticated and self._claimed)

    def check_mail(self, session: Any, sender: Address, size: int) -> str | None:
        if not self.guard.ok():
            return "452 4.3.1 Insufficient system storage, try again later"
        account = self.account_of(session)
        if (account is not None and not sender.is_null
                and not self.sender_domain_allowed(session, sender.domain)):
            return f"553 5.7.1 Sender domain {sender.domain} is not allowed for this account"
        if self.policy is not None and account is not None:
            return self.policy.check_mail(account, sender)
        return None

    def check_rcpt(self, session: Any, envelope: Any, rcpt: Address) -> str | None:
        account = self.account_of(session)
        if account is None and sender_routed(rcpt.local):
            return "550 5.7.1 Relay access denied (sender-specified routing)"
        if rcpt.domain in self._local_domains or rcpt.domain == session_hostname(self.cfg):
            return None
        if account is None:
            return "550 5.7.1 Relay access denied"
        if self.policy is not None:
            return self.policy.check_rcpt(account, str(rcpt))
        return None

    # --- data ----------------------------------------------------------------

    async def accept(self, session: Any, envelope: Any, content: bytes) -> str:
        """Store the message durably; the reply to the final dot."""
        headers = header_block(content)
        if self._sender_rules_apply(session):  # the From: domain picks the DKIM key
            for domain in sorted(from_domains(headers)):
                if not self.sender_domain_allowed(session, domain):
                    return f"550 5.7.1 From: domain {domain[:100]} is not allowed for this account"
        account = self.account_of(session) or ""
        message = NewMessage(
            sender=envelope.mail_from, recipients=list(envelope.rcpt_tos), data=b"",
            account=account, campaign=header_value(headers, self._campaign_header)[:200],
            client=session.peer[0] if isinstance(session.peer, tuple) else "",
            message_id_header=header_value(headers, b"Message-ID")[:500],
            id=new_message_id(),
        )
        if self.policy is not None:
            refusal = await self.policy.admit(message)  # check_message + cluster limits
            if refusal:
                return refusal
        message.data = self._received_header(session, message.id, envelope) + content
        return await self._store(message)

    async def _store(self, message: NewMessage) -> str:
        try:
            await asyncio.wait_for(asyncio.shield(
                self.committer.submit(self.spool.store_op(message))),
                self.cfg.smtp.commit_timeout)
        except SpoolFullError:
            self.guard.commit_failed()
            return "452 4.3.1 Insufficient system storage, try again later"
        except TimeoutError:
            log.warning("commit of %s took longer than %.0fs", message.id,
                        self.cfg.smtp.commit_timeout)
            return "451 4.3.0 Storage too slow, try again later"
        except Exception:
            log.exception("could not store message %s", message.id)
            return "451 4.3.0 Could not store the message, try again later"
        self.emit({
            "type": "Reception", "id": message.id, "account": message.account,
            "campaign": message.campaign, "sender": message.sender,
            "recipients": len(message.recipients), "size": len(message.data),
        })
        if self.on_stored is not None:
            self.on_stored(message)
        return f"250 2.0.0 Ok: queued as {message.id}"

    def _received_header(self, session: Any, message_id: str, envelope: Any) -> bytes:
        peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        helo = (session.host_name or "unknown").encode("ascii", "replace").decode()[:100]
        helo = re.sub(r"[^\x21-\x7e]", "?", helo)
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl:
            proto += "S"
        if session.authenticated:
            proto += "A"
        rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        return (f"Received: from {helo} ([{peer}])\r\n\tby {self.cfg.engine.hostname} "
                f"with {proto} id {message_id}{rcpt};\r\n\t{formatdate(localtime=False)}\r\n"
                ).encode("utf-8", "replace")


def session_hostname(cfg: Config) -> str:
    return cfg.engine.hostname.lower()
