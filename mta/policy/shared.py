"""The port through which the policy guard shares its state with other nodes.

What the guard needs from other nodes: cluster-wide reservations against trial and
monthly limits, the cluster's usage and counters, and a place to add what it counted
(where campaigns are then judged on the cluster's totals). On one node `LocalPolicy`
answers from this node alone; `mta.cluster.policy.PolicySync` implements it over
Redis and is plugged in by the engine's wiring (`PolicyGuard.share`).
"""

from __future__ import annotations

from typing import Protocol

from mta.policy.ledger import Applied, Batch
from mta.policy.model import Counters


class SharedPolicy(Protocol):
    judges: bool  # True: campaigns are judged on the shared totals, not by the ledger

    async def reserve(self, message_id: str, account: str, count: int) -> str | None:
        """Count `count` e-mails against the account's shared limits; a refusal, or None."""

    def consumed(self, message_id: str) -> bool:
        """The message was stored: True if `reserve` counted it already."""

    def known_usage(self, account: str, month: str, total: int,
                    monthly: int) -> tuple[int, int]:
        """(all-time, monthly) usage: this node's figures, raised to the shared ones."""

    async def counted(self, batch: Batch, applied: Applied) -> None:
        """A batch was counted locally: share it (and judge on the shared totals)."""

    async def forget_account(self, account: str) -> None:
        """A purged account's shared records go too."""

    async def shared_totals(self, keys: list[bytes]) -> dict[bytes, Counters] | None:
        """The shared counters of `keys`, or None (one node, or the others unreachable)."""


class LocalPolicy:
    """One node: nothing is shared."""

    judges = False

    async def reserve(self, message_id: str, account: str, count: int) -> str | None:
        return None

    def consumed(self, message_id: str) -> bool:
        return False

    def known_usage(self, account: str, month: str, total: int,
                    monthly: int) -> tuple[int, int]:
        return total, monthly

    async def counted(self, batch: Batch, applied: Applied) -> None:
        return None

    async def forget_account(self, account: str) -> None:
        return None

    async def shared_totals(self, keys: list[bytes]) -> dict[bytes, Counters] | None:
        return None
