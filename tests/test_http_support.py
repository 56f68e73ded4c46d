"""Helpers for the operators' surface tests: an engine with the HTTP listener, HTTP calls.

`start_http_engine` runs `mta serve` through this module's launcher, which adds the
operators' surface (mta.http.start_worker, the metrics directory) when mta/engine.py
does not wire it in yet; once it does, the launcher only runs `mta serve`.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import tomli_w

from bench.engine_proc import PROJECT_ROOT, START_TIMEOUT, EngineProcess, wait_for_port
from tests.support import engine_config

TOKEN = "test-admin-token-0123456789"


class HttpEngine(EngineProcess):
    """`mta serve` (through the launcher below) with its HTTP address known."""

    def __init__(self, workdir: Path, config: dict[str, Any], workers: int | None = None
                 ) -> None:
        super().__init__(workdir, config, workers)
        host, _, port = config["http"]["listen"].rpartition(":")
        self.http_host, self.http_port = host, int(port)
        self.url = f"http://{host}:{port}"

    def start(self) -> HttpEngine:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(tomli_w.dumps(self.config))
        cmd = [sys.executable, "-m", "tests.test_http_support", "--config",
               str(self.config_path)]
        if self.workers:
            cmd += ["--workers", str(self.workers)]
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        log = open(self.workdir / "engine.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=log, env=env,
                                     start_new_session=True)
        wait_for_port(self.host, self.port, START_TIMEOUT, self.proc)
        if self.config["http"].get("enabled", True):
            wait_for_port(self.http_host, self.http_port, START_TIMEOUT, self.proc)
        return self

    def log_text(self) -> str:
        return (self.workdir / "engine.log").read_text(errors="replace")


def start_http_engine(tmp: Path, workers: int | None = None, token: str = TOKEN,
                      **sections: Any) -> HttpEngine:
    config = engine_config(tmp, **sections)
    config["http"].setdefault("admin_token", token)
    config["http"].setdefault("sample_interval", 0.2)
    config["http"].setdefault("queue_sample_interval", 0.2)
    return HttpEngine(tmp, config, workers).start()


def call(url: str, method: str = "GET", token: str | None = TOKEN, body: Any = None,
         raw: bytes | None = None, content_type: str = "application/json"
         ) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers) of one HTTP request; no exception on 4xx/5xx."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            status, payload, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, payload, headers = exc.code, exc.read(), dict(exc.headers)
    text = payload.decode("utf-8", "replace")
    if headers.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(text), headers
    return status, text, headers


def engine_wires_http() -> bool:
    from mta import engine

    return "mta.http" in inspect.getsource(engine)


def main() -> int:
    """`mta serve`, adding the operators' surface if the engine does not yet."""
    import argparse

    from mta import engine
    from mta.config import load_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    cleanup = None
    if not engine_wires_http():
        from mta.http import check_http, start_worker
        from mta.metrics import cleanup_metrics_dir, prepare_metrics_dir

        cfg = load_config(args.config)
        metrics_dir = prepare_metrics_dir(cfg)
        engine.startup_checks.append(check_http)
        engine.worker_extensions.append(start_worker)

        def cleanup() -> None:
            cleanup_metrics_dir(cfg, metrics_dir)

    from mta.cli import main as mta_main

    argv = ["serve", "--config", args.config]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    try:
        return mta_main(argv)
    finally:
        if cleanup is not None:
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
