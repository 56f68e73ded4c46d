"""Regression gate: accuracy of the bounce parser on the shared corpus of real bounces.

The corpus (../shared/corpus/bounces, see its README) holds 218 real bounce,
ARF and auto-reply e-mails with expected results. Scoring follows the README:
kind must equal the expected kind; the recipient counts when it is any of
``recipient``, ``recipients`` or ``recipient_alts``; the status counts when it
equals the expected code, and a null expected status ("none to expect") accepts
any answer. The strict figure (null must be answered with null) is printed too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mta.bounce import parse_bounce

TARGETS = {"kind": 0.99, "recipient": 0.98, "status": 0.99}


def corpus_dir() -> Path:
    beside_repo = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "bounces"
    for candidate in (beside_repo, Path("/work/shared/corpus/bounces")):
        if (candidate / "manifest.jsonl").is_file():
            return candidate
    raise AssertionError(f"bounce corpus not found (looked in {beside_repo} and /work/shared)")


@dataclass
class Scores:
    total: int = 0
    kind: int = 0
    recipient: int = 0
    status: int = 0
    status_strict: int = 0
    reason: int = 0

    def rate(self, name: str) -> float:
        return getattr(self, name) / self.total

    def summary(self) -> str:
        names = ("kind", "recipient", "status", "status_strict", "reason")
        return f"n={self.total} " + " ".join(f"{n}={self.rate(n):.3f}" for n in names)


def score(directory: Path) -> tuple[Scores, list[str]]:
    scores, misses = Scores(), []
    for line in (directory / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        result = parse_bounce((directory / row["path"]).read_bytes())
        expected_rcpts = {
            a.lower() for a in [row["recipient"], *row["recipients"], *row["recipient_alts"]] if a
        }
        ok_kind = result.kind == row["kind"]
        ok_rcpt = (result.recipient or "").lower() in expected_rcpts
        ok_status = row["status"] is None or result.status == row["status"]
        scores.total += 1
        scores.kind += ok_kind
        scores.recipient += ok_rcpt
        scores.status += ok_status
        scores.status_strict += result.status == row["status"]
        scores.reason += result.reason == row["reason"]
        if not (ok_kind and ok_rcpt and ok_status):
            misses.append(
                f"{row['id']}: expected {row['kind']}/{row['reason']}/{row['status']}/"
                f"{row['recipient']} got {result.kind}/{result.reason}/{result.status}/"
                f"{result.recipient}"
            )
    return scores, misses


def test_corpus_accuracy_meets_targets() -> None:
    scores, misses = score(corpus_dir())
    report = scores.summary() + "\n" + "\n".join(misses)
    print("\nbounce corpus:", report)
    for name, target in TARGETS.items():
        assert scores.rate(name) >= target, f"{name} {scores.rate(name):.3f} < {target}: {report}"
