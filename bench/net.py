"""Loopback ports for the rig's peers: a free one, is one free, wait until one listens."""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from typing import Any

LOOPBACK = "127.0.0.1"


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def hostport(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(*hosts: str, attempts: int = 50) -> int:
    """A TCP port that is free on every one of `hosts` (127.0.0.1 if none) right now."""
    hosts = hosts or (LOOPBACK,)
    for _ in range(attempts):
        with socket.socket(family(hosts[0])) as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
        if all(port_is_free(host, port) for host in hosts[1:]):
            return port
    raise OSError(errno.EADDRINUSE, f"no TCP port free on all of {list(hosts)}")


def port_is_free(host: str, port: int) -> bool:
    """True if nothing is bound to host:port (a bind probe: no connection is made)."""
    with socket.socket(family(host)) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def wait_for_port(host: str, port: int, timeout: float,
                  proc: subprocess.Popen[Any] | None = None, name: str = "server") -> None:
    """Until something accepts connections on host:port; fails early if `proc` (the
    `name` server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
