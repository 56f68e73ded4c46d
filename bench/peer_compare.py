"""`--compare`: which targets run in which order, and the table of medians and ratios.

Rounds are interleaved (engine, postfix, exim, haraka, engine, postfix, ...), so a
slow spell of the machine falls on every target alike rather than on one; the table
shows each target's median over its rounds, and the engine's ratio to each peer:

    target    rounds  e2e msg/s  accept msg/s  accept p99 ms  CPU ms/msg
    engine         3     1386.0        1396.0           12.0        1.87
    postfix        3      573.0         818.0           40.0        2.24
    ...
    engine / postfix: e2e 2.42 x, accept 1.71 x, accept p99 0.30 x, CPU/msg 0.83 x
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

from bench.report import RunResult, percentiles

ALL_PEERS = ("postfix", "exim", "haraka")  # --compare all, after the engine


def compare_kinds(target: str, compare: str | None) -> list[str]:
    """The targets of one round: --target, then what --compare names."""
    if compare is None:
        return [target]
    if compare == "all":
        if target != "engine":
            raise SystemExit("--compare all compares the engine with every peer: no --target")
        return [target, *ALL_PEERS]
    return [target] if compare == target else [target, compare]


def interleaved(kinds: Sequence[str], rounds: int) -> list[str]:
    """Every target once per round, in the same order each round."""
    return [kind for _ in range(max(1, rounds)) for kind in kinds]


# ext4 without a journal (this machine's root file system; fs/ext4/ialloc.c
# recently_deleted) skips inodes freed within the last 60 s when it allocates one, reading
# each one's inode table block first. A peer that keeps a file per queued message (Postfix,
# Exim, Haraka) and starts a round within a minute of its last one pays that search for
# every message: measured here, tuned Postfix at 3.4-3.6 ms of CPU a message right after
# its own round against 2.6-2.7 after a pause, and 2.6 all through one 30,000-message round
# (under steady load the freed inodes stay behind the allocator). The slow figure belongs
# to the rig's back-to-back rounds, not to the MTA: each target's round waits until its
# last one ended this long ago.
SETTLE = 65.0


class Settle:
    """When each target's next round may start: `seconds` after its previous one ended."""

    def __init__(self, seconds: float = SETTLE, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.seconds = seconds
        self.clock = clock
        self._ended: dict[str, float] = {}

    def due_in(self, kind: str) -> float:
        """Seconds until a round of `kind` may start (0: now)."""
        ended = self._ended.get(kind)
        return 0.0 if ended is None else max(0.0, ended + self.seconds - self.clock())

    def ended(self, kind: str) -> None:
        """A round of `kind` ended now."""
        self._ended[kind] = self.clock()


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(results: Sequence[RunResult]) -> dict[str, dict[str, float | None]]:
    """Per target (in order of first appearance): its median e2e and accept rates,
    accept p99 (ms), CPU ms per message, and the number of rounds."""
    by_target: dict[str, list[RunResult]] = {}
    for result in results:
        by_target.setdefault(result.target, []).append(result)
    return {target: {
        "rounds": float(len(runs)),
        "e2e_rate": _median([r.e2e_rate for r in runs]),
        "accepted_rate": _median([r.accepted_rate for r in runs]),
        "accept_p99_ms": _median([percentiles(r.accept_latencies)["p99"] for r in runs]),
        "cpu_ms_per_msg": _median([r.cpu_per_message_ms() for r in runs]),
        "drained": float(all(r.drained for r in runs)),
    } for target, runs in by_target.items()}


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def format_medians(results: Sequence[RunResult]) -> str:
    """The table of medians, then the first target's ratio to each of the others."""
    table = medians(results)
    if not table:
        return ""
    scenario = results[0].scenario
    lines = [f"== medians per target (scenario {scenario}, rounds interleaved)",
             f"{'target':16} {'rounds':>6} {'e2e msg/s':>10} {'accept msg/s':>13} "
             f"{'accept p99 ms':>14} {'CPU ms/msg':>11}"]
    for target, m in table.items():
        lines.append(f"{target:16} {int(m['rounds'] or 0):>6} {_cell(m['e2e_rate']):>10} "
                     f"{_cell(m['accepted_rate']):>13} {_cell(m['accept_p99_ms']):>14} "
                     f"{_cell(m['cpu_ms_per_msg'], 2):>11}"
                     + ("" if m["drained"] else "  NOT DRAINED"))
    first, *others = table
    ours = table[first]
    for other in others:
        theirs = table[other]
        lines.append(
            f"{first} / {other}: e2e {_ratio(ours['e2e_rate'], theirs['e2e_rate'])} x, "
            f"accept {_ratio(ours['accepted_rate'], theirs['accepted_rate'])} x, "
            f"accept p99 {_ratio(ours['accept_p99_ms'], theirs['accept_p99_ms'])} x, "
            f"CPU/msg {_ratio(ours['cpu_ms_per_msg'], theirs['cpu_ms_per_msg'])} x")
    lines.append("(rates: above 1 is faster; p99 and CPU/msg: below 1 is less)")
    return "\n".join(lines)
