"""`python -m bench run --sources N`: the engine with a pool of N loopback sources
(mta.egress), next to the engine with today's single source, in the same run.

The rounds are pairs, counterbalanced (single then pool, pool then single, ...:
bench/pairs.py) so that other load on the machine falls on both alike; the report gives
each pair's ratio of end-to-end rates (pool / single) and their median. The pool's sources are 127.0.1.1 ... 127.0.1.N
(loopback: the kernel has them all), weight 1 each, each with its own EHLO name.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bench.scenarios import Scenario

SOURCE_NET = "127.0.1."


def egress_section(count: int) -> dict[str, Any]:
    names = [f"src{i}" for i in range(1, count + 1)]
    return {
        "sources": [{"name": name, "address": f"{SOURCE_NET}{i}",
                     "ehlo_name": f"{name}.mta-bench.localhost"}
                    for i, name in enumerate(names, 1)],
        "pools": [{"name": "bench", "sources": [{"source": name, "weight": 1}
                                                for name in names]}],
        "default_pool": "bench",
    }


def with_sources(scenario: Scenario, count: int) -> Scenario:
    """The scenario with its engine sending from a pool of `count` sources (0: none)."""
    engine = {k: v for k, v in scenario.engine.items() if k != "egress"}
    if count:
        engine["egress"] = egress_section(count)
    return replace(scenario, engine=engine)
