"""Password checks without sockets: one scrypt for the same password asked at once."""

from __future__ import annotations

import asyncio

import pytest

from mta.smtp.auth import InFlight, PasswordChecker, hash_password


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
