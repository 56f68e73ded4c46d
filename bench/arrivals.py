"""Arrivals at the sinks, matched against the plan by each message's X-Bench-Index header.

smtp-sink's capture files are read as they grow, and each message is dated by the moment
the sink's running counter reached its ordinal; our asyncio sinks record the arrival
time of every message themselves. `ArrivalTracker` gathers both on a thread of its own.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench.rig.assembly import Rig
from bench.rig.sinks import CAPTURE_SEPARATOR, SmtpSink, capture_head
from bench.scenarios import Planned, index_of

COUNTER_POLL = 0.005
INGEST_INTERVAL = 0.2
SEPARATOR = CAPTURE_SEPARATOR.encode()
ROTATE_BYTES = 64 * 2**20  # capture file size at which it is read to the end and removed
ROTATE_SETTLE = 0.2


class CaptureReader:
    """Reads an smtp-sink's capture file as it grows; dates each message by the moment
    the sink's running counter reached its ordinal (polled every few milliseconds)."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink
        self.times: list[float] = []
        self.counts: list[int] = []
        self.offset = 0
        self.pending = b""
        self.taken = 0  # messages read so far

    def poll_counter(self) -> None:
        n = self.sink.messages
        if not self.counts or n > self.counts[-1]:
            self.times.append(time.time())
            self.counts.append(n)

    def arrival(self, ordinal: int) -> float:
        at = bisect_left(self.counts, ordinal)
        return self.times[min(at, len(self.times) - 1)] if self.times else time.time()

    def read(self) -> Iterator[tuple[bytes, int, float]]:
        """(header block, recipients, arrival time) of each message that is complete in
        the file (`capture_head`).

        smtp-sink appends a whole message to the file before it bumps its counter, so
        the first `counted` messages in the file are complete. Past ROTATE_BYTES the
        file is renamed away (smtp-sink opens it by name for every message) and
        finished, so a long run does not fill the disk."""
        counted = self.sink.messages
        path = self.sink.capture_file
        if path is None or not path.exists() or counted <= self.taken:
            return
        chunk = self._read_from(path)
        data, tail = split_partial_separator(self.pending + chunk)
        whole = data.split(SEPARATOR)[1:]  # the file starts with a separator
        ready = min(len(whole), counted - self.taken)
        self.pending = SEPARATOR.join([b"", *whole[ready:]]) + tail
        yield from self._messages(whole[:ready])
        if self.offset >= ROTATE_BYTES:
            yield from self._rotate(path)

    def _read_from(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        return chunk

    def _messages(self, raws: list[bytes]) -> Iterator[tuple[bytes, int, float]]:
        for raw in raws:
            self.taken += 1
            if not raw:
                continue
            head, rcpts = capture_head(raw)
            yield head, rcpts, self.arrival(self.taken)

    def _rotate(self, path: Path) -> Iterator[tuple[bytes, int, float]]:
        done = path.with_name(path.name + ".done")
        os.rename(path, done)
        time.sleep(ROTATE_SETTLE)  # an append under way ends in the renamed file
        self.pending += self._read_from(done)
        done.unlink()
        whole = self.pending.split(SEPARATOR)[1:]
        self.pending, self.offset = b"", 0
        yield from self._messages(whole)


def header(data: bytes, name: bytes) -> str:
    """The first value of a top-level header, unfolded ('' if none)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[: len(name) + 1].lower() == name.lower() + b":":
            return line[len(name) + 1:].strip().decode("utf-8", "replace")
    return ""


def split_partial_separator(data: bytes) -> tuple[bytes, bytes]:
    """(data, the start of a separator being written at its end)."""
    for length in range(len(SEPARATOR) - 1, 0, -1):
        if data.endswith(SEPARATOR[:length]):
            return data[:-length], data[-length:]
    return data, b""


class ArrivalTracker:
    """Matches what the sinks received against the plan: which messages are complete, when."""

    def __init__(self, rig: Rig, plan: dict[int, Planned]) -> None:
        self.rig = rig
        self.plan = plan
        self.readers = [CaptureReader(s) for s in rig.smtp_sinks]
        self.arrived: dict[int, int] = {}  # index -> recipients received so far
        self.delivered_at: dict[int, float] = {}  # index -> when its last recipient arrived
        self.matched = 0  # arrivals of the load's messages
        self.signed = 0  # ... with a DKIM-Signature header
        self.other: Counter[str] = Counter()  # mail that is not the load's, by its Subject
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-arrivals", daemon=True)
        self._lock = threading.Lock()

    @property
    def delivered(self) -> int:
        return len(self.delivered_at)

    def start(self) -> ArrivalTracker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.ingest()

    def _loop(self) -> None:
        next_ingest = time.monotonic() + INGEST_INTERVAL
        while not self._stop.wait(COUNTER_POLL):
            for reader in self.readers:
                reader.poll_counter()
            if time.monotonic() >= next_ingest:
                self.ingest()
                next_ingest = time.monotonic() + INGEST_INTERVAL

    def ingest(self) -> None:
        with self._lock:
            for reader in self.readers:
                reader.poll_counter()
                for data, rcpts, at in reader.read():
                    self._arrived(data, rcpts, at)
            for sink in self.rig.asyncio_sinks:
                while sink.received:
                    message = sink.received.popleft()
                    if message.accepted:
                        self._arrived(message.data, len(message.rcpt_tos), message.received_at)

    def _arrived(self, data: bytes, rcpts: int, at: float) -> None:
        index = index_of(data)
        planned = None if index is None else self.plan.get(index)
        if index is None or planned is None:
            self.other[header(data, b"Subject")[:60] or "(no subject)"] += 1
            return
        self.matched += 1
        self.signed += bool(header(data, b"DKIM-Signature"))
        got = self.arrived[index] = self.arrived.get(index, 0) + rcpts
        if got >= planned.recipients and index not in self.delivered_at:
            self.delivered_at[index] = at

    def __enter__(self) -> ArrivalTracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
