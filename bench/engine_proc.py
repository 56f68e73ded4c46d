"""Run the engine as a real `mta serve` process, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from bench import procstat
from bench.net import wait_for_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
RESIGNAL_EVERY = 1.0


def read_events(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The engine's event log, complete lines only (the engine may be writing the last one)."""
    text = path.read_text() if path.exists() else ""
    lines = [line for line in text.split("\n")[:-1] if line.strip()]
    return [e for e in map(json.loads, lines) if kind is None or e.get("type") == kind]


class EngineProcess:
    """`mta serve` in a directory of its own, with a config written from a dict."""

    def __init__(self, workdir: Path, config: dict[str, Any], workers: int | None = None,
                 stderr: Any = None, env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.workdir = Path(workdir)
        self.preexec = preexec  # run in the engine's process before exec (a cgroup join)
        self.config = config
        self.config_path = self.workdir / "mta.toml"
        self.workers = workers
        self.stderr = stderr
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        host, _, port = config.get("smtp", {}).get("listen", "127.0.0.1:2525").rpartition(":")
        self.host, self.port = host, int(port)
        self._cpu_seen: dict[int, float] = {}

    def start(self) -> EngineProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(tomli_w.dumps(self.config))
        cmd = [sys.executable, "-m", "mta", "serve", "--config", str(self.config_path)]
        if self.workers:
            cmd += ["--workers", str(self.workers)]
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), **self.env)
        log = self.stderr or open(self.workdir / "engine.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=log, env=env,
                                     start_new_session=True,
                                     preexec_fn=self.preexec)  # noqa: PLW1509
        wait_for_port(self.host, self.port, START_TIMEOUT, self.proc, name="engine")
        return self

    def worker_pids(self) -> list[int]:
        return procstat.children(self.proc.pid) if self.proc else []

    def cpu_seconds(self) -> float:
        """CPU time of the supervisor and its workers (workers remembered after they exit)."""
        if self.proc is None:
            return 0.0
        for pid in [self.proc.pid, *self.worker_pids()]:
            self._cpu_seen[pid] = max(self._cpu_seen.get(pid, 0.0), procstat.cpu_seconds(pid))
        return sum(self._cpu_seen.values())

    def kill9(self) -> None:
        """SIGKILL the whole engine, supervisor and workers, at once."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if the engine is still there after `timeout` seconds.

        The SIGTERM is repeated every RESIGNAL_EVERY seconds: the supervisor passes each
        one on to its workers, and a worker still starting up (the engine listens as soon
        as its first worker does) does not act on a SIGTERM that comes before its event
        loop handles signals; a later one stops it."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.proc.send_signal(signal.SIGTERM)  # nothing if it has exited meanwhile
            try:
                return self.proc.wait(min(RESIGNAL_EVERY, left))
            except subprocess.TimeoutExpired:
                continue
        self.kill9()
        return None

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def __aenter__(self) -> EngineProcess:
        return self.start()

    async def __aexit__(self, *exc: Any) -> None:
        self.stop()
