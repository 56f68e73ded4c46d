"""The admin API's view of a running policy guard: `PolicyOperations` (mta.http.operations).

Made by the engine's wiring for the worker that serves HTTP. Reads run in a thread
(they may scan the jobs), writes go through the worker's group committer; the worker's
cached pauses are refreshed at once after each change, other workers within
`[policy] cache_ttl`. Errors are the port's: NotFound (404), InvalidToken, and
ValueError for a request that cannot be done (400).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mta.http.operations import InvalidToken, NotFound
from mta.outbox.wiring import write_emitting
from mta.policy import operations
from mta.policy.guard import InvalidUnsubscribe, PolicyGuard
from mta.policy.model import ACTIVE, Counters
from mta.policy.rates import monthly_cap
from mta.policy.store import account_key, campaign_key, month_key

T = TypeVar("T")
BY = "admin-api"


def _port_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except operations.NotFoundError as exc:
            raise NotFound(str(exc)) from None
        except InvalidUnsubscribe as exc:
            raise InvalidToken(str(exc)) from None

    return wrapper


class GuardOperations:
    def __init__(self, guard: PolicyGuard) -> None:
        self.guard = guard
        self.store = guard.store
        self.configured = operations.configured_accounts(guard.cfg)

    def _account_op(self, name: str, fn: Callable[[Any], T]) -> Callable[[Any], T]:
        """`fn` for an account that exists (NotFoundError for any other name)."""
        def run(txn: Any) -> T:
            operations.require_account(self.store, txn, name, self.configured)
            return fn(txn)

        return run

    async def _read(self, fn: Callable[[Any], T]) -> T:
        def run() -> T:
            with self.store.read() as txn:
                return fn(txn)

        return await asyncio.to_thread(run)

    async def _write(self, fn: Callable[[Any], T]) -> T:
        result = await self.guard.committer.submit(fn)
        self.guard.refresh()
        return result

    async def _write_emitting(self, fn: Callable[[Any], T],
                              events_of: Callable[[T], list[dict[str, Any]]]) -> T:
        """`fn`, and the events of its result recorded in the same transaction (when an
        event outbox is kept), emitted once committed (mta.outbox.wiring)."""
        return await write_emitting(self._write, self.guard.record_events, self.guard.emit,
                                    fn, events_of)

    def thresholds(self) -> dict[str, float]:
        t = self.guard.thresholds
        return {"hard_bounce": t.hard_bounce_rate / 100, "complaint": t.complaint_rate / 100,
                "unsubscribe": t.unsubscribe_rate / 100, "min_volume": t.min_volume}

    async def campaigns(self) -> list[dict[str, Any]]:
        return await self._cluster_campaigns(await self._read(lambda txn: operations.list_campaigns(
            self.store, txn, self.guard.thresholds)))

    @_port_errors
    async def campaign(self, account: str, campaign: str) -> dict[str, Any]:
        row = (await self._cluster_campaigns([await self._read(lambda txn: operations.show_campaign(
            self.store, txn, account, campaign, self.guard.thresholds))]))[0]
        if row["status"] == ACTIVE and not row["by"] and not any(  # never counted nor acted on
                row[k] for k in ("submitted", "sent", "queued", "deferred", "held")):
            raise NotFound(f"no campaign {campaign!r} of account {account!r}")
        return row

    async def _cluster_campaigns(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """On several nodes, counts and rates of all nodes (`counted` says whose)."""
        keys = [campaign_key(r["account"], r["campaign"]) for r in rows]
        totals = await self._totals(rows, keys)
        if totals is None:
            return rows
        states = await self._read(lambda txn: [self.store.get_campaign(
            txn, r["account"], r["campaign"]) for r in rows])
        for row, key, state in zip(rows, keys, states, strict=True):
            row.update(operations.counter_fields(totals[key], state, self.guard.thresholds),
                       counted="cluster")
        return rows

    async def _cluster_accounts(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = [k for r in rows for k in (account_key(r["name"]), month_key(r["name"], r["month"]))]
        totals = await self._totals(rows, keys)
        for row, i in zip(rows, range(0, len(keys), 2), strict=True) if totals else ():
            row.update(totals=totals[keys[i]].as_dict(), counted="cluster",
                       month_sent=totals[keys[i + 1]].submitted)
        return rows

    async def _totals(self, rows: list[dict[str, Any]], keys: list[bytes]) -> Any:
        """The cluster's counters of `keys`, or None (one node; Redis unreachable)."""
        shared = self.guard.shared
        if not shared.judges or not rows:
            return None  # one node: its own counts are the totals
        totals = await shared.shared_totals(keys)
        if totals is None:
            for row in rows:
                row["counted"] = "node"  # this node's own counts only, for now
        return totals

    async def pause_campaign(self, account: str, campaign: str, reason: str) -> dict[str, Any]:
        now = self.guard.clock()
        await self._write_emitting(lambda txn: operations.pause_campaign(
            self.store, txn, account, campaign, BY, reason, now), lambda result: [
            {"type": "CampaignPaused", "account": account, "campaign": campaign,
             "rule": "operator", "reason": reason, "by": BY, "held": result["held"]}])
        return await self.campaign(account, campaign)

    async def resume_campaign(self, account: str, campaign: str, no_guard: str = ""
                              ) -> dict[str, Any]:
        now = self.guard.clock()
        totals = await self._judged_totals(account, campaign)
        await self._write_emitting(lambda txn: operations.resume_campaign(
            self.store, txn, account, campaign, BY, now, no_guard, totals), lambda result: [
            {"type": "CampaignResumed", "account": account, "campaign": campaign, "by": BY,
             "released": result["released"], "guard": result["guard"],
             **({"no_guard": no_guard} if no_guard else {})}])
        return await self.campaign(account, campaign)

    async def _judged_totals(self, account: str, campaign: str) -> Counters | None:
        """The counters the campaign is judged on: on several nodes the cluster's (None:
        this node's own, also while Redis cannot say)."""
        key = campaign_key(account, campaign)
        shared = self.guard.shared
        totals = await shared.shared_totals([key]) if shared.judges else None
        return None if totals is None else totals[key]

    async def drop_campaign(self, account: str, campaign: str) -> dict[str, Any]:
        now = self.guard.clock()
        removed = await self._write_emitting(lambda txn: operations.drop_campaign(
            self.store, txn, account, campaign, BY, now), lambda removed: [
            *operations.removed_events(removed, "Dropped", "dropped by an operator"),
            {"type": "CampaignDropped", "account": account, "campaign": campaign, "by": BY,
             "jobs": len(removed)}])
        return await self._read(lambda txn: operations.show_campaign(
            self.store, txn, account, campaign, self.guard.thresholds)) | {
            "dropped": len(removed)}

    def _account_row(self, txn: Any, name: str) -> dict[str, Any]:
        config = self.guard.accounts.get(name)
        cap = monthly_cap(config.subscriber_level, self.guard.pc.monthly_cap_factor
                          ) if config else None
        return operations.account_row(self.store, txn, name, config, cap, self.guard.clock())

    async def accounts(self) -> list[dict[str, Any]]:
        def rows(txn: Any) -> list[dict[str, Any]]:
            names = operations.known_accounts(self.store, txn, self.guard.accounts)
            return [self._account_row(txn, name) for name in names]

        return await self._cluster_accounts(await self._read(rows))

    @_port_errors
    async def account(self, name: str) -> dict[str, Any]:
        row = await self._read(self._account_op(name, lambda txn: self._account_row(txn, name)))
        return (await self._cluster_accounts([row]))[0]

    @_port_errors
    async def suspend_account(self, name: str, reason: str) -> dict[str, Any]:
        now = self.guard.clock()
        await self._write_emitting(self._account_op(name, lambda txn: operations.suspend_account(
            self.store, txn, name, BY, reason, now)), lambda _: [
            {"type": "AccountSuspended", "account": name, "by": BY, "reason": reason}])
        return await self.account(name)

    @_port_errors
    async def resume_account(self, name: str) -> dict[str, Any]:
        now = self.guard.clock()
        await self._write_emitting(self._account_op(name, lambda txn: operations.resume_account(
            self.store, txn, name, BY, now)), lambda _: [
            {"type": "AccountResumed", "account": name, "by": BY}])
        return await self.account(name)

    @_port_errors
    async def suppressions(self, account: str, limit: int) -> list[dict[str, Any]]:
        return await self._read(self._account_op(account, lambda txn: operations.suppression_rows(
            self.store, txn, account, limit)))

    @_port_errors
    async def suppress(self, account: str, address: str, reason: str) -> dict[str, Any]:
        now = self.guard.clock()
        added = await self._write(self._account_op(account, lambda txn: operations.add_suppression(
            self.store, txn, account, address, reason or "manual", now)))
        return {"account": account, "address": address.lower(), "added": added}

    @_port_errors
    async def unsuppress(self, account: str, address: str) -> dict[str, Any]:
        removed = await self._write(self._account_op(account, lambda txn: (
            operations.remove_suppression(self.store, txn, account, address))))
        if not removed:
            raise operations.NotFoundError(f"{address} is not on the list of {account}")
        return {"account": account, "address": address.lower(), "removed": True}

    async def held(self, limit: int) -> list[dict[str, Any]]:
        """Held jobs (any reason), one row per job, as the spool-only stand-in has them."""
        def rows(txn: Any) -> list[dict[str, Any]]:
            out = []
            for message in operations.list_held(self.store, txn, reason=None, limit=limit):
                for job in message["jobs"]:
                    out.append({"job": job, "reason": message["reason"],
                                "message": message["id"], "account": message["account"],
                                "campaign": message["campaign"],
                                "recipients": message["recipients"]})
            return out[:limit]

        return await self._read(rows)

    @_port_errors
    async def release_held(self, job_id: str) -> dict[str, Any]:
        now = self.guard.clock()
        await self._write_emitting(lambda txn: operations.release_held(
            self.store, txn, job_id, now, reason=None), lambda count: [
            {"type": "HeldReleased", "job": job_id, "by": BY, "jobs": count}])
        return {"job": job_id, "released": True}

    @_port_errors
    async def reject_held(self, job_id: str) -> dict[str, Any]:
        await self._write_emitting(lambda txn: operations.reject_held(
            self.store, txn, job_id, reason=None), lambda removed: operations.removed_events(
            removed, "Rejected", "rejected by an operator"))
        return {"job": job_id, "rejected": True}

    @_port_errors
    async def unsubscribe(self, token: str) -> dict[str, Any]:
        result = await self.guard.unsubscribe(token)
        return {"account": result.account, "campaign": result.campaign,
                "recipient": result.recipient, "counted": result.counted}
