"""The egress part of a worker: its startup check and its assembly (called by mta/engine.py)."""

from __future__ import annotations

import socket

from mta.config import Config, StartupError
from mta.context import WorkerContext
from mta.egress.chooser import Egress, SourceRules
from mta.egress.counters import EgressRecorder
from mta.egress.gate import SourceGate
from mta.egress.pools import Sources


def check_sources_bindable(cfg: Config) -> None:
    """Every source address is one of this machine's: else one StartupError line naming
    the source (before any fork)."""
    for source in cfg.egress.sources:
        family = socket.AF_INET6 if ":" in source.address else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.bind((source.address, 0))
        except OSError as exc:
            raise StartupError(f"[egress] source {source.name}: cannot bind address "
                               f"{source.address} ({exc.strerror}): not an address of this "
                               "machine?") from None
        finally:
            probe.close()


def start_egress(ctx: WorkerContext, rules: SourceRules | None, gate: SourceGate
                 ) -> Egress | None:
    """The worker's source chooser and its counters; None without configured sources."""
    cfg = ctx.cfg
    sources = Sources(cfg)
    if not sources:
        return None
    egress = Egress(sources, gate, cfg.egress.down_interval, ctx.emit, rules)
    recorder = EgressRecorder(ctx.spool, frozenset(sources.by_name), ctx.index,
                              ctx.committer.submit, gate.status)
    ctx.listen(recorder.on_event)

    def changed(name: str, up: bool) -> None:
        recorder.source_changed(name, egress.state()[name])

    egress.listeners.append(changed)
    for name in sources.by_name:  # this worker's view, from its start
        recorder.source_changed(name, egress.state()[name])
    recorder.start(ctx.on_close)
    return egress

