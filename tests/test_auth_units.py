"""Password checks without sockets: one scrypt for the same password asked at once; a
failure is counted before it is announced."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mta.config import Config, EngineConfig, SpoolConfig
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool
from mta.smtp.auth import InFlight, PasswordChecker, hash_password
from mta.smtp.intake import Intake


def test_the_same_password_asked_at_once_is_checked_once_for_all() -> None:
    async def main() -> None:
        in_flight, calls = InFlight(), []
        release = asyncio.Event()

        async def check(answer: bool) -> bool:
            calls.append(answer)
            await release.wait()
            return answer

        same = [asyncio.ensure_future(in_flight.run(b"k1", lambda: check(True)))
                for _ in range(10)]
        other = asyncio.ensure_future(in_flight.run(b"k2", lambda: check(False)))
        leaving = asyncio.ensure_future(in_flight.run(b"k1", lambda: check(True)))
        await asyncio.sleep(0)
        leaving.cancel()  # a client that hangs up does not stop the check for the others
        release.set()
        assert await asyncio.gather(*same) == [True] * 10 and await other is False
        assert calls == [True, False]
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await asyncio.sleep(0)  # the run is over: nothing is kept
        assert await in_flight.run(b"k1", lambda: check(True)) is True and len(calls) == 3

    asyncio.run(main())


def test_attempt_tokens_name_user_password_and_hash() -> None:
    checker = PasswordChecker({"shop": hash_password("pw", log_n=4)})
    token = checker.token("shop", b"pw")
    assert token == checker.token("shop", b"pw")
    assert len({token, checker.token("shop", b"pw2"), checker.token("other", b"pw")}) == 3
    assert not checker.known("shop", b"pw") and checker.check("shop", b"pw")
    assert checker.known("shop", b"pw") and not checker.known("nobody", b"pw")


def test_a_failure_slows_the_next_attempt_before_its_event_is_out(tmp_path: Path) -> None:
    """Whoever sees the Auth event of a failure (an operator, a test, the audit log) may
    count on it: the address's next attempt, on any worker, is already slowed."""
    async def main() -> list[tuple[bool, float | None]]:
        cfg = Config(spool=SpoolConfig(path=str(tmp_path / "spool"), min_free_disk=0),
                     engine=EngineConfig(event_log=str(tmp_path / "events.jsonl")))
        spool = Spool(cfg.spool.path, 1 << 26)
        committer = GroupCommitter(spool)
        committer.start()
        seen: list[tuple[bool, float | None]] = []
        intake: Intake | None = None

        def emit(event: dict[str, Any]) -> None:
            if event["type"] == "Auth" and intake is not None:
                seen.append((event["ok"], intake.auth_delay("192.0.2.7")))

        async def wrong() -> bool:
            return False

        try:
            intake = Intake(cfg, spool, committer, emit=emit)
            assert await intake.check_limited("192.0.2.7", "shop", wrong, "smtp") is False
            return seen
        finally:
            await committer.close()
            spool.close()

    assert asyncio.run(main()) == [(False, 0.25)]  # one failure counted when announced
