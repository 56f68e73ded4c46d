"""Tokens, the failure limit, sampling, summaries; the routes that call the policy guard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from mta.audit import AuditLog, read_audit
from mta.config import AccountConfig, Config
from mta.http.api import AdminApi, Sampler, busiest_destinations, throttle_summary
from mta.http.app import HttpState, build_app
from mta.http.auth import FailureLimiter, TokenChecker, bearer_token
from mta.http.client import base_url
from mta.http.operations import InvalidToken, NotFound, PolicyOperations, SpoolOperations
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool


def test_tokens_name_the_operator() -> None:
    checker = TokenChecker("admin-secret", {"alice": "alice-secret", "nobody": ""})
    assert checker.enabled
    assert checker.identify("Bearer admin-secret") == "admin"
    assert checker.identify("bearer   alice-secret ") == "alice"
    for header in (None, "", "Bearer", "Bearer wrong", "Basic admin-secret",
                   "admin-secret", "Bearer admin-secretX"):
        assert checker.identify(header) is None, header
    assert not TokenChecker("", {"x": ""}).enabled
    assert TokenChecker("", {"bob": "b"}).identify("Bearer b") == "bob"
    assert bearer_token("Bearer a b") == "a b"


def test_failure_limit_per_client_and_window() -> None:
    limiter = FailureLimiter(limit=3, window=60.0, max_clients=2)
    for t in (0.0, 1.0, 2.0):
        assert not limiter.blocked("10.0.0.1", now=t)
        limiter.failed("10.0.0.1", now=t)
    assert limiter.blocked("10.0.0.1", now=3.0)
    assert not limiter.blocked("10.0.0.2", now=3.0)
    assert not limiter.blocked("10.0.0.1", now=60.5)  # the first failure left the window
    limiter.failed("10.0.0.2", now=61.0)
    limiter.failed("10.0.0.3", now=62.0)  # bounded memory: an old client is forgotten
    assert len(limiter._failures) <= 2


@pytest.mark.asyncio
async def test_sampler_caches_shares_one_run_and_backs_off_after_slow_scans() -> None:
    now = [0.0]
    runs = []

    async def compute() -> int:
        runs.append(now[0])
        await asyncio.sleep(0)
        now[0] += 0.5  # a scan that takes half a second
        return len(runs)

    sampler = Sampler(compute, min_interval=1.0, clock=lambda: now[0])
    assert await asyncio.gather(sampler.get(), sampler.get(), sampler.get()) == [1, 1, 1]
    now[0] += 5.0
    assert await sampler.get() == 1  # 20 x 0.5 s: not before 10 s
    now[0] += 5.0
    assert await sampler.get() == 2
    sampler.invalidate()
    assert await sampler.get() == 3
    assert len(runs) == 3


def test_throttle_rows_merge_across_workers_busiest_first() -> None:
    rows = [
        {"destination": "gmail", "kind": "provider", "state": "normal", "rate": 5.0,
         "connections": 2, "max_connections": 5, "sent": 10, "deferred": 0, "worker": 0},
        {"destination": "gmail", "kind": "provider", "state": "adapted", "rate": 3.0,
         "connections": 1, "max_connections": 5, "sent": 30, "deferred": 2, "worker": 1,
         "reason": "421 slow down"},
        {"destination": "d.test", "kind": "domain", "state": "suspended", "rate": None,
         "connections": 0, "max_connections": 2, "sent": 1, "deferred": 5, "worker": 0},
    ]
    merged = throttle_summary(rows)
    assert [r["destination"] for r in merged] == ["gmail", "d.test"]
    assert merged[0]["rate"] == 8.0
    assert merged[0]["connections"] == 3 and merged[0]["sent"] == 40
    assert merged[0]["state"] == "adapted" and merged[0]["reason"] == "421 slow down"
    queue = {"by_domain": {"d.test": {"queued": 4, "deferred": 1}, "e.test": {"held": 2}}}
    busiest = busiest_destinations(queue, rows)
    assert busiest[0] == {"destination": "d.test", "waiting": 5, "queued": 4, "deferred": 1,
                          "throttle": "suspended", "reason": "", "until": None}
    assert busiest[1]["throttle"] == "normal"


def test_base_url_from_the_listen_address() -> None:
    assert base_url("127.0.0.1:8025") == "http://127.0.0.1:8025"
    assert base_url("0.0.0.0:80") == "http://127.0.0.1:80"
    assert base_url("[::1]:8025") == "http://[::1]:8025"


# --- routes that need the guard, with an in-memory PolicyOperations ---------------------------

class MemoryPolicy(SpoolOperations):
    """A PolicyOperations that keeps suppression, suspension and unsubscribes in memory."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.suppressed: dict[str, dict[str, str]] = {}
        self.suspended: set[str] = set()

    async def suppressions(self, account: str, limit: int) -> list[dict[str, Any]]:
        return [{"address": a, "reason": r}
                for a, r in sorted(self.suppressed.get(account, {}).items())][:limit]

    async def suppress(self, account: str, address: str, reason: str) -> dict[str, Any]:
        self.suppressed.setdefault(account, {})[address] = reason
        return {"account": account, "address": address, "reason": reason}

    async def unsuppress(self, account: str, address: str) -> dict[str, Any]:
        if self.suppressed.get(account, {}).pop(address, None) is None:
            raise NotFound(f"{address} is not suppressed")
        return {"account": account, "address": address, "removed": True}

    async def suspend_account(self, name: str, reason: str) -> dict[str, Any]:
        self.suspended.add(name)
        return await self.account(name) | {"suspended": reason}

    async def resume_account(self, name: str) -> dict[str, Any]:
        self.suspended.discard(name)
        return await self.account(name)

    async def unsubscribe(self, token: str) -> dict[str, Any]:
        if token != "good-token":
            raise InvalidToken(token)
        self.suppressed.setdefault("shop", {})["reader@x.test"] = "unsubscribe"
        return {"address": "reader@x.test"}


@pytest_asyncio.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[TestClient, MemoryPolicy, Path]]:
    cfg = Config()
    cfg.engine.audit_log = str(tmp_path / "audit.jsonl")
    cfg.accounts = [AccountConfig("shop")]
    spool = Spool(tmp_path / "spool", 64 * 1024**2)
    committer = GroupCommitter(spool)
    committer.start()
    events: list[dict[str, Any]] = []
    policy = MemoryPolicy(cfg, spool, committer.submit, events.append)
    assert isinstance(policy, PolicyOperations)
    audit = AuditLog(cfg.engine.audit_log)
    admin = AdminApi(cfg, spool, policy, audit)
    st = HttpState(admin, TokenChecker("tok"), FailureLimiter(10, 60.0), audit, None)
    async with TestClient(TestServer(build_app(st))) as c:
        yield c, policy, Path(cfg.engine.audit_log)
    await committer.close()
    audit.close()
    spool.close()


AUTH = {"Authorization": "Bearer tok"}


@pytest.mark.asyncio
async def test_suppression_accounts_and_unsubscribe_routes_reach_the_guard(
        client: tuple[TestClient, MemoryPolicy, Path]) -> None:
    c, policy, audit_path = client
    r = await c.post("/api/v1/suppression/shop", json={"address": "a@b.test",
                                                      "reason": "asked"}, headers=AUTH)
    assert r.status == 200 and policy.suppressed == {"shop": {"a@b.test": "asked"}}
    listing = await (await c.get("/api/v1/suppression/shop", headers=AUTH)).json()
    assert listing == {"account": "shop", "entries": [{"address": "a@b.test",
                                                       "reason": "asked"}]}
    assert (await c.delete("/api/v1/suppression/shop/a@b.test", headers=AUTH)).status == 200
    assert (await c.delete("/api/v1/suppression/shop/a@b.test", headers=AUTH)).status == 404
    r = await c.post("/api/v1/accounts/shop/suspend", json={"reason": "abuse"}, headers=AUTH)
    assert r.status == 200 and policy.suspended == {"shop"}
    assert (await c.post("/api/v1/accounts/shop/resume", headers=AUTH)).status == 200
    assert policy.suspended == set()
    r = await c.post("/unsubscribe/good-token", data="List-Unsubscribe=One-Click")
    assert r.status == 200 and "Unsubscribed" in await r.text()
    assert policy.suppressed["shop"] == {"reader@x.test": "unsubscribe"}
    r = await c.post("/unsubscribe/forged-token", data="List-Unsubscribe=One-Click")
    assert r.status == 400
    actions = [(r["action"], r["object"], r["result"].split(":")[0])
               for r in read_audit(audit_path) if r["type"] == "action"]
    assert actions == [("suppression.add", "shop/a@b.test", "ok"),
                       ("suppression.remove", "shop/a@b.test", "ok"),
                       ("suppression.remove", "shop/a@b.test", "error"),
                       ("account.suspend", "shop", "ok"), ("account.resume", "shop", "ok")]


@pytest.mark.asyncio
async def test_metrics_render_without_a_multiprocess_dir(
        client: tuple[TestClient, MemoryPolicy, Path]) -> None:
    c, _, _ = client
    r = await c.get("/metrics")
    body = await r.text()
    assert r.status == 200 and "mta_queue_depth{state=\"queued\"} 0.0" in body
    assert "mta_campaigns_paused 0.0" in body
