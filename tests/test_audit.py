"""The audit log: JSON lines, appended whole from several processes, no secrets."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from mta.audit import (
    MAX_FIELD,
    AuditLog,
    access_record,
    action_record,
    auth_record,
    read_audit,
    smtp_auth_record,
)


def test_records_are_json_lines_with_time_and_clipped_fields(tmp_path: Path) -> None:
    path = tmp_path / "var" / "audit.jsonl"
    log = AuditLog(path)
    log.record(auth_record("admin-api", "127.0.0.1", "", "failed"))
    log.record(access_record("127.0.0.1", "alice", "GET", "/api/v1/queue", 200))
    log.record(action_record("127.0.0.1", "alice", "campaign.pause", "shop/c1", "ok",
                             reason="x" * 1000))
    log.close()
    log.record(auth_record("smtp", "1.2.3.4", "late", "ok"))  # after close: dropped, no error
    records = read_audit(path)
    assert [r["type"] for r in records] == ["auth", "access", "action"]
    assert all(isinstance(r["time"], float) for r in records)
    assert records[2]["object"] == "shop/c1" and records[2]["identity"] == "alice"
    assert len(records[2]["reason"]) == MAX_FIELD + 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_audit(tmp_path / "missing.jsonl") == []


def test_smtp_auth_events_become_records_and_nothing_else_does(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.on_event({"type": "Auth", "client": "10.0.0.1", "identity": "shop", "ok": False,
                  "time": 5.0})
    log.on_event({"type": "Reception", "id": "X"})
    log.on_event({"type": "Auth", "client": "10.0.0.1", "identity": "shop", "ok": True})
    log.close()
    records = read_audit(tmp_path / "audit.jsonl")
    assert [(r["channel"], r["identity"], r["result"]) for r in records] == [
        ("smtp", "shop", "failed"), ("smtp", "shop", "ok")]
    assert records[0]["time"] == 5.0  # the event's own time is kept
    assert smtp_auth_record({"type": "Delivery"}) is None


WRITER = textwrap.dedent("""
    import sys
    from mta.audit import AuditLog, action_record
    log = AuditLog(sys.argv[1])
    for n in range(400):
        log.record(action_record("127.0.0.1", sys.argv[2], "held.release", "j" * 200, "ok", n=n))
""")


def test_several_processes_append_without_interleaving(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"op{i}"])
             for i in range(3)]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 1200
    records = [json.loads(line) for line in lines]  # every line whole
    for i in range(3):
        assert [r["n"] for r in records if r["identity"] == f"op{i}"] == list(range(400))
