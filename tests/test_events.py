"""The event log file: JSON lines, reopened after logrotate moves it away."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mta import events as events_module
from mta.events import EventLog


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_are_json_with_a_time(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "logs" / "events.jsonl")
    seen: list[dict] = []
    log.listeners.append(seen.append)
    log.emit({"type": "Reception", "id": "a"})
    log.close()
    [event] = lines(tmp_path / "logs" / "events.jsonl")
    assert event["type"] == "Reception" and event["time"] > 0 and seen == [event]


def test_lines_stay_ascii_whatever_a_value_holds(tmp_path: Path) -> None:
    """A header's bidi override or C1 control is escaped in the file, never written raw
    for a terminal to act on; a lone surrogate (a header decoded with surrogateescape) and
    an integer past 64 bits are logged too."""
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    hostile = "Pay\u202eevil\x9b[31m caf\u00e9"
    log.emit({"type": "Bounce", "text": hostile, "id": "a"})
    log.emit({"type": "Bounce", "text": "x\udcff", "big": 2**70, "id": "b"})
    log.emit({"type": "Delivery", "id": "c", 7: "key"})
    log.close()
    raw = path.read_bytes()
    assert raw.isascii() and b"\\u202e" in raw and b"\\u009b" in raw
    first, second, third = lines(path)
    assert first["text"] == hostile
    assert second["text"] == "x\udcff" and second["big"] == 2**70
    assert third["7"] == "key"


@pytest.mark.parametrize("move", ["rename", "unlink"])
def test_reopens_a_file_moved_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   move: str) -> None:
    monkeypatch.setattr(events_module, "REOPEN_CHECK", 0.0)
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.emit({"type": "Delivery", "n": 1})
    if move == "rename":
        path.rename(tmp_path / "events.jsonl.1")
    else:
        path.unlink()
    log.emit({"type": "Delivery", "n": 2})
    log.close()
    assert [e["n"] for e in lines(path)] == [2]
    if move == "rename":
        assert [e["n"] for e in lines(tmp_path / "events.jsonl.1")] == [1]
