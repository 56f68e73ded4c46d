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

from bench.engine_proc import read_events

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


def ignore_sigint() -> None:
    """What a shell without job control does to a background command (`cmd &` in a
    script, a test suite run in the background): the child starts with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def wait_for_load(workdir: Path, timeout: float) -> None:
    """Until the engine has accepted a message of the load (its event log says so)."""
    deadline = time.monotonic() + timeout
    while not read_events(workdir / "events.jsonl", "Reception"):
        assert time.monotonic() < deadline, f"no message accepted after {timeout}s"
        time.sleep(0.05)


@pytest.mark.parametrize(("moment", "sigint"), [
    ("rig up", "default"),  # as soon as the target is up, before the load has started
    ("mid-load", "default"),
    ("mid-load", "inherited ignored"),
])
def test_ctrl_c_tears_the_rig_down(moment: str, sigint: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "run", "--count", "100000", "--rate", "100", "--quiet"],
        cwd=PROJECT_ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, start_new_session=True,  # its sinks die with it on failure
        preexec_fn=ignore_sigint if sigint != "default" else None)
    try:
        stderr = read_until(proc, "target:", timeout=60)
        if moment == "mid-load":
            target = TARGET_LINE.search(stderr)
            assert target, stderr
            wait_for_load(Path(target.group(3)), timeout=60)
        os.kill(proc.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, rest = proc.communicate(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr + rest
    assert took < 15, f"teardown took {took:.1f}s\n{stderr + rest}"
    assert_torn_down(stderr + rest)


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """Its stderr up to the end of the line with `marker` (read from the descriptor:
    select() would not see lines a buffered reader had already taken in)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = ""
    deadline = time.monotonic() + timeout
    while "\n" not in seen.partition(marker)[2] and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk.decode(errors="replace")
    assert marker in seen, seen
    return seen
