"""Why a bounce was classified the way it was: ``python -m mta.bounce --explain FILE``.

For each failed recipient: the part of the report that was read (the recipient's
diagnostic), the rule that chose the reason, the phrase or code that rule rested on and
who writes that phrase, then the kind and where the status code came from.
"""

from __future__ import annotations

from mta.bounce.model import BounceResult, Delivery
from mta.bounce.parser import analyse
from mta.bounce.phrases import normalize

_QUOTE_CHARS = 600


def explain(data: bytes) -> str:
    """A readable account of how ``data`` (a whole e-mail) was classified."""
    result, deliveries = analyse(data)
    lines = [
        f"kind: {result.kind}",
        f"reason: {result.reason}",
        f"status: {result.status or '-'}",
        f"recipient: {result.recipient or '-'}",
    ]
    if not deliveries:
        lines.append("no failed delivery was found: not a bounce, complaint or auto-reply")
    for index, d in enumerate(deliveries, 1):
        lines.extend(_delivery(index, d, result))
    return "\n".join(lines) + "\n"


def _delivery(index: int, d: Delivery, result: BounceResult) -> list[str]:
    lines = [
        "",
        f"[{index}] {d.recipient or '(no address)'}",
        f"  read:     {_quote(_read_part(d))}",
        f"  rule:     {d.rule or '-'}",
        f"  decided:  {_evidence(d)}",
        f"  reason:   {d.reason}",
        f"  command:  {d.command or '(not named)'}",
        f"  status:   {_status(d)}",
    ]
    if index == 1:
        lines.append(f"  kind:     {result.kind}")
    return lines


def _read_part(d: Delivery) -> str:
    """The line of the diagnostic that holds the deciding words, or the whole diagnostic."""
    text = d.diagnosis or ""
    # evidence is "phrase", "code", "code, phrase" or "fragment … fragment": words first
    pieces = [normalize(p) for p in reversed(d.evidence.replace(" … ", ", ").split(", "))]
    for wanted in filter(None, pieces):
        for line in text.splitlines():
            if wanted in normalize(line):
                return line.strip()
    return " ".join(text.split())


def _evidence(d: Delivery) -> str:
    if not d.evidence:
        return "-"
    writer = f" (written by {d.writer})" if d.writer and d.writer != "several" else ""
    return f'"{d.evidence}"{writer}'


def _status(d: Delivery) -> str:
    if not d.status:
        return "-"
    if d.status_inferred:
        return f"{d.status} (the report states none: the code {d.reason} stands for)"
    return f"{d.status} (stated by the report)"


def _quote(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _QUOTE_CHARS:
        text = text[:_QUOTE_CHARS] + " …"
    return text or "(empty)"
