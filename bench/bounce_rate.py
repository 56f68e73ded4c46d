"""Bounce parse rate on the shared corpus: messages per second on one core.

    python -m bench.bounce_rate [--rounds 10] [--corpus DIR]

Reads every .eml of the corpus into memory once, then parses them all
``rounds`` times in this single process and prints messages/s and the mean
time per message (plus the slowest single message).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mta.bounce import parse_bounce

DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "bounces"


def corpus_messages(directory: Path) -> list[bytes]:
    if not directory.is_dir():
        directory = Path("/work/shared/corpus/bounces")
    return [path.read_bytes() for path in sorted(directory.glob("*.eml"))]


def measure(messages: list[bytes], rounds: int) -> tuple[float, float]:
    """(messages per second, slowest single parse in seconds)."""
    slowest = 0.0
    started = time.perf_counter()
    for _ in range(rounds):
        for data in messages:
            begin = time.perf_counter()
            parse_bounce(data)
            slowest = max(slowest, time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    return len(messages) * rounds / elapsed, slowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args()
    messages = corpus_messages(args.corpus)
    if not messages:
        raise SystemExit(f"no .eml files in {args.corpus}")
    measure(messages, 1)  # warm up (regex compilation, imports)
    rate, slowest = measure(messages, max(1, args.rounds))
    size = sum(len(m) for m in messages) / len(messages)
    print(
        f"bounce parse rate: {rate:.0f} messages/s on one core "
        f"({1000 / rate:.2f} ms/message, {len(messages)} messages of {size / 1024:.1f} KB mean, "
        f"{args.rounds} rounds, slowest {slowest * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()
