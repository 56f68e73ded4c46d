"""Helpers for the operators' surface tests: an engine with the HTTP listener, HTTP calls.

`start_http_engine` runs `mta serve` with the HTTP listener on a free port and a known
admin token.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.engine_proc import START_TIMEOUT, EngineProcess
from bench.net import wait_for_port
from tests.helpers.engine import engine_config

TOKEN = "test-admin-token-0123456789"


class HttpEngine(EngineProcess):
    """`mta serve` with its HTTP address known."""

    def __init__(self, workdir: Path, config: dict[str, Any], workers: int | None = None
                 ) -> None:
        super().__init__(workdir, config, workers)
        host, _, port = config["http"]["listen"].rpartition(":")
        self.http_host, self.http_port = host, int(port)
        self.url = f"http://{host}:{port}"

    def start(self) -> HttpEngine:
        super().start()
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
