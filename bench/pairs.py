"""A/B comparisons of the engine in one sitting (--tls, --tracking compare, --sources,
--webhook): the order of the runs, and the ratio of each round's pair.

The rounds are counterbalanced (A B, B A, A B, ...): a machine that gets slower or faster
during a sitting (other load, a warming page cache, a throttled CPU) then weighs on both
sides alike instead of always on the second run of a pair.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from bench.report import RunResult, format_comparison


def ab_order(rounds: int) -> list[bool]:
    """The runs in order: False for the baseline (A), True for the variant (B)."""
    order: list[bool] = []
    for index in range(max(1, rounds)):
        order += [False, True] if index % 2 == 0 else [True, False]
    return order


def paired(results: Sequence[RunResult], order: Sequence[bool]
           ) -> list[tuple[RunResult, RunResult]]:
    """(baseline, variant) of each complete round."""
    pairs = []
    for first in range(0, len(results) - 1, 2):
        a, b = results[first], results[first + 1]
        pairs.append((b, a) if order[first] else (a, b))
    return pairs


def pair_ratios(results: Sequence[RunResult], order: Sequence[bool]) -> list[float]:
    """variant / baseline end-to-end rate of each round, in run order."""
    return [b.e2e_rate / a.e2e_rate for a, b in paired(results, order) if a.e2e_rate]


def pair_comparison(results: Sequence[RunResult], order: Sequence[bool], label: str) -> str:
    """Each round's ratios, and the median end-to-end ratio (`label`: "B / A")."""
    pairs = paired(results, order)
    lines = [format_comparison(b, a) for a, b in pairs]
    ratios = pair_ratios(results, order)
    lines.append(f"{label} e2e ratio per round: {', '.join(f'{r:.2f}' for r in ratios)}"
                 + (f"; median {statistics.median(ratios):.2f}" if ratios else ""))
    if len(ratios) > 1:
        lines.append(spread_line(ratios))
    return "\n".join(lines)


def spread_line(ratios: Sequence[float]) -> str:
    """How far the rounds' ratios can be trusted: their mean, its standard error and the
    range (rounds on a shared machine swing by a tenth either way)."""
    error = statistics.stdev(ratios) / len(ratios) ** 0.5
    return (f"  rounds: mean {statistics.fmean(ratios):.3f}, standard error {error:.3f}, "
            f"lowest {min(ratios):.2f}, highest {max(ratios):.2f}")
