"""The audit log: every login attempt and every operator access, as JSON lines.

One record per line, appended with a single write() on an O_APPEND file, so
records from several worker processes never interleave and nothing already
written is ever rewritten. Records:

- ``{"time", "type": "auth", "channel": "smtp"|"inject"|"admin-api", "client", "identity",
  "result": "ok"|"failed"|"refused"}`` for every authentication attempt;
- ``{"time", "type": "access", "channel": "admin-api", "client", "identity", "method",
  "path", "status"}`` for every admin API request that passed authentication;
- ``{"time", "type": "action", "client", "identity", "action", "object", "result",
  ...details}`` for every operator action (pause, resume, release, ...).

Secrets (passwords, tokens) are never written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mta.context import WorkerContext

MAX_FIELD = 300  # long client-supplied strings are cut, so one record stays one small write


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + "..."
    return value


def auth_record(channel: str, client: str, identity: str, result: str) -> dict[str, Any]:
    return {"type": "auth", "channel": channel, "client": client, "identity": identity,
            "result": result}


def access_record(client: str, identity: str, method: str, path: str, status: int
                  ) -> dict[str, Any]:
    return {"type": "access", "channel": "admin-api", "client": client, "identity": identity,
            "method": method, "path": path, "status": status}


def action_record(client: str, identity: str, action: str, obj: str, result: str,
                  **details: Any) -> dict[str, Any]:
    return {"type": "action", "client": client, "identity": identity, "action": action,
            "object": obj, "result": result, **details}


def smtp_auth_record(event: dict[str, Any]) -> dict[str, Any] | None:
    """The audit record of an intake event, or None when it is not an Auth event."""
    if event.get("type") != "Auth":
        return None
    record = auth_record(str(event.get("channel", "smtp")), str(event.get("client", "")),
                         str(event.get("identity", "")), "ok" if event.get("ok") else "failed")
    if "time" in event:
        record["time"] = event["time"]
    return record


class AuditLog:
    """Append-only JSON lines; safe to share between processes (each opens its own)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(self, entry: dict[str, Any]) -> None:
        line = {"time": round(time.time(), 3)} | {k: _clip(v) for k, v in entry.items()}
        if self._fd is not None:
            os.write(self._fd, (json.dumps(line, separators=(",", ":"), default=str)
                                + "\n").encode())

    def on_event(self, event: dict[str, Any]) -> None:
        """An EventLog listener: records every SMTP AUTH attempt."""
        record = smtp_auth_record(event)
        if record is not None:
            self.record(record)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_audit(path: str | os.PathLike[str], limit: int = 1000) -> list[dict[str, Any]]:
    """The last `limit` records (oldest first); unreadable lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines[-limit:]:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def start_audit(ctx: WorkerContext) -> AuditLog:
    """Open the audit log in a worker and record its SMTP AUTH attempts."""
    audit = AuditLog(ctx.cfg.engine.audit_log)
    ctx.listen(audit.on_event)

    async def close() -> None:
        audit.close()

    ctx.on_close(close)
    return audit
