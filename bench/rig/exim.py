"""Exim 4.96 (Debian's binary, unpacked by bench.rig.peer_install) as a relay instance in a
temporary directory, configured by bench/peers/exim.conf.

The instance has its own spool (fsync on: Debian's Exim cannot turn it off), listens on
one loopback port, relays for 127.0.0.0/8 and sends every test domain to its sink
through a table (manualroute: no DNS), as the Postfix relay does with transport_maps.
It runs in the foreground (`-bdf`) as a child of the bench, so its process tree is
the bench's to measure and to stop.

    with EximRelay(workdir, routes={"d1.test": "127.0.0.2"}, sink_port=2600) as exim:
        ... submit to 127.0.0.1:exim.port ...
        exim.queue_depth()
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from bench.rig import peer_install
from bench.rig.peer_relay import PeerRelay

CONFIG = Path(__file__).resolve().parents[1] / "peers" / "exim.conf"
QUEUE_RUN_EVERY = "1s"  # the daemon's -q: a queue runner every second (exim.conf: queue_only)


def macros(values: Mapping[str, str | int]) -> str:
    """Exim macro definitions (`NAME = value` lines) for the run's BENCH_* values."""
    for value in values.values():
        if "\n" in str(value):
            raise ValueError("an Exim macro value cannot span lines")
    return "".join(f"{name} = {value}\n" for name, value in values.items())


def route_table(routes: Mapping[str, str]) -> str:
    """lsearch lines `domain: address` for the manualroute router."""
    return "".join(f"{domain}: {address}\n" for domain, address in routes.items())


class EximRelay(PeerRelay):
    """An Exim daemon of our own: `start()`, `queue_depth()`, `stop()`."""

    name = "exim"
    log_name = "log/mainlog"
    start_timeout = 30.0

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def write_config(self, install: peer_install.EximInstall) -> Path:
        uid, gid = peer_install.exim_ids()
        for sub in ("spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chown(self.root / sub, uid, gid)
        self.root.chmod(0o755)  # the Exim user walks into spool/ and log/
        (self.root / "routes").write_text(route_table(self.routes))
        conf = self.root / "exim.conf"
        conf.write_text(macros({
            "BENCH_EXIM": str(install.binary),
            "BENCH_SPOOL": str(self.spool),
            "BENCH_LOG": str(self.root / "log" / "%slog"),
            "BENCH_PID": str(self.root / "exim.pid"),
            "BENCH_PORT": self.port,
            "BENCH_ROUTES": str(self.root / "routes"),
            "BENCH_SINK_PORT": self.sink_port,
        }) + f".include {CONFIG}\n")
        return conf

    def start(self) -> EximRelay:
        install = peer_install.exim()
        conf = self.write_config(install)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LD_LIBRARY_PATH": install.library_path}
        self.launch([str(install.binary), "-C", str(conf), "-bdf", f"-q{QUEUE_RUN_EVERY}"],
                    env, output=self.root / "exim.out")
        return self

    def failure_text(self, lines: int = 5) -> str:
        """The last lines Exim wrote to its stdout/stderr and panic log (start failures)."""
        text = ""
        for name in ("exim.out", "log/paniclog"):
            with contextlib.suppress(OSError):
                text += (self.root / name).read_text(errors="replace")
        return " / ".join(text.strip().splitlines()[-lines:]) or "no output"

    def queue_depth(self) -> int:
        """Messages in the spool (one -H file each, in split spool sub-directories)."""
        total = 0
        for _, _, files in os.walk(self.spool / "input"):
            total += sum(1 for name in files if name.endswith("-H"))
        return total
