"""One engine per SMTP address: the supervisor claims the address before it starts.

The workers of one engine share their listening address (SO_REUSEPORT), and the kernel
would let any other process of the same user join them: a second engine started on the
same address would take part of the connections into its own spool. So the supervisor
claims the address first, by listening on an abstract Unix socket named after it (Linux;
it goes with the process, no file is left behind). A second engine finds the name taken
and learns the running engine's pid from that socket's peer credentials.
"""

from __future__ import annotations

import errno
import socket
import struct

from mta.config import StartupError, parse_hostport

NAME_PREFIX = "mta-engine-listen:"
PROBE_TIMEOUT = 1.0
BACKLOG = 128  # probes of other engines queue here, never accepted


def lock_name(address: str) -> str:
    host, port = parse_hostport(address)
    return f"\0{NAME_PREFIX}{host.lower()}:{port}"


def claim_address(key: str, address: str) -> socket.socket:
    """Claim `address` (the value of `key`) for this process and keep the returned socket
    open while the engine runs; StartupError when another engine has it."""
    name = lock_name(address)
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(name)
        claim.listen(BACKLOG)
    except OSError as exc:
        claim.close()
        if exc.errno != errno.EADDRINUSE:
            raise StartupError(f"cannot claim {address} ({key}): {exc.strerror}") from None
        pid = holder_pid(name)
        holder = f"pid {pid}" if pid else "pid unknown"
        raise StartupError(f"cannot listen on {address} ({key}): another engine runs "
                           f"there ({holder})") from None
    return claim


def holder_pid(name: str) -> int | None:
    """The pid of the process that claimed `name` (its peer credentials), if it says."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                     struct.calcsize("3i"))
        except OSError:
            return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None
