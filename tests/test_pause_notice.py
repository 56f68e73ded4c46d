"""The pause notice says what bounced: the most frequent replies, counts, a few addresses."""

from __future__ import annotations

import email
from email.policy import default
from pathlib import Path

import pytest

from tests.test_policy_guard import guard_env

WIDTH = 72


@pytest.mark.asyncio
async def test_the_notice_lists_the_most_frequent_replies_in_short_lines(tmp_path: Path) -> None:
    async with guard_env(tmp_path, min_volume=10) as env:
        for i in range(7):
            rcpt = f"gone{i}@dest.test"
            env.outcome("Bounce", rcpt, code=550, status="5.1.1",
                        reply=f"5.1.1 <{rcpt}>: Recipient address rejected: User unknown in "
                              f"virtual mailbox table of the receiving system")
        for rcpt in ("x@nowhere.test", "evil\x1b[2J@nowhere.test", "y@nowhere.test"):
            env.outcome("Bounce", rcpt, code=550, status="5.1.2", reply="5.1.2 Domain not found")
        await env.guard.flush()
        [paused] = env.of_type("CampaignPaused")
        with env.spool.read() as txn:
            notice = env.spool.get_message(txn, paused["notice"])
    assert notice is not None and b"\x1b" not in notice["data"]
    body = email.message_from_bytes(notice["data"], policy=default).get_content()
    lines = body.splitlines()
    assert all(len(line) <= WIDTH for line in lines), [ln for ln in lines if len(ln) > WIDTH]
    text = " ".join(body.split())
    assert ("7 x 5.1.1 <...>: Recipient address rejected: User unknown in virtual mailbox "
            "table of the receiving system") in text
    assert "e.g. gone0@dest.test, gone1@dest.test, gone2@dest.test" in text
    assert "gone3@dest.test" not in text  # a few examples, not the whole list
    assert "3 x 5.1.2 Domain not found" in text
    assert "evil\\x1b[2j@nowhere.test" in text  # escaped, never acting on a terminal
    assert text.index("7 x") < text.index("3 x")  # the most frequent first
