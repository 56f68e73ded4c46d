"""Debian's rabbitmq-server as a private broker on loopback, for the AMQP event tests.

Each instance is its own Erlang node: a unique node name, its own data, log and HOME
(the Erlang cookie) directories, free ports on 127.0.0.1 for AMQP, Erlang distribution
and a private epmd, and no config file, plugin or /etc/rabbitmq/rabbitmq-env.conf of the
system. So it never meets a broker the package's service may have started on 5672 (nor
its epmd on 4369). `stop()` then `start()` is the "broker restarted mid-run" of the
tests: same node name, same data directory (durable queues and persistent messages
survive), same port. `kill()` is a crash (SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bench.net import free_port

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # Debian's, not the su wrapper in sbin
START_TIMEOUT = 90.0  # seconds; a loaded 2-core machine boots the node in 4 to 20
STOP_TIMEOUT = 30.0
HOST = "127.0.0.1"
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


class RabbitMqServer:
    def __init__(self, directory: Path | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        """`tls` = (certificate chain PEM, key PEM): an amqps listener too, on tls_port."""
        if not SERVER.is_file():
            raise RuntimeError(f"{SERVER} missing: install rabbitmq-server "
                               "(scripts/system-packages.sh)")
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="mta-rabbitmq-"))
        self.node = f"mta-test-{uuid.uuid4().hex[:12]}@localhost"
        self.port = free_port(HOST)
        self.dist_port = free_port(HOST)
        self.epmd_port = free_port(HOST)
        self.tls = tls
        self.tls_port = free_port(HOST) if tls else 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/"

    @property
    def tls_url(self) -> str:
        return f"amqps://guest:guest@{HOST}:{self.tls_port}/"

    def config_file(self) -> Path:
        """rabbitmq.conf: nothing, or the amqps listener (no client certificates)."""
        path = self.dir / "rabbitmq.conf"
        lines = []
        if self.tls:
            chain, key = self.tls
            lines = [f"listeners.ssl.default = {HOST}:{self.tls_port}",
                     f"ssl_options.certfile = {chain}", f"ssl_options.keyfile = {key}",
                     "ssl_options.verify = verify_none",
                     "ssl_options.fail_if_no_peer_cert = false"]
        path.write_text("".join(f"{line}\n" for line in lines))
        return path

    def environment(self) -> dict[str, str]:
        for sub in ("data", "log", "home"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.dir / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": HOST,
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "data"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.config_file()),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "no-advanced-config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            # distribution on loopback only (epmd is, by ERL_EPMD_ADDRESS)
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def start(self) -> RabbitMqServer:
        if self.proc is not None:
            return self
        log = (self.dir / "stdout.log").open("ab")
        self.proc = subprocess.Popen([str(SERVER)], env=self.environment(), cwd=self.dir,
                                     stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"rabbitmq-server exited at start:\n{self.log_tail()}")
            if self.answers() and (not self.tls or self._accepts(self.tls_port)):
                return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"rabbitmq-server did not answer AMQP on {HOST}:{self.port} "
                           f"within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def answers(self) -> bool:
        """True once the AMQP listener answers the protocol header with Connection.Start
        (a method frame on channel 0): the broker is up and takes connections."""
        try:
            with socket.create_connection((HOST, self.port), timeout=2.0) as sock:
                sock.sendall(AMQP_HEADER)
                return sock.recv(3) == b"\x01\x00\x00"
        except OSError:
            return False

    @staticmethod
    def _accepts(port: int) -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=2.0):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: the broker syncs its queues and exits); SIGKILL if it
        has not gone within STOP_TIMEOUT."""
        self._signal(signal.SIGTERM)
        self._reap(STOP_TIMEOUT)

    def kill(self) -> None:
        """A crash: SIGKILL to the node and its helpers."""
        self._signal(signal.SIGKILL)
        self._reap(STOP_TIMEOUT)

    def pause(self) -> None:
        """A hung broker: SIGSTOP; its sockets stay open, nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def _reap(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        # the script is gone; the Erlang VM of its group may still be finishing
        deadline = time.monotonic() + timeout
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive():
            self._signal(signal.SIGKILL)
        self.proc = None

    def _group_alive(self) -> bool:
        """True while a live (not zombie) process of the broker's process group is left
        (the Erlang VM outlives its start script for a moment)."""
        assert self.proc is not None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[2] == str(self.proc.pid) and fields[0] != "Z":
                return True
        return False

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for path in [self.dir / "stdout.log", *sorted((self.dir / "log").glob("*.log"))]:
            if path.is_file():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(texts[-lines:])

    def _stop_epmd(self) -> None:
        """The node started a private epmd daemon on epmd_port; it outlives the node, and
        refuses to stop while it still lists the node (a moment after a SIGKILL)."""
        epmd = shutil.which("epmd")
        if epmd is None:
            return
        deadline = time.monotonic() + 10.0
        while self._accepts(self.epmd_port) and time.monotonic() < deadline:
            subprocess.run([epmd, "-port", str(self.epmd_port), "-kill"],
                           env=self.environment(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10, check=False)
            time.sleep(0.2)

    def __enter__(self) -> RabbitMqServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill() if exc[0] is not None else self.stop()
        self._stop_epmd()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
