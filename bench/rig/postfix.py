"""Postfix 3.7 (Debian's postfix package) as a relay instance in a temporary directory.

The bench aims the same load at it as at our engine, so the two can be compared in
one run. The instance has its own `config_directory` and `queue_directory` (fsync on,
as Postfix always does), listens on one loopback port, accepts relay from
127.0.0.0/8 and sends every test domain to its sink through `transport_maps`
(`smtp:[127.0.0.2]:PORT`: no DNS). Optionally an OpenDKIM milter signs everything
(`OpenDkim`, Debian's opendkim, on a loopback inet socket).

    with PostfixRelay(workdir, port, routes={"d1.test": "127.0.0.2"}, sink_port=2600) as pf:
        ... submit to 127.0.0.1:pf.port ...
        pf.queue_depth()

Both run as root-started process groups; `stop()` always ends them (postfix stop,
then SIGKILL of the master's process group if it lingers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.net import free_port, wait_for_port

POSTFIX = "/usr/sbin/postfix"
OPENDKIM = "/usr/sbin/opendkim"
START_TIMEOUT = 30.0
QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")

# name type private unpriv chroot wakeup maxproc command: a relay needs no more.
MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


TUNED = Path(__file__).resolve().parents[1] / "peers" / "postfix-tuned.cf"


def read_settings(text: str) -> dict[str, str]:
    """`name = value` lines of a main.cf fragment; '#' comments and blank lines skipped."""
    settings: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"line {number}: not `name = value`: {line!r}")
        settings[name.strip()] = value.strip()
    return settings


def tuned_settings() -> dict[str, str]:
    """The throughput settings of bench/peers/postfix-tuned.cf (`--compare postfix`)."""
    return read_settings(TUNED.read_text())


def main_cf(root: Path, milter: str = "", extra: Mapping[str, str] | None = None) -> str:
    """main.cf of a loopback relay instance rooted at `root`."""
    settings: dict[str, str] = {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "meta_directory": "/etc/postfix",
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "postfix-bench.localhost",
        "mydomain": "localhost",
        "myorigin": "$myhostname",
        "mydestination": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "transport_maps": f"texthash:{root / 'etc' / 'transport'}",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        "biff": "no",
        "syslog_name": "postfix-bench",
        "maillog_file": str(root / "log" / "maillog"),
        "maillog_file_prefixes": str(root),
        "smtpd_peername_lookup": "no",
        "smtp_host_lookup": "native",
        "message_size_limit": "52428800",
        "master_service_disable": "",
    }
    if milter:
        settings |= {"smtpd_milters": milter, "milter_default_action": "tempfail",
                     "milter_protocol": "6"}
    settings |= dict(extra or {})
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def master_cf(host: str, port: int) -> str:
    return f"{host}:{port} inet n - n - - smtpd\n" + MASTER_SERVICES


def transport_table(routes: Mapping[str, str], sink_port: int) -> str:
    """`domain smtp:[address]:port` for each test domain."""
    return "".join(f"{domain} smtp:[{address}]:{sink_port}\n" for domain, address in routes.items())


def _check_traversable(path: Path) -> None:
    """Postfix's daemons run as the postfix user: every ancestor of the instance must let
    others in (a mkdtemp() directory is 0700: chmod it 0755)."""
    for folder in [path.resolve(), *path.resolve().parents]:
        if not folder.stat().st_mode & 0o001:
            raise PermissionError(f"{folder} is not searchable by the postfix user: chmod o+x")


def _postfix_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postfix")
    return entry.pw_uid, entry.pw_gid


class PostfixRelay:
    """A Postfix instance of our own: `start()`, `queue_depth()`, `stop()`."""

    def __init__(self, workdir: Path, routes: Mapping[str, str], sink_port: int, *,
                 host: str = "127.0.0.1", port: int = 0, milter: str = "",
                 extra: Mapping[str, str] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.root = Path(workdir)
        self.preexec = preexec  # run in `postfix start` before exec (a cgroup join)
        self.routes = dict(routes)
        self.sink_port = sink_port
        self.host = host
        self.port = port or free_port(host)
        self.milter = milter
        self.extra = dict(extra or {})
        self.started = False

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    def write_config(self) -> None:
        _check_traversable(self.root.parent)
        for sub in ("etc", "queue", "data", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postfix user walks into queue/ and data/
        uid, gid = _postfix_ids()
        os.chown(self.root / "data", uid, gid)
        (self.config_dir / "main.cf").write_text(main_cf(self.root, self.milter, self.extra))
        (self.config_dir / "master.cf").write_text(master_cf(self.host, self.port))
        (self.config_dir / "transport").write_text(transport_table(self.routes, self.sink_port))

    def _postfix(self, *args: str, check: bool = True,
                 preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args], check=check,
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, preexec_fn=preexec)  # noqa: PLW1509

    def start(self) -> PostfixRelay:
        if not Path(POSTFIX).exists():
            raise FileNotFoundError(f"{POSTFIX} not found (Debian package postfix)")
        self.write_config()
        self._postfix("set-permissions", check=False)
        try:
            self._postfix("start", preexec=self.preexec)  # the master and all it starts
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"postfix start failed: {exc.stderr.strip()}") from None
        self.started = True
        wait_for_port(self.host, self.port, START_TIMEOUT)
        return self

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queue_depth(self) -> int:
        """Messages in Postfix's queue (files in maildrop, incoming, active, deferred, hold)."""
        total = 0
        for name in QUEUE_DIRS:
            for _, _, files in os.walk(self.queue_dir / name):
                total += len(files)
        return total

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            text = (self.root / "log" / "maillog").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if not self.started:
            return
        pid = self.master_pid()
        self._postfix("stop", check=False)
        if pid is not None and not _wait_gone(pid, 10.0):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            _wait_gone(pid, 5.0)
        self.started = False

    def __enter__(self) -> PostfixRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def opendkim_conf(root: Path, port: int) -> str:
    settings = {
        "Syslog": "no",
        "Mode": "s",
        "Socket": f"inet:{port}@127.0.0.1",
        "KeyTable": f"file:{root / 'KeyTable'}",
        "SigningTable": f"refile:{root / 'SigningTable'}",
        "Canonicalization": "relaxed/relaxed",
        "SignatureAlgorithm": "rsa-sha256",
        "InternalHosts": "127.0.0.0/8",
        "RequireSafeKeys": "false",
        "Background": "no",
        "PidFile": str(root / "opendkim.pid"),
        "UMask": "002",
    }
    return "".join(f"{key} {value}\n" for key, value in settings.items())


class OpenDkim:
    """The OpenDKIM milter signing for `domain` with `key_file` (`opendkim -x conf -f`)."""

    def __init__(self, workdir: Path, domain: str, selector: str, key_file: Path,
                 port: int = 0, preexec: Callable[[], None] | None = None) -> None:
        self.root = Path(workdir)
        self.preexec = preexec  # run in opendkim's process before exec (a cgroup join)
        self.domain, self.selector = domain, selector
        self.key_file = Path(key_file)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        """The milter address for Postfix's smtpd_milters."""
        return f"inet:127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        key = self.root / "signing.key"
        shutil.copyfile(self.key_file, key)
        key.chmod(0o600)
        (self.root / "KeyTable").write_text(
            f"{self.selector}._domainkey.{self.domain} {self.domain}:{self.selector}:{key}\n")
        (self.root / "SigningTable").write_text(f"*@{self.domain} "
                                                f"{self.selector}._domainkey.{self.domain}\n")
        conf = self.root / "opendkim.conf"
        conf.write_text(opendkim_conf(self.root, self.port))
        return conf

    def start(self) -> OpenDkim:
        if not Path(OPENDKIM).exists():
            raise FileNotFoundError(f"{OPENDKIM} not found (Debian package opendkim)")
        conf = self.write_config()
        log = open(self.root / "opendkim.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([OPENDKIM, "-x", str(conf), "-f"], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=self.preexec)  # noqa: PLW1509
        log.close()
        wait_for_port("127.0.0.1", self.port, START_TIMEOUT, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> OpenDkim:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
