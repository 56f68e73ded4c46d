"""Bearer tokens for the admin API, and a limit on failed attempts per client address.

`[http] admin_token` is the operator "admin"; `[http] operator_tokens` names more
operators (name -> token), so the audit log says who did what. With no token at
all the admin API is off (403). Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import time
from collections import deque

ADMIN = "admin"


class TokenChecker:
    def __init__(self, admin_token: str, operator_tokens: dict[str, str] | None = None) -> None:
        tokens = {name: token for name, token in (operator_tokens or {}).items() if token}
        if admin_token:
            tokens[ADMIN] = admin_token
        self._tokens = [(name, token.encode()) for name, token in tokens.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def identify(self, authorization: str | None) -> str | None:
        """The operator a ``Bearer <token>`` header names, or None."""
        token = bearer_token(authorization)
        if token is None:
            return None
        presented = token.encode()
        found = None
        for name, expected in self._tokens:  # compare with every token: constant work
            if hmac.compare_digest(presented, expected):
                found = name
        return found


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class FailureLimiter:
    """At most `limit` failures per client within `window` seconds; then refuse."""

    def __init__(self, limit: int, window: float, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, client: str, now: float | None = None) -> bool:
        return self.retry_after(client, now) > 0

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0: it is not refused now)."""
        now = time.monotonic() if now is None else now
        recent = self._recent(client, now)
        if recent is None or len(recent) < self.limit:
            return 0.0
        return max(0.0, recent[-self.limit] + self.window - now)

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if client not in self._failures and len(self._failures) >= self.max_clients:
            self._forget_idle(now)
        self._failures.setdefault(client, deque()).append(now)

    def _recent(self, client: str, now: float) -> deque[float] | None:
        recent = self._failures.get(client)
        if recent is None:
            return None
        while recent and now - recent[0] >= self.window:
            recent.popleft()
        if not recent:
            del self._failures[client]
            return None
        return recent

    def _forget_idle(self, now: float) -> None:
        for client in list(self._failures):
            self._recent(client, now)
        if len(self._failures) >= self.max_clients:  # still full of recent failures
            self._failures.pop(next(iter(self._failures)))
