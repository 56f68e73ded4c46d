"""What `mta egress status`, `/api/v1/egress` and the dashboard panel show.

Per source: its address and EHLO name, its pools, up or down (as the workers saw it last),
per provider the delivered, deferred, bounced and complained counts with their rates, and
the warm-up state the gate reports (mta.egress.gate `status()`). Read from the spool's
LMDB counters (mta.egress.counters), never from the event log.
"""

from __future__ import annotations

from typing import Any

from mta.config import Config
from mta.egress.counters import OUTCOMES, read_counts, read_states
from mta.egress.pools import Sources
from mta.queue.spool import Spool


def rates(counts: dict[str, int]) -> dict[str, float | None]:
    """Percentages: delivery, deferral and bounce of the attempts' recipient results;
    complaints of the deliveries. None when there is nothing to divide by."""
    attempts = counts["delivered"] + counts["deferred"] + counts["bounced"]

    def pct(part: int, whole: int) -> float | None:
        return round(100.0 * part / whole, 2) if whole else None

    return {"delivery_rate": pct(counts["delivered"], attempts),
            "deferral_rate": pct(counts["deferred"], attempts),
            "bounce_rate": pct(counts["bounced"], attempts),
            "complaint_rate": pct(counts["complained"], counts["delivered"])}


def merge_warmup(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' warm-up reports as one (their sources side by side)."""
    merged: dict[str, Any] = {"sources": {}, "transitions": []}
    for status in statuses:
        if not isinstance(status, dict):
            continue
        for key, value in status.items():
            if key == "sources" and isinstance(value, dict):
                merged["sources"].update(value)
            elif key == "transitions" and isinstance(value, list):
                merged["transitions"].extend(value)
            else:
                merged[key] = value
    merged["transitions"] = merged["transitions"][-50:]
    return merged


def egress_report(cfg: Config, spool: Spool) -> dict[str, Any]:
    sources = Sources(cfg)
    counts = read_counts(spool)
    states, warmup_by_worker = read_states(spool)
    warmup = merge_warmup(list(warmup_by_worker.values()))
    rows = []
    for source in cfg.egress.sources:
        providers = {}
        totals = dict.fromkeys(OUTCOMES, 0)
        for provider, row in sorted(counts.get(source.name, {}).items()):
            providers[provider] = {**row, **rates(row)}
            for outcome in OUTCOMES:
                totals[outcome] += row[outcome]
        state = states.get(source.name, {})
        rows.append({
            "name": source.name, "address": source.address, "ehlo_name": source.ehlo_name,
            "pools": sources.pools_of(source.name), "up": bool(state.get("up", True)),
            "down_until": state.get("down_until"), "reason": state.get("reason", ""),
            "providers": providers, "totals": {**totals, **rates(totals)},
            "warmup": warmup["sources"].get(source.name),
        })
    return {
        "sources": rows,
        "pools": [{"name": p.name, "sources": [{"source": m.source, "weight": m.weight}
                                               for m in p.sources]} for p in cfg.egress.pools],
        "default_pool": cfg.egress.default_pool, "trial_pool": cfg.egress.trial_pool,
        "warmup": {k: v for k, v in warmup.items() if k != "sources"},
    }
