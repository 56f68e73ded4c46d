"""The operator's day with a running engine: one engine per address, logs that say what
happened at a stop and nothing a dependency mutters, output that can be piped."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from bench.engine_proc import PROJECT_ROOT, read_events
from bench.load import Logins, Submission, make_body, run_load
from mta.queue.spool import NewMessage, Spool
from mta.smtp.auth import hash_password
from tests.helpers.abuse import self_signed_cert
from tests.helpers.engine import engine_config, start_engine, wait_until


def mta(*args: str, cwd: Path = PROJECT_ROOT, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_a_second_engine_on_the_same_smtp_address_stops_with_one_line(tmp_path: Path) -> None:
    first = start_engine(tmp_path / "first", workers=2)
    try:
        config = engine_config(tmp_path / "second", smtp={"listen": f"{first.host}:{first.port}"})
        path = tmp_path / "second.toml"
        path.write_text(tomli_w.dumps(config))
        second = mta("serve", "--config", str(path))
        assert second.returncode != 0
        assert second.stderr.splitlines() == [
            f"mta: cannot listen on {first.host}:{first.port} ([smtp] listen): another engine "
            f"runs there (pid {first.proc.pid})"], second.stderr
        assert not (tmp_path / "second" / "spool").exists()  # it took nothing
    finally:
        first.stop()


def test_the_engine_logs_its_stop_what_was_in_flight_and_a_clean_spool(tmp_path: Path) -> None:
    engine = start_engine(tmp_path, engine={"log_level": "info"})
    engine.stop()
    log = (tmp_path / "engine.log").read_text()
    assert "worker 0 stopping: 0 deliveries in flight" in log
    assert "worker 0 stopped; spool closed cleanly" in log
    assert log.rstrip().endswith("engine stopped")


def test_the_log_of_100_authenticated_sessions_has_no_warning_lines(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    engine = start_engine(tmp_path, engine={"log_level": "info"},
                          smtp={"tls_cert": str(cert), "tls_key": str(key),
                                "trusted_networks": []},
                          accounts=[{"name": "shop", "password_hash": hash_password("pw", log_n=10)}])
    try:
        def submission(i: int) -> Submission:
            return Submission("news@shop.test", [f"u{i}@dest.test"],
                              make_body(300, f"m{i}", "news@shop.test", f"u{i}@dest.test"))

        result = asyncio.run(run_load(engine.host, engine.port, submission, 100, sessions=100,
                                      messages_per_session=1,
                                      logins=Logins.single("shop", "pw")))
        assert (result.accepted, result.errors) == (100, 0), result.replies
        assert wait_until(lambda: len(read_events(tmp_path / "events.jsonl", "Auth")) >= 100)
    finally:
        engine.stop()
    lines = (tmp_path / "engine.log").read_text().splitlines()
    assert lines and "engine stopped" in lines[-1]
    noisy = [line for line in lines if " WARNING " in line or "Warning" in line
             or "deprecat" in line.lower()]
    assert noisy == []


def test_queue_list_piped_into_head_ends_without_a_traceback(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 256 * 1024**2)
    spool.apply([spool.store_op(NewMessage(f"s{i}@shop.test", [f"r{i}@dest.test"],
                                           b"Subject: x\r\n\r\nhi\r\n", received=time.time()))
                 for i in range(3000)])  # far more than a pipe holds
    spool.close()
    config = tmp_path / "mta.toml"
    config.write_text(tomli_w.dumps(engine_config(tmp_path)))
    piped = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m mta queue list --limit 3000 --config "{config}" '
                       f'2>"{tmp_path / "err"}" | head -1; exit "${{PIPESTATUS[0]}}"'],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert piped.returncode == 0
    assert piped.stdout.split() == ["id", "received", "from", "rcpts", "account", "campaign",
                                    "size"]
    assert (tmp_path / "err").read_text() == ""
