"""Opens and clicks counted across nodes ([cluster] redis): mta.cluster.engagement.

- plain logic: the script's keys and operations made from a batch, a large copy cut
  into calls, the links read back ranked;
- two nodes' counters (two LMDB spools, two links) in one process, a real redis-server:
  a person who opens on A and on B counts once; a batch retried adds nothing twice;
  Redis stopped: the batches wait in the journal and go out when it is back; Redis
  emptied: each node adds its copy again and the unique counts stay exact;
- two real engine nodes (own ports, spools and HTTP listeners, one Redis): opens and
  clicks served by node A and node B, `mta campaign show` on either node shows the
  cluster's totals and unique counts; Redis stopped mid-run, the hits served meanwhile
  reach the totals once it is back.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.engine_proc import PROJECT_ROOT, EngineProcess
from mta.cluster.engagement import (
    JOURNAL_DB,
    EngagementSync,
    Script,
    chunks,
    compact,
    expand,
    parse_links,
)
from mta.cluster.link import RedisLink
from mta.config import ClusterConfig
from mta.http.engagement_view import EngagementView
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool
from mta.tracking.stats import Mark, apply_events, deltas_of, engagement, open_dbs
from tests.helpers.engine import engine_config, wait_until
from tests.helpers.http import TOKEN
from tests.test_tracking import GOOGLE_PROXY, LINKS, bodies, fetch, newsletter


def hit(kind: str, who: str, verdict: str = "human", link: str = "", campaign: str = "spring"
        ) -> dict[str, Any]:
    return {"type": kind, "account": "shop", "campaign": campaign, "recipient": who,
            "class": verdict, "link": link, "user_agent": "x", "time": 1.0}


# --- plain logic ------------------------------------------------------------------------------

def key(kind: str, local: bytes) -> bytes:
    return kind.encode() + b":" + local


def test_a_batch_becomes_one_script_call() -> None:
    events = [hit("Open", "A@d"), hit("Open", "b@d", "machine"),
              hit("Click", "a@d", link=LINKS[0])]
    assert expand(compact(events)) == [{k: e[k] for k in (
        "type", "class", "account", "campaign", "recipient", "link")} for e in events]
    script = Script(b"done", key).add(deltas_of(events))
    assert script.keys == [b"done", b"n:Cshop\0spring", b"n:Ashop", b"l:shop\0spring",
                           b"s:o\0shop\0spring\0a@d", b"s:c\0shop\0spring\0a@d"]
    ops, rest = [], script.args[2:]
    while rest:
        size = 4 if rest[0] == "i" else 5
        ops.append(tuple(rest[:size]))
        rest = rest[size:]
    assert ops == [("i", 2, "clicks_human", 1), ("i", 2, "opens_human", 1),
                   ("i", 2, "opens_machine", 1), ("i", 3, "clicks_human", 1),
                   ("i", 3, "opens_human", 1), ("i", 3, "opens_machine", 1),
                   ("i", 4, b"h" + LINKS[0].encode(), 1),  # the link's human click
                   ("u", 5, "unique_opens", 2, 3), ("u", 6, "unique_clicks", 2, 3)]


def test_a_large_copy_is_cut_and_links_come_back_ranked() -> None:
    deltas = deltas_of([hit("Open", f"p{i}@d") for i in range(5)])
    parts = chunks(deltas, size=2)
    assert [len(p.marks) for p in parts] == [2, 2, 1]
    assert parts[0].counts and not parts[1].counts  # the totals once
    rows = parse_links({b"h" + LINKS[1].encode(): b"1", b"m" + LINKS[1].encode(): b"4",
                        b"h" + LINKS[0].encode(): b"2", b"m" + LINKS[2].encode(): b"9"})
    assert [(r["url"], r["clicks_human"], r["clicks_machine"]) for r in rows] == [
        (LINKS[0], 2, 0), (LINKS[1], 1, 4), (LINKS[2], 0, 9)]


# --- two nodes in one process, a real Redis -------------------------------------------------

@dataclass
class Node:
    spool: Spool
    committer: GroupCommitter
    link: RedisLink
    sync: EngagementSync

    async def count(self, events: list[dict[str, Any]]) -> None:
        """What the tracker does with a decided batch: count, keep, share."""
        def op(txn: Any) -> None:
            apply_events(self.spool, txn, events)
            self.sync.keep(txn, events)

        await self.committer.submit(op)
        await self.sync.share()

    def journal(self) -> int:
        with self.spool.env.begin() as txn:
            return int(txn.stat(self.spool.dbs[JOURNAL_DB])["entries"])

    def own(self) -> dict[str, Any]:
        with self.spool.env.begin() as txn:
            return engagement(self.spool, txn, "shop", "spring", 10)


@asynccontextmanager
async def node(tmp: Path, name: str, url: str) -> AsyncIterator[Node]:
    spool = Spool(tmp / name / "spool", 64 * 1024**2)
    open_dbs(spool)  # as the tracker does
    committer = GroupCommitter(spool)
    committer.start()
    link = RedisLink(ClusterConfig(redis=url, timeout=0.3, retry_interval=0.1, node_ttl=2.0),
                     f"{name}/0")
    await link.start()
    sync = EngagementSync(link, spool, committer.submit)
    await sync.start()
    try:
        yield Node(spool, committer, link, sync)
    finally:
        await sync.close()
        await link.close()
        await committer.close()
        spool.close()


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def figures(n: Node) -> dict[str, int] | None:
    found = await n.sync.campaign_figures([("shop", "spring")])
    return None if found is None else found[0][0]


@pytest.mark.asyncio
async def test_two_nodes_count_each_person_once(tmp_path: Path, redis_server: Any) -> None:
    async with node(tmp_path, "a", redis_server.url) as a, \
            node(tmp_path, "b", redis_server.url) as b:
        await a.count([hit("Open", "ann@d"), hit("Click", "ann@d", link=LINKS[0])])
        await b.count([hit("Open", "ANN@d"), hit("Open", "bob@d"),
                       hit("Open", "bob@d", "machine"), hit("Click", "ann@d", link=LINKS[0]),
                       hit("Click", "cy@d", "machine", LINKS[1])])
        totals = await figures(b)
        assert totals == await figures(a)
        assert (totals["opens_human"], totals["opens_machine"], totals["unique_opens"]) == (
            3, 1, 2)
        assert (totals["clicks_human"], totals["clicks_machine"], totals["unique_clicks"]) == (
            2, 1, 1)
        assert a.own()["unique_opens"] == 1 and b.own()["unique_opens"] == 2  # each its own
        assert a.journal() == b.journal() == 0
        links = (await a.sync.campaign_figures([("shop", "spring")]))[0][1]
        assert links[0] == {"url": LINKS[0], "clicks_human": 2, "clicks_machine": 0}
        account = (await a.sync.account_figures(["shop"]))[0]
        assert account["unique_opens"] == 2 and account["clicks_machine"] == 1
        # A batch added twice (a retry after a timeout): its done key makes it once.
        script = Script(a.sync.rkey("done", b"retry"), a.sync.rkey).add(
            deltas_of([hit("Open", "dee@d")]))
        for expected in (1, -1):
            assert await a.sync._add(keys=script.keys, args=script.args) == expected
        assert (await figures(a))["opens_human"] == 4
        # The admin view of a campaign row: the cluster's figures, rates over delivered.
        row = {"account": "shop", "campaign": "spring", "delivered": 8,
               "engagement": a.own()}

        class Inner:
            async def campaign(self, account: str, campaign: str) -> dict[str, Any]:
                return row

            async def accounts(self) -> list[dict[str, Any]]:
                return [{"name": "shop", "totals": {"delivered": 6}, "engagement": {}},
                        {"name": "nobody"}]

            def thresholds(self) -> dict[str, float]:
                return {"min_volume": 100}

        view = EngagementView(Inner(), a.sync)
        shown = (await view.campaign("shop", "spring"))["engagement"]
        assert (shown["unique_opens"], shown["open_rate"], shown["counted"]) == (3, 0.375,
                                                                              "cluster")
        assert shown["top_links"][0]["url"] == LINKS[0]
        accounts = await view.accounts()
        assert accounts[0]["engagement"]["unique_opens"] == 3
        assert accounts[0]["engagement"]["open_rate"] == 0.5 and "engagement" not in accounts[1]
        assert view.thresholds() == {"min_volume": 100}  # the rest: the inner operations'
        # The account purged (retention): its records leave Redis; another account stays.
        await b.count([hit("Open", "ann@d") | {"account": "other"}])
        a.sync.on_event({"type": "AccountPurged", "purged_account": "shop"})
        assert await eventually(lambda: _no_keys(a, b"*shop*"))
        assert (await a.sync.account_figures(["other"]))[0]["unique_opens"] == 1


async def _no_keys(n: Node, pattern: bytes) -> bool:
    return not [k async for k in n.link.redis.scan_iter(match=pattern)]


@pytest.mark.asyncio
async def test_batches_wait_out_an_outage_and_a_lost_copy_comes_back(
        tmp_path: Path, redis_server: Any) -> None:
    async with node(tmp_path, "a", redis_server.url) as a, \
            node(tmp_path, "b", redis_server.url) as b:
        await a.count([hit("Open", "ann@d"), hit("Click", "ann@d", link=LINKS[0])])
        await b.count([hit("Open", "bob@d")])
        redis_server.stop()
        await b.count([hit("Open", "ann@d"), hit("Open", "cy@d")])  # counted, kept
        await a.count([hit("Click", "bob@d", link=LINKS[1])])
        assert b.journal() == 1 and a.journal() == 1
        assert await figures(b) is None  # the admin views fall back to the node's own
        redis_server.start()
        expected = {"opens_human": 4, "opens_machine": 0, "unique_opens": 3,
                    "clicks_human": 2, "clicks_machine": 0, "unique_clicks": 2}
        assert await eventually(lambda: _equal(b, expected)), await figures(b)
        assert await eventually(lambda: _journals_empty(a, b))
        # Redis emptied (no restart): each node adds its whole copy again.
        redis_server.cli("FLUSHALL")
        assert await eventually(lambda: _equal(a, expected)), await figures(a)
        assert await eventually(lambda: _equal(b, expected))
        assert await eventually(lambda: _republished(a, b))  # counted once settled in LMDB
        await a.count([hit("Open", "cy@d"), hit("Open", "dee@d")])  # cy counted on b already
        assert (await figures(b))["unique_opens"] == 4


async def _equal(n: Node, expected: dict[str, int]) -> bool:
    return await figures(n) == expected


async def _republished(*nodes: Node) -> bool:
    return all(n.sync.counts["republished"] > 0 for n in nodes)


async def _journals_empty(*nodes: Node) -> bool:
    return all(n.journal() == 0 for n in nodes)


def test_marks_of_the_local_copy_name_their_counters(tmp_path: Path) -> None:
    from mta.tracking.stats import local_copy

    spool = Spool(tmp_path / "spool", 64 * 1024**2)
    open_dbs(spool)
    try:
        with spool.env.begin(write=True) as txn:
            apply_events(spool, txn, [hit("Open", "a@d"), hit("Open", "a@d"),
                                      hit("Click", "b@d", "machine", LINKS[2])])
        with spool.env.begin() as txn:
            copy, records = local_copy(spool, txn)
    finally:
        spool.close()
    assert copy.marks == [Mark(b"o\0shop\0spring\0a@d", "unique_opens",
                               (b"Cshop\0spring", b"Ashop"))]
    assert copy.counts[b"Cshop\0spring"]["opens_human"] == 2
    assert "unique_opens" not in copy.counts[b"Ashop"]  # they come back from the marks
    assert copy.links == {b"Lshop\0spring\0" + LINKS[2].encode(): [0, 1]}
    assert records == 4


# --- two engine nodes, one Redis -----------------------------------------------------------------

def start_node(tmp: Path, name: str, dns: Any, port: int, redis_url: str) -> EngineProcess:
    config = engine_config(
        tmp / name, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": port, "allow_loopback_mx": True},
        smtp={"trusted_account": "shop"}, bounce={"verp_secret": "cluster-verp"},
        policy={"flush_interval": 0.05, "unsubscribe_secret": "cluster-unsub"},
        tracking={"scanner_window": 1.0}, http={"admin_token": TOKEN},  # the CLI asks the API
        accounts=[{"name": "shop", "email": "ops@shop.test"}],
        cluster={"redis": redis_url, "node": name, "timeout": 0.3, "retry_interval": 0.3,
                 "node_ttl": 3.0})
    config["http"]["public_url"] = f"http://{config['http']['listen']}"
    return EngineProcess(tmp / name, config, workers=1).start()


def shown(engine: EngineProcess) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "mta", "campaign", "show", "spring", "--json",
                          "--config", str(engine.config_path)], capture_output=True, text=True,
                         timeout=60, cwd=PROJECT_ROOT, check=True)
    return json.loads(run.stdout)


def send(engine: EngineProcess, rcpt: str) -> None:
    import smtplib

    with smtplib.SMTP(engine.host, engine.port, timeout=30) as client:
        client.sendmail("news@shop.test", [rcpt], newsletter(rcpt))


def on(engine: EngineProcess, url: str) -> str:
    """The same tracking URL as served by `engine` (a load balancer's choice)."""
    return re.sub(r"^http://[^/]+", f"http://{engine.config['http']['listen']}", url)


def test_engines_show_the_cluster_opens_and_clicks(tmp_path: Path, dns_server: Any,
                                                   route: Any, redis_server: Any) -> None:
    dest = route("dest.test", "127.0.0.2")
    a = start_node(tmp_path, "a", dns_server, dest.port, redis_server.url)
    b = start_node(tmp_path, "b", dns_server, dest.port, redis_server.url)
    try:
        send(a, "ann@dest.test")
        send(a, "bob@dest.test")
        send(b, "cy@dest.test")
        assert wait_until(lambda: len(dest.received) == 3, timeout=30)
        urls = {}
        for message in dest.received:
            html = bodies(message.data)[1]
            urls[message.rcpt_tos[0].split("@")[0]] = (
                re.findall(r'href="(http://[^"]+/c/[^"]+)"', html)[:3],
                re.search(r'<img src="([^"]+)"', html).group(1))
        ann_links, ann_pixel = urls["ann"]
        assert fetch(on(a, ann_pixel))[0] == 200  # ann opens on A and again on B
        assert fetch(on(b, ann_pixel))[0] == 200
        assert fetch(on(b, urls["bob"][1]))[0] == 200  # bob on B, and a proxy on A
        assert fetch(on(a, urls["bob"][1]), GOOGLE_PROXY)[0] == 200
        status, headers, _ = fetch(on(b, ann_links[0]))  # a's link, clicked on B
        assert status == 302 and headers["Location"] == LINKS[0]
        assert fetch(on(a, ann_links[0]))[0] == 302
        assert fetch(on(a, urls["cy"][0][1]))[0] == 302  # b's link, clicked on A
        expected = {"opens_human": 3, "opens_machine": 1, "unique_opens": 2,
                    "clicks_human": 3, "clicks_machine": 0, "unique_clicks": 2}

        def engagement_of(engine: EngineProcess) -> dict[str, Any]:
            e = shown(engine)["engagement"]
            return {k: e[k] for k in (*expected, "counted")}

        assert wait_until(lambda: engagement_of(a) == {**expected, "counted": "cluster"},
                          timeout=20), engagement_of(a)
        assert wait_until(lambda: engagement_of(b) == {**expected, "counted": "cluster"},
                          timeout=10), engagement_of(b)
        for engine in (a, b):  # the same top links and rates on both nodes
            e = shown(engine)["engagement"]
            assert e["top_links"][0] == {"url": LINKS[0], "clicks_human": 2,
                                         "clicks_machine": 0}
            assert e["open_rate"] == round(2 / 3, 6) and e["click_to_open"] == 1.0
        # Redis stopped: hits served meanwhile are counted where served, then shared.
        redis_server.stop()
        assert fetch(on(b, urls["cy"][1]))[0] == 200
        assert fetch(on(a, urls["cy"][1]))[0] == 200
        assert wait_until(lambda: shown(b)["engagement"].get("counted") == "node", timeout=10)
        redis_server.start()
        later = {**expected, "opens_human": 5, "unique_opens": 3, "counted": "cluster"}
        assert wait_until(lambda: engagement_of(a) == later and engagement_of(b) == later,
                          timeout=20), (engagement_of(a), engagement_of(b))
    finally:
        a.stop()
        b.stop()


def test_nodes_sign_tracking_tokens_alike(tmp_path: Path) -> None:
    """A link sent by node A is clicked on node B: with [cluster] redis and no [tracking]
    secret, the key comes from the shared unsubscribe secret, not from each spool."""
    from mta.config import Config
    from mta.tracking.hits import tracking_secret

    spools = [Spool(tmp_path / name, 16 * 1024**2) for name in ("a", "b")]
    try:
        cfg = Config()
        alone = [tracking_secret(cfg, s) for s in spools]
        assert alone[0] != alone[1]  # one node each: their own random keys
        cfg.cluster.redis, cfg.policy.unsubscribe_secret = "redis://127.0.0.1:9/0", "shared"
        both = [tracking_secret(cfg, s) for s in spools]
        assert both[0] == both[1] and both[0] not in alone and both[0] != b"shared"
        cfg.tracking.secret = "given"
        assert tracking_secret(cfg, spools[0]) == b"given"
    finally:
        for spool in spools:
            spool.close()
