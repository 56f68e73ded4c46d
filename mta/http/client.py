"""A small synchronous client of the admin API, for the `mta` command line."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

TIMEOUT = 30.0
PROBE_TIMEOUT = 5.0
MAX_LIMIT = 10_000  # the largest `limit` the API takes (mta.http.app.MAX_LIMIT)


class ApiError(Exception):
    """The engine answered with an error, or could not be reached; str() says which."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def base_url(listen: str) -> str:
    """http://HOST:PORT for a `[http] listen` address (0.0.0.0 / :: become loopback)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def segment(value: str) -> str:
    return quote(value, safe="")


class AdminClient:
    def __init__(self, url: str, token: str, timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/api/v1/{path.lstrip('/')}", data=data,
                                     method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ApiError(error_text(exc.code, exc.read()), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise unreachable(self.url, exc) from None

    def answers(self) -> bool:
        """Whether an HTTP listener answers at the URL: False when the connection is
        refused (no engine running there); ApiError when it cannot be reached otherwise."""
        try:
            urllib.request.urlopen(f"{self.url}/healthz", timeout=PROBE_TIMEOUT).close()
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError) as exc:
            if refused(exc):
                return False
            raise unreachable(self.url, exc) from None
        return True

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def refused(exc: BaseException) -> bool:
    return isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)


def unreachable(url: str, exc: BaseException | None = None) -> ApiError:
    """The one wording of "no engine answers there" (None: the connection was refused)."""
    reason = "connection refused" if exc is None or refused(exc) else getattr(exc, "reason", exc)
    return ApiError(f"cannot reach the engine at {url}: {reason}")


def error_text(status: int, payload: bytes) -> str:
    try:
        message = json.loads(payload).get("error", "")
    except (ValueError, AttributeError):
        message = payload.decode("utf-8", "replace")[:200]
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"
