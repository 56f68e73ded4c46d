"""Run the engine as a real `mta serve` process, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

PROJECT_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0


def read_events(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The engine's event log, complete lines only (the engine may be writing the last one)."""
    text = path.read_text() if path.exists() else ""
    lines = [line for line in text.split("\n")[:-1] if line.strip()]
    return [e for e in map(json.loads, lines) if kind is None or e.get("type") == kind]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None
                  ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"engine exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids += [int(x) for x in task.read_text().split()]
        except OSError:
            continue
    return pids


class EngineProcess:
    """`mta serve` in a directory of its own, with a config written from a dict."""

    def __init__(self, workdir: Path, config: dict[str, Any], workers: int | None = None,
                 stderr: Any = None, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
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
                                     start_new_session=True)
        wait_for_port(self.host, self.port, START_TIMEOUT, self.proc)
        return self

    def worker_pids(self) -> list[int]:
        return _children(self.proc.pid) if self.proc else []

    def cpu_seconds(self) -> float:
        """CPU time of the supervisor and its workers (workers remembered after they exit)."""
        if self.proc is None:
            return 0.0
        for pid in [self.proc.pid, *self.worker_pids()]:
            self._cpu_seen[pid] = max(self._cpu_seen.get(pid, 0.0), _proc_cpu(pid))
        return sum(self._cpu_seen.values())

    def kill9(self) -> None:
        """SIGKILL the whole engine, supervisor and workers, at once."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
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
