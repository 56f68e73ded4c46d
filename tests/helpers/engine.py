"""Helpers shared by the engine tests: configs, a raw SMTP client, spool reads."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from bench.engine_proc import EngineProcess
from bench.net import free_port
from mta.queue.spool import Spool


def engine_config(tmp: Path, **sections: Any) -> dict[str, Any]:
    """A config for a test engine in tmp, on free ports, delivering nowhere by default."""
    config: dict[str, Any] = {
        "engine": {"workers": 1, "event_log": str(tmp / "events.jsonl"),
                   "audit_log": str(tmp / "audit.jsonl"), "log_level": "warning"},
        "smtp": {"listen": f"127.0.0.1:{free_port()}"},
        "spool": {"path": str(tmp / "spool"), "min_free_disk": 0},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.5},
        "delivery": {"enabled": False, "port": 9, "retry_initial": 3600.0},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(name, {}).update(values)
        else:
            config[name] = values
    return config


def start_engine(tmp: Path, workers: int | None = None, **sections: Any
                 ) -> EngineProcess:
    return EngineProcess(tmp, engine_config(tmp, **sections), workers=workers).start()


class RawSmtp:
    """A byte-level SMTP client for protocol tests: send exactly what the test says."""

    def __init__(self, host: str, port: int, source: str | None = None,
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; partial {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line[4:].decode())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return self.reply()

    def greet(self, helo: str = "client.test") -> None:
        assert self.reply()[0] == 220
        assert self.cmd(f"EHLO {helo}")[0] == 250

    def closed(self, wait: float = 3.0) -> bool:
        """True if the server closed the connection (within `wait` seconds)."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def spooled_ids(spool_path: Path) -> set[str]:
    spool = Spool(spool_path, readonly=True)
    try:
        with spool.read() as txn:
            return {m["id"] for m in spool.messages(txn)}
    finally:
        spool.close()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
