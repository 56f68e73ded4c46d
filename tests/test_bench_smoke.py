"""The bench rig works end to end (not how fast): `python -m bench run` as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"accepted_rate=\d+\.\d e2e_rate=\d+\.\d p50_ms=\d+\.\d p99_ms=\d+\.\d")
RIG_LINE = re.compile(r"rig: DNS on (\S+):(\d+) .* MX on (.*) port (\d+)")
TARGET_LINE = re.compile(r"target: \S+ on (\S+):(\d+), work dir (\S+)")
needs_postfix = pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(),
                                   reason="Debian package postfix not installed")


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=PROJECT_ROOT, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def listening(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def endpoints(stderr: str) -> list[tuple[str, int]]:
    """Every address the run said it listened on: DNS, each sink, the target."""
    rig, target = RIG_LINE.search(stderr), TARGET_LINE.search(stderr)
    assert rig and target, stderr
    sinks = [(host, int(rig.group(4))) for host in rig.group(3).split(", ")]
    return [(rig.group(1), int(rig.group(2))), *sinks, (target.group(1), int(target.group(2)))]


def assert_torn_down(stderr: str) -> None:
    for host, port in endpoints(stderr):
        assert not listening(host, port), f"{host}:{port} still listening"
    workdir = TARGET_LINE.search(stderr)
    assert workdir and not Path(workdir.group(3)).exists()


def figures(out: Path) -> list[dict]:
    return json.loads(next(out.glob("*.json")).read_text())


def test_steady_small_run_delivers_everything_and_cleans_up(tmp_path: Path) -> None:
    done = bench("run", "--scenario", "steady", "--count", "200", "--quiet", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert LAST_LINE.fullmatch(done.stdout.strip().splitlines()[-1])
    [result] = figures(tmp_path)
    assert result["accepted"] == 200
    assert result["delivered"] == result["accepted"]
    assert result["e2e_p50_ms"] > 0 and result["cpu_seconds"] > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert list(tmp_path.glob("*.png"))
    else:
        assert "plot: skipped" in done.stdout
    assert_torn_down(done.stderr)


@needs_postfix
def test_postfix_with_opendkim_signs_and_relays(tmp_path: Path) -> None:
    done = bench("run", "--target", "postfix", "--dkim", "--count", "60", "--quiet",
                 "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "DKIM-signed at the sinks: 60 of 60" in done.stdout
    [result] = figures(tmp_path)
    assert result["target"] == "postfix" and result["delivered"] == 60
    assert_torn_down(done.stderr)


def test_ctrl_c_tears_the_rig_down() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "run", "--count", "100000", "--rate", "100", "--quiet"],
        cwd=PROJECT_ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL)
    try:
        stderr = read_until(proc, "target:", timeout=60)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr + rest
    assert_torn_down(stderr + rest)


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
    assert marker in seen, seen
    return seen
