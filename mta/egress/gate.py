"""The gate a source passes before carrying a message to a provider.

Warm-up (mta.egress.warmup) implements `SourceGate`; with no warm-up configured the
engine uses `OpenGate`, which admits everything.
"""

from __future__ import annotations

from typing import Any, Protocol


class SourceGate(Protocol):
    async def admit(self, source: str, provider: str) -> bool:
        """True: `source` may carry one more message to `provider` now (the gate counts
        it); False: its cap there is spent: choose another source of the pool, or wait."""
        ...

    def established(self, source: str) -> bool:
        """True when `source` is not warming."""
        ...

    def retry_at(self, source: str, provider: str) -> float | None:
        """When (Unix time) `source` may carry mail to `provider` again after a refusal;
        None: unknown (the caller waits a default interval)."""
        ...

    def status(self) -> dict[str, Any]:
        """Warm-up state per source, for `mta egress status` and the dashboard
        (JSON-serialisable; {} when nothing warms)."""
        ...


class OpenGate:
    """No warm-up: every source is established and admitted everywhere."""

    async def admit(self, source: str, provider: str) -> bool:
        return True

    def established(self, source: str) -> bool:
        return True

    def retry_at(self, source: str, provider: str) -> float | None:
        return None

    def status(self) -> dict[str, Any]:
        return {}
