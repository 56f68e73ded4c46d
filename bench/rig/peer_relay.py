"""What the peers' relay instances (bench.rig.exim, bench.rig.haraka) share: a daemon of
ours in the foreground in a working directory, relaying each test domain to its sink,
started in a session of its own (so that its whole process tree stops together) and
measured through `preexec` (it joins the run's cgroup)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from bench.net import free_port, wait_for_port

STOP_TIMEOUT = 10.0


class PeerRelay:
    """Subclasses write their config and call `launch`; `log_name` is the file in the
    working directory their daemon's output goes to."""

    name = "peer"
    log_name = "peer.log"
    start_timeout = 30.0

    def __init__(self, workdir: Path, routes: Mapping[str, str], sink_port: int, *,
                 port: int = 0, preexec: Callable[[], None] | None = None) -> None:
        self.root = Path(workdir)
        self.routes = dict(routes)
        self.sink_port = sink_port
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.preexec = preexec  # run in the daemon's process before exec (the cgroup)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def launch(self, argv: Sequence[str], env: dict[str, str], cwd: Path | None = None,
               output: Path | None = None) -> None:
        """Start the daemon; wait until it listens (or say why it did not)."""
        log = open(output or self.root / self.log_name, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            list(argv), cwd=cwd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=self.preexec)  # noqa: PLW1509
        log.close()
        try:
            wait_for_port(self.host, self.port, self.start_timeout, self.proc, name=self.name)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.failure_text()}") from None

    def failure_text(self) -> str:
        return " / ".join(self.log_tail(5).splitlines()) or "no output"

    def log_tail(self, lines: int = 20, name: str = "") -> str:
        with contextlib.suppress(OSError):
            text = (self.root / (name or self.log_name)).read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM to the daemon's process group (its children too), SIGKILL if needed."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
