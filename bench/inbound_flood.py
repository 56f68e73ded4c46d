"""Inbound flood: outsiders stream huge "reports" to the bounce domain; memory must stay flat.

    python -m bench.inbound_flood [--sessions 20] [--mib 20] [--workers 2] [--bound-mib 64]
                                  [--max-report-size BYTES]

Starts `mta serve` (no trusted networks: every client is an outsider; delivery off) and
opens `--sessions` concurrent unauthenticated sessions from 127.0.0.2, each streaming
`--mib` MiB of DATA to the bounce domain as fast as the engine reads it. Each must get
552 5.3.4 (`[bounce] max_report_size`, 1 MiB by default, enforced while the data
streams) and nothing may be spooled. The engine's total RSS (supervisor and workers,
from /proc) is sampled every 20 ms: before, at its peak, and after. The run passes when
the peak grew by less than `--bound-mib` MiB over the baseline; the last line is
`rss_before_mib=... rss_peak_mib=... rss_after_mib=... growth_mib=... bound_mib=... ok=...`.
`--max-report-size 26214400` shows what the limit saves (the data held up to the
message limit instead).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.engine_proc import EngineProcess
from bench.net import free_port
from bench.procstat import descendants

BOUNCE_DOMAIN = "bounces.flood.test"
CLIENT_ADDRESS = "127.0.0.2"  # loopback, and not trusted
CHUNK = (b"r" * 1022 + b"\r\n") * 256  # 256 KiB, sent again and again: the client holds one
MIB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident set size of a process in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssSampler:
    """The engine's total RSS (the supervisor and all its descendants), sampled on a thread
    so that a busy client loop does not delay the samples."""

    def __init__(self, root: int, interval: float = 0.02) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def total(self) -> int:
        return sum(rss(pid) for pid in [self.root, *descendants(self.root)])

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            self._stop.wait(self.interval)


async def expect(reader: asyncio.StreamReader, code: bytes) -> bytes:
    """Read one (possibly multi-line) reply; it must have `code`."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the engine closed the connection")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise RuntimeError(f"expected {code.decode()}, got {line!r}")
            return line.rstrip()


async def flood_one(port: int, size: int, index: int) -> bytes:
    """One outsider's session: a `size`-byte report to the bounce domain; the reply to
    the final dot."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(CLIENT_ADDRESS, 0))
    try:
        await expect(reader, b"220")
        writer.write(b"EHLO flood.test\r\n")
        await expect(reader, b"250")
        writer.write(f"MAIL FROM:<>\r\nRCPT TO:<b+flood{index}@{BOUNCE_DOMAIN}>\r\n"
                     "DATA\r\n".encode())
        for code in (b"250", b"250", b"354"):
            await expect(reader, code)
        writer.write(b"Subject: flood\r\n\r\n")
        for _ in range(size // len(CHUNK)):
            writer.write(CHUNK)
            await writer.drain()
        writer.write(b".\r\n")
        reply = await expect(reader, b"")  # tallied by the caller
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return reply
    finally:
        writer.close()


async def flood(port: int, sessions: int, size: int) -> Counter[bytes]:
    replies = await asyncio.gather(*(flood_one(port, size, i) for i in range(sessions)))
    return Counter(reply[:9] for reply in replies)


def spooled(spool: Path) -> int:
    from mta.queue.spool import Spool

    store = Spool(spool, readonly=True)
    try:
        with store.read() as txn:
            return sum(1 for _ in store.messages(txn))
    finally:
        store.close()


def run(sessions: int, mib: int, workers: int, bound_mib: int, report_size: int | None) -> bool:
    with tempfile.TemporaryDirectory(prefix="mta-flood-") as tmp:
        port = free_port()
        config = {
            "engine": {"workers": workers, "event_log": f"{tmp}/events.jsonl",
                       "audit_log": f"{tmp}/audit.jsonl", "log_level": "warning"},
            "smtp": {"listen": f"127.0.0.1:{port}", "trusted_networks": [],
                     "max_connections_per_ip": max(200, sessions)},
            "spool": {"path": f"{tmp}/spool"},
            "http": {"enabled": False},
            "bounce": {"domain": BOUNCE_DOMAIN,
                       **({"max_report_size": report_size} if report_size else {})},
            "delivery": {"enabled": False},
            "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.5},
        }
        with EngineProcess(Path(tmp), config, workers=workers) as engine:
            assert engine.proc is not None
            time.sleep(1.0)  # every worker up and settled
            sampler = RssSampler(engine.proc.pid)
            before = sampler.total()
            started = time.monotonic()
            with sampler:
                replies = asyncio.run(flood(port, sessions, mib * MIB))
            elapsed = time.monotonic() - started
            time.sleep(1.0)
            after = sampler.total()
            stored = spooled(Path(tmp) / "spool")
    growth = sampler.peak - before
    ok = (growth < bound_mib * MIB and stored == 0
          and replies == Counter({b"552 5.3.4": sessions}))
    streamed = sessions * mib
    print(f"{sessions} sessions x {mib} MiB to {BOUNCE_DOMAIN} from {CLIENT_ADDRESS}: "
          f"{streamed} MiB in {elapsed:.1f} s ({streamed / elapsed:.0f} MiB/s), "
          f"replies {dict((k.decode(), v) for k, v in replies.items())}, spooled {stored}")
    print(f"rss_before_mib={before / MIB:.1f} rss_peak_mib={sampler.peak / MIB:.1f} "
          f"rss_after_mib={after / MIB:.1f} growth_mib={growth / MIB:.1f} "
          f"bound_mib={bound_mib} ok={ok}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--mib", type=int, default=20, help="MiB of DATA per session")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--bound-mib", type=int, default=64,
                        help="largest acceptable growth of the engine's RSS")
    parser.add_argument("--max-report-size", type=int, default=None,
                        help="[bounce] max_report_size of the engine (default: its default)")
    args = parser.parse_args()
    ok = run(args.sessions, args.mib, args.workers, args.bound_mib, args.max_report_size)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
