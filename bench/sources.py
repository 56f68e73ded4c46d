"""`python -m bench run --sources N`: the engine with a pool of N loopback sources
(mta.egress), next to the engine with today's single source, in the same run.

The rounds alternate (single, pool, single, pool, ...: `--rounds` pairs) so that other
load on the machine falls on both alike; the report gives each pair's ratio of end-to-end
rates (pool / single) and their median. The pool's sources are 127.0.1.1 ... 127.0.1.N
(loopback: the kernel has them all), weight 1 each, each with its own EHLO name.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from bench.report import RunResult, format_comparison
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


def sources_comparison(results: list[RunResult], count: int) -> str:
    """Each single/pool pair's ratios, and the median end-to-end ratio (pool / single)."""
    pairs = list(zip(results[0::2], results[1::2], strict=False))
    lines = [format_comparison(pool, single) for single, pool in pairs]
    ratios = sorted(pool.e2e_rate / single.e2e_rate for single, pool in pairs
                    if single.e2e_rate)
    lines.append(f"{count} sources / 1 source e2e ratio per round: "
                 f"{', '.join(f'{r:.2f}' for r in ratios)}"
                 + (f"; median {statistics.median(ratios):.2f}" if ratios else ""))
    return "\n".join(lines)
