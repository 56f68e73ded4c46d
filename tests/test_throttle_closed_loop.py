"""The throttle against a simulated receiver, in simulated time (no sockets, no sleeping).

The receiver allows R messages/s (a token bucket holding one second's worth, the same
class as the loopback test MX) and answers 421 4.7.0 beyond, closing the connection; R
changes from R to R/3 to 2R. The sender always has mail ready, asks the throttle before
each connection and message, and reports each reply 50 ms after sending it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from bench.rig.throttle_mx import TokenBucket
from mta.throttle import Throttle, parse_shaping

R = 100.0
PHASES = [(0.0, R), (60.0, R / 3), (120.0, 2 * R)]
END = 180.0
LATENCY = 0.05
FOLLOW_BOUND = 15.0  # seconds to settle after a change, in both directions


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Run:
    attempts: list[tuple[float, bool]] = field(default_factory=list)  # (time, accepted)

    def window(self, start: float, end: float) -> tuple[float, float]:
        """(accepted per second, share of attempts deferred) in [start, end)."""
        inside = [ok for t, ok in self.attempts if start <= t < end]
        accepted = sum(inside)
        return accepted / (end - start), (len(inside) - accepted) / max(1, len(inside))


def allowed_rate(now: float) -> float:
    return [rate for start, rate in PHASES if start <= now][-1]


def simulate() -> Run:
    clock = Clock()
    throttle = Throttle(parse_shaping({"default": {
        "max_connections": 10, "message_rate": "1000/s", "max_messages_per_connection": 100,
        "connection_rate": "unlimited"}}), clock=clock)
    receiver = TokenBucket(R, clock=clock)
    dest = throttle.destination("receiver.test", ["mx.receiver.test"])
    run, replies = Run(), []  # replies: heap of (due, seq, accepted)
    connected, on_connection = False, 0
    for seq in range(2_000_000):
        if clock.now >= END:
            return run
        while replies and replies[0][0] <= clock.now:
            due, _, ok = heapq.heappop(replies)
            reply = (250, "2.0.0", "Ok") if ok else (421, "4.7.0", "Try again later, rate limited")
            throttle.record(dest, *reply, due)
        if receiver.rate != allowed_rate(clock.now):
            receiver.set_rate(allowed_rate(clock.now))
        wait = throttle.try_send(dest, clock.now) if connected else throttle.try_connect(dest)
        if wait > 0:
            next_reply = replies[0][0] if replies else float("inf")
            clock.now = min(clock.now + wait, next_reply, END)
            continue
        if not connected:
            connected, on_connection = True, 0
            continue
        ok = receiver.take()
        run.attempts.append((clock.now, ok))
        heapq.heappush(replies, (clock.now + LATENCY, seq, ok))
        on_connection += 1
        if not ok or on_connection >= throttle.messages_per_connection(dest):
            throttle.connection_closed(dest, clock.now)  # the receiver closes after a 421
            connected = False
    raise AssertionError("simulation did not reach its end")


def settle_time(run: Run, start: float, end: float, rate: float) -> float:
    """Seconds after `start` until a 5-s window delivers 90-110 % of rate, <= 5 % deferred."""
    t = start + 5.0
    while t <= end:
        goodput, deferred = run.window(t - 5.0, t)
        if 0.9 * rate <= goodput <= 1.1 * rate and deferred <= 0.05:
            return t - start
        t += 0.5
    return float("inf")


def test_closed_loop_converges_and_follows_rate_changes() -> None:
    run = simulate()
    for i, (start, rate) in enumerate(PHASES):
        end = PHASES[i + 1][0] if i + 1 < len(PHASES) else END
        settle = settle_time(run, start, end, rate)
        assert settle <= FOLLOW_BOUND, f"R={rate:.1f}: settled after {settle} s"
        goodput, deferred = run.window(start + FOLLOW_BOUND, end)
        assert goodput >= 0.9 * rate, f"R={rate:.1f}: goodput {goodput:.1f}/s"
        assert deferred <= 0.05, f"R={rate:.1f}: {deferred:.1%} deferred"
    _, deferred_overall = run.window(10.0, END)  # after warm-up, changes included
    assert deferred_overall <= 0.05
