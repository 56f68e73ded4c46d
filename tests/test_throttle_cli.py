"""Throttle snapshots in a real LMDB spool, read by `mta throttle` in another process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from mta.queue.spool import Spool
from mta.throttle import (
    Throttle,
    clear_snapshots,
    load_shaping,
    load_snapshots,
    save_snapshot,
    snapshot_op,
)

REPO = Path(__file__).resolve().parent.parent
SHAPING = REPO / "config/shaping.toml"


def mta(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60)


def write_config(tmp: Path) -> Path:
    config = tmp / "mta.toml"
    config.write_text(f'[spool]\npath = "{tmp / "spool"}"\n\n'
                      f'[throttle]\nshaping_file = "{SHAPING}"\n')
    return config


def worker_rows(worker: int, now: float) -> list[dict]:
    """A real throttle's snapshot after Gmail said 4.7.28 and one domain was suspended."""
    t = Throttle(load_shaping(SHAPING), worker=worker, workers=2)
    gmail = t.destination("gmail.com", ["gmail-smtp-in.l.google.com"])
    t.try_connect(gmail, now)
    t.record(gmail, 421, "4.7.0", "Try again later, closing connection.", now)
    yahoo = t.destination("yahoo.com", ["mta5.am0.yahoodns.net"])
    t.record(yahoo, 421, "4.7.0", "[TSS04] Messages from 1.2.3.4 temporarily deferred", now)
    return t.snapshot(now)


def test_save_and_load_snapshots(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    now = time.time()
    save_snapshot(spool.env, 0, worker_rows(0, now))
    spool.apply([snapshot_op(spool.env, 1, worker_rows(1, now))])  # in a group commit
    save_snapshot(spool.env, 0, worker_rows(0, now))  # replaces worker 0's rows
    rows = load_snapshots(spool.env)
    assert sorted((r["worker"], r["destination"]) for r in rows) == [
        (0, "gmail"), (0, "yahoo"), (1, "gmail"), (1, "yahoo")]
    clear_snapshots(spool.env)
    assert load_snapshots(spool.env) == []
    spool.close()


def test_status_json_from_another_process(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    spool = Spool(tmp_path / "spool")
    now = time.time()
    save_snapshot(spool.env, 0, worker_rows(0, now))
    save_snapshot(spool.env, 1, worker_rows(1, now))
    spool.close()
    done = mta("throttle", "status", "--json", "--config", str(config))
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    gmail = [r for r in rows if r["destination"] == "gmail"]
    assert [r["worker"] for r in gmail] == [0, 1]
    assert all(r["rate"] < r["rate_ceiling"] == 25.0 for r in gmail)  # 50/s over 2 workers
    assert all("4.7.0" in r["reason"] and r["connections"] == 1 for r in gmail)
    yahoo = next(r for r in rows if r["destination"] == "yahoo")
    assert yahoo["state"] == "suspended" and yahoo["until"] == now + 7200
    assert "yahoo-ts04" in yahoo["reason"] and not yahoo["stale"]

    table = mta("throttle", "status", "--config", str(config))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["DESTINATION", "KIND", "WORKER"]
    assert any(line.startswith("yahoo") and "suspended" in line and "(in 2h)" in line
               for line in lines)


def test_status_without_snapshots_or_spool(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    missing = mta("throttle", "status", "--config", str(config))
    assert missing.returncode == 2 and "no spool" in missing.stderr
    Spool(tmp_path / "spool").close()
    empty = mta("throttle", "status", "--json", "--config", str(config))
    assert empty.returncode == 0 and json.loads(empty.stdout) == []


def test_check_and_explain(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ok = mta("throttle", "check", "--config", str(config))
    assert ok.returncode == 0 and "8 providers" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[provider.x]\nmx_suffixes = [".x.test"]\nmessage_rate = "fast"\n')
    failed = mta("throttle", "check", "--config", str(config), "--shaping", str(bad))
    assert failed.returncode == 2
    assert "[provider.x] message_rate" in failed.stderr and failed.stderr.count("\n") == 1
    explained = mta("throttle", "explain", "hosted.test", "--mx", "aspmx.l.google.com",
                    "--workers", "4", "--config", str(config))
    assert explained.returncode == 0
    assert "provider gmail" in explained.stdout and "gmail-unusual-rate" in explained.stdout
