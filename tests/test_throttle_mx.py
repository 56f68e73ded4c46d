"""The throttling test MX over real loopback sockets, driven by aiosmtplib."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiosmtplib
import pytest

from bench.rig.throttle_mx import BackgroundThrottleMx, ThrottleMx, TokenBucket, parse_schedule

MESSAGE = b"From: a@sender.test\r\nTo: b@receiver.test\r\nSubject: t\r\n\r\nhello\r\n"


async def connect(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5, start_tls=False)
    await client.connect()
    await client.ehlo()
    return client


async def send(client: aiosmtplib.SMTP) -> int:
    """Send one message; the reply code (421 when deferred)."""
    try:
        await client.sendmail("a@sender.test", ["b@receiver.test"], MESSAGE)
        return 250
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    except aiosmtplib.SMTPRecipientsRefused as exc:  # pragma: no cover - depends on stage
        return exc.recipients[0].code


def test_token_bucket_with_fake_clock() -> None:
    now = [0.0]
    bucket = TokenBucket(10.0, capacity=2.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] = 0.1
    assert bucket.take() and not bucket.take()
    bucket.set_rate(1.0)
    now[0] = 1.15  # 1.05 s at 1/s since the change
    assert bucket.take() and not bucket.take()


def test_connections_over_k_get_421_at_the_greeting() -> None:
    async def scenario() -> None:
        async with ThrottleMx(max_connections=2, rate=100) as mx:
            clients = [await connect(mx.port) for _ in range(2)]
            with pytest.raises(aiosmtplib.SMTPConnectResponseError) as err:
                await connect(mx.port)
            assert err.value.code == 421 and "4.7.0" in err.value.message
            assert await send(clients[0]) == 250
            for c in clients:
                await c.quit()
            await asyncio.sleep(0.05)
            late = await connect(mx.port)  # a slot is free again
            assert await send(late) == 250
            await late.quit()
            assert (mx.stats.refused, mx.stats.max_concurrent, mx.stats.accepted) == (1, 2, 2)

    asyncio.run(scenario())


def test_messages_over_r_get_421_and_rate_changes() -> None:
    async def scenario() -> None:
        async with ThrottleMx(max_connections=4, rate=20, burst=5) as mx:
            started = time.monotonic()
            codes = []
            client = await connect(mx.port)
            for _ in range(40):
                code = await send(client)
                codes.append(code)
                if code == 421:  # the MX closes after a 421
                    client.close()
                    client = await connect(mx.port)
            elapsed = time.monotonic() - started
            assert codes.count(421) == mx.stats.deferred > 0
            assert codes.count(250) == mx.stats.accepted
            assert mx.stats.accepted <= 5 + 20 * elapsed + 1  # burst + rate x time
            mx.set_rate(0.01)
            await asyncio.sleep(0.3)
            mx.bucket.tokens = 0.0
            assert await send(client) == 421
            mx.schedule([(0.0, 1000.0)])
            await asyncio.sleep(0.05)
            client = await connect(mx.port)
            assert await send(client) == 250
            await client.quit()
            assert [r for _, r in mx.rate_changes] == [20, 0.01, 1000.0]
            history = mx.history()
            assert sum(h["accepted"] for h in history) == mx.stats.accepted
            assert sum(h["deferred"] for h in history) == mx.stats.deferred

    asyncio.run(scenario())


def test_reject_after_data_and_xstats() -> None:
    async def scenario() -> None:
        async with ThrottleMx(max_connections=2, rate=1, burst=1, reject_at="data") as mx:
            client = await connect(mx.port)
            assert await send(client) == 250
            assert await send(client) == 421
            client = await connect(mx.port)
            code, text = await client.execute_command(b"XSTATS")
            assert code == 250 and json.loads(text)["deferred"] == 1
            await client.quit()

    asyncio.run(scenario())


def test_background_thread_for_sync_callers() -> None:
    with BackgroundThrottleMx(max_connections=1, rate=50) as mx:
        async def one() -> int:
            client = await connect(mx.port)
            code = await send(client)
            await client.quit()
            return code

        assert asyncio.run(one()) == 250
        mx.set_rate(5)
        time.sleep(0.05)
        assert mx.stats.rate == 5 and mx.stats.accepted == 1
        assert mx.history()[0]["accepted"] == 1


def test_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        ThrottleMx(host="10.0.0.1")


def test_command_line_process() -> None:
    assert parse_schedule("60:33,120:200") == [(60.0, 33.0), (120.0, 200.0)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.rig.throttle_mx", "--max-conn", "1", "--rate", "5",
         "--schedule", "0.2:7"], stdout=subprocess.PIPE, text=True)
    try:
        listening = json.loads(proc.stdout.readline())
        assert listening["event"] == "listening"

        async def one() -> int:
            client = await connect(listening["port"])
            code = await send(client)
            await client.quit()
            return code

        assert asyncio.run(one()) == 250
        time.sleep(0.3)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    final = json.loads(out.strip().splitlines()[-1])
    assert final["event"] == "stopped" and final["accepted"] == 1 and final["rate"] == 7
