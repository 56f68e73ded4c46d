"""Loopback ports for the rig's peers: a free one, is one free, wait until one listens."""

from __future__ import annotations

import errno
import random
import socket
import subprocess
import time
from collections import deque
from typing import Any

LOOPBACK = "127.0.0.1"
EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
# The ports this process handed out last: two calls before either port is bound (an
# engine's SMTP and HTTP addresses, say) must not get the same one (seen: an engine
# whose HTTP listener took its own SMTP port).
_handed_out: deque[int] = deque(maxlen=2048)


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def hostport(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(*hosts: str, attempts: int = 200) -> int:
    """A TCP port that is free on every one of `hosts` (127.0.0.1 if none) right now.

    Drawn below the kernel's ephemeral range, never from bind(0): a port the kernel hands
    out can be given again, as the source port of any outgoing connection, between this
    check and the server's own bind (seen: an engine failing to listen)."""
    hosts = hosts or (LOOPBACK,)
    low, high = listen_range()
    for _ in range(attempts):
        port = random.randint(low, high)
        if port not in _handed_out and all(port_is_free(host, port) for host in hosts):
            _handed_out.append(port)
            return port
    raise OSError(errno.EADDRINUSE, f"no TCP port free on all of {list(hosts)}")


def listen_range(path: str = EPHEMERAL_RANGE) -> tuple[int, int]:
    """Ports for listeners: the 12,000 below the ephemeral range (Linux's
    ip_local_port_range; 32768-60999 when it cannot be read)."""
    try:
        with open(path) as f:
            first = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768
    first = max(first, 2048)
    return max(1024, first - 12_000), first - 1


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
