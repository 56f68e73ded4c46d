"""The admin views' opens and clicks on several nodes: the cluster's, not this node's.

`EngagementView` wraps the worker's `PolicyOperations` (mta.http.operations): every
campaign and account row it returns with an ``engagement`` block gets the cluster's
counters and top links from the `SharedEngagement` port (mta.tracking.shared), the rates
recomputed over the row's delivered mail (itself the cluster's when the guard shares
its counters), and ``counted``: ``"cluster"``, or ``"node"`` while the other nodes
cannot be reached (this node's own figures, as on one node). Everything else passes
through unchanged.
"""

from __future__ import annotations

from typing import Any

from mta.tracking.shared import SharedEngagement
from mta.tracking.stats import with_rates

Row = dict[str, Any]


class EngagementView:
    def __init__(self, inner: Any, shared: SharedEngagement) -> None:
        self.inner = inner  # a PolicyOperations
        self.shared = shared

    def __getattr__(self, name: str) -> Any:  # every other operation: the inner one's
        return getattr(self.inner, name)

    async def campaigns(self) -> list[Row]:
        return await self._campaign_rows(await self.inner.campaigns())

    async def campaign(self, account: str, campaign: str) -> Row:
        return (await self._campaign_rows([await self.inner.campaign(account, campaign)]))[0]

    async def accounts(self) -> list[Row]:
        return await self._account_rows(await self.inner.accounts())

    async def account(self, name: str) -> Row:
        return (await self._account_rows([await self.inner.account(name)]))[0]

    async def _campaign_rows(self, rows: list[Row]) -> list[Row]:
        shown = [r for r in rows if "engagement" in r]
        figures = await self.shared.campaign_figures(
            [(r["account"], r["campaign"]) for r in shown])
        for i, row in enumerate(shown):
            if figures is None:
                row["engagement"]["counted"] = "node"
                continue
            counts, links = figures[i]
            row["engagement"] = with_rates(counts, int(row.get("delivered") or 0)) | {
                "top_links": links, "counted": "cluster"}
        return rows

    async def _account_rows(self, rows: list[Row]) -> list[Row]:
        shown = [r for r in rows if "engagement" in r]
        figures = await self.shared.account_figures([r["name"] for r in shown])
        for i, row in enumerate(shown):
            if figures is None:
                row["engagement"]["counted"] = "node"
                continue
            delivered = int((row.get("totals") or {}).get("delivered") or 0)
            row["engagement"] = with_rates(figures[i], delivered) | {"counted": "cluster"}
        return rows
