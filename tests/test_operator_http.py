"""The admin API as an operator meets it: a 429 that says how long, a resume without the
guard that is audited, the dashboard's throughput from the engine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from mta.audit import read_audit
from mta.queue.spool import NewMessage
from tests.test_http_unit import AUTH, MemoryPolicy, client  # noqa: F401  (the fixture)

Client = tuple[TestClient, MemoryPolicy, Path]


@pytest.mark.asyncio
async def test_a_429_says_when_to_try_again(client: Client) -> None:  # noqa: F811
    c, _, _ = client
    for _ in range(10):  # the fixture's limit: 10 bad tokens a minute
        assert (await c.get("/api/v1/queue", headers={"Authorization": "Bearer bad"})
                ).status == 401
    refused = await c.get("/api/v1/queue", headers=AUTH)
    assert refused.status == 429
    wait = int(refused.headers["Retry-After"])
    assert 55 <= wait <= 60
    assert (await refused.json())["error"] == (
        f"too many failed authentications from 127.0.0.1: try again in {wait} s")


@pytest.mark.asyncio
async def test_a_resume_without_the_guard_is_audited_with_its_reason(
        client: Client) -> None:  # noqa: F811
    c, policy, audit_path = client
    policy.spool.apply([policy.spool.store_op(NewMessage(
        "a@shop.test", ["b@dest.test"], b"\r\n", "shop", "spring", received=time.time()))])
    path = "/api/v1/campaigns/shop/spring/resume"
    bad = await c.post(path, json={"no_guard": 5}, headers=AUTH)
    assert bad.status == 400 and "reason" in (await bad.json())["error"]
    ok = await c.post(path, json={"no_guard": "list checked by hand"}, headers=AUTH)
    assert ok.status == 200
    [record] = [r for r in read_audit(audit_path)
                if r["type"] == "action" and r["result"] == "ok"]
    assert (record["action"], record["object"], record["no_guard"]) == (
        "campaign.resume", "shop/spring", "list checked by hand")


@pytest.mark.asyncio
async def test_the_dashboard_carries_the_engine_s_throughput(client: Client) -> None:  # noqa: F811
    c, _, _ = client
    data = await (await c.get("/api/v1/dashboard", headers=AUTH)).json()
    hour, day = data["throughput"]["seconds"], data["throughput"]["minutes"]
    assert (hour["step"], len(hour["received"]), day["step"], len(day["delivered"])) == (
        1, 3600, 60, 1440)
    assert hour["start"] + 3600 <= data["time"] < hour["start"] + 3602
    assert set(data["throughput"]["current"]) == {"received", "delivered", "deferred"}
