"""Debian's redis-server on loopback, for multi-node tests and benchmarks.

A private instance: its own directory, a free port on 127.0.0.1, append-only file on
(`appendfsync always`), so a stop and a start on the same directory keep every write
acknowledged before the stop. `stop()` then `start()` is the "Redis restarted mid-run"
of the tests; the port stays the same so the engine's URL stays valid.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.net import free_port

START_TIMEOUT = 10.0


class RedisServer:
    def __init__(self, directory: Path | None = None, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        if not host.startswith("127.") and host != "::1":
            raise ValueError(f"{host}: the Redis rig listens on loopback only")
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/system-packages.sh)")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="mta-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "--bind", self.host, "--port", str(self.port),
               "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--protected-mode", "no", "--daemonize", "no",
               "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.dir / 'redis.log'}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.host}:{self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM: Redis finishes its append-only file and exits."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def cli(self, *args: str) -> str:
        """A redis-cli command against this instance (for tests to look inside)."""
        done = subprocess.run(["redis-cli", "-h", self.host, "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
