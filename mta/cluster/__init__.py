"""Several engine nodes sharing throttles and policy state through Redis ([cluster]).

Each node keeps its own LMDB spool, the durable copy of the mail it accepted. With
`[cluster] redis` set, what must hold across nodes goes through Redis: provider
budgets and connection leases (`throttle`), campaign counters, pauses, suppression
lists and monthly caps (`policy`). `link.RedisLink` is each worker's connection and
knows whether Redis is usable; while it is not, every part falls back to conservative
local limits and catches up when Redis returns. Without `[cluster] redis` none of this
runs and nothing needs Redis.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from mta.cluster.link import DOWN, RedisLink
from mta.context import WorkerContext

__all__ = ["DOWN", "RedisLink", "check_cluster", "connect_cluster", "node_name"]


def check_cluster(cfg: Any) -> None:
    """A startup check: the secrets that sign links and return paths must be shared.

    A VERP bounce or an unsubscribe click may come back to any node; with each node's
    own random key, the other nodes would not recognise it.
    """
    from mta.config import ConfigError

    if not cfg.cluster.redis:
        return
    if not cfg.policy.unsubscribe_secret:
        raise ConfigError("[policy] unsubscribe_secret: set it, the same on every node, "
                          "when [cluster] redis is set")
    if not cfg.bounce.verp_secret:
        raise ConfigError("[bounce] verp_secret: set it, the same on every node, "
                          "when [cluster] redis is set")


def node_name(cfg: Any) -> str:
    return cfg.cluster.node or f"{socket.gethostname()}:{cfg.smtp.listen.rpartition(':')[2]}"


async def connect_cluster(ctx: WorkerContext) -> RedisLink | None:
    """The worker's Redis link, or None on a single node."""
    cfg = ctx.cfg
    if not cfg.cluster.redis:
        return None
    link = RedisLink(cfg.cluster, f"{node_name(cfg)}/{ctx.index}")
    await link.start()
    ctx.on_close(link.close)
    announce_link_changes(ctx, link)
    return link


def announce_link_changes(ctx: WorkerContext, link: RedisLink) -> None:
    """`ClusterDown` / `ClusterUp` events in the event log when Redis goes and comes back."""
    down_at = [time.time()]

    def down() -> None:
        down_at[0] = time.time()
        ctx.emit({"type": "ClusterDown", "time": down_at[0], "node": link.member,
                  "outages": link.outages, "limits": "local"})

    async def up() -> None:
        now = time.time()
        ctx.emit({"type": "ClusterUp", "time": now, "node": link.member,
                  "down_for": round(now - down_at[0], 3)})

    link.on_down.append(down)
    link.on_up.insert(0, up)
    if not link.up:
        down()
