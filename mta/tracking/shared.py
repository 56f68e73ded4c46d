"""The port through which the engagement counters are shared with other nodes.

Each node counts the opens and clicks it served in its own LMDB (mta.tracking.stats).
With several nodes a person's open may reach node A and their click node B, so the
figures an operator is shown, and the check that counts a recipient once as unique,
must be the cluster's. `SharedEngagement` is what the tracker and the admin views need
from the other nodes: keep a batch for sharing in the transaction that counts it on
this node, share what is kept, and read the cluster's figures. On one node
`LocalEngagement` shares nothing; `mta.cluster.engagement.EngagementSync` implements
it over Redis and is plugged in by the engine's wiring.
"""

from __future__ import annotations

from typing import Any, Protocol

Figures = dict[str, int]  # the counters of mta.tracking.stats.FIELDS
LinkRows = list[dict[str, Any]]  # url, clicks_human, clicks_machine; the most clicked first


class SharedEngagement(Protocol):
    def keep(self, txn: Any, events: list[dict[str, Any]]) -> None:
        """In the write transaction counting `events` on this node: keep them to share."""

    async def share(self) -> None:
        """Share what was kept (what cannot be shared now waits for the next call)."""

    async def campaign_figures(self, pairs: list[tuple[str, str]]
                               ) -> list[tuple[Figures, LinkRows]] | None:
        """The cluster's counters and top links of (account, campaign) pairs, or None
        (one node, or the cluster unreachable: the node's own figures stand)."""

    async def account_figures(self, accounts: list[str]) -> list[Figures] | None:
        """The cluster's counters of whole accounts, or None."""


class LocalEngagement:
    """One node: its own counters are the totals."""

    def keep(self, txn: Any, events: list[dict[str, Any]]) -> None:
        return None

    async def share(self) -> None:
        return None

    async def campaign_figures(self, pairs: list[tuple[str, str]]
                               ) -> list[tuple[Figures, LinkRows]] | None:
        return None

    async def account_figures(self, accounts: list[str]) -> list[Figures] | None:
        return None
