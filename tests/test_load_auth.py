"""The load generator as several authenticated accounts (bench/load.py `Logins`)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.engine_proc import read_events
from bench.load import AuthRefused, Logins, Submission, make_body, run_load, session_streams
from mta.queue.spool import Spool
from mta.smtp.auth import hash_password
from tests.helpers.abuse import self_signed_cert
from tests.helpers.engine import start_engine, wait_until

ACCOUNTS = {"acct0": "pw-zero", "acct1": "pw-one", "acct2": "pw-two"}


def account_of(i: int) -> str:
    return f"acct{i % 3}"


@pytest.mark.parametrize("sessions", [1, 2, 3, 5])
def test_each_message_goes_once_through_a_session_of_its_account(sessions: int) -> None:
    streams = session_streams(30, sessions, Logins(account_of, ACCOUNTS))
    assert len(streams) == sessions
    taken = [next(stream, None) for _ in range(30) for stream in streams]  # in turn
    assert sorted(i for i in taken if i is not None) == list(range(30))


def test_a_session_with_several_accounts_takes_them_in_index_order() -> None:
    [only] = session_streams(9, 1, Logins(account_of, ACCOUNTS))
    assert list(only) == list(range(9))


def test_without_logins_every_session_shares_one_stream() -> None:
    streams = session_streams(4, 3, None)
    assert next(streams[0]) == 0 and next(streams[2]) == 1 and list(streams[1]) == [2, 3]


@pytest.fixture
def engine(tmp_path: Path):
    cert, key = self_signed_cert(tmp_path)
    accounts = [{"name": name, "password_hash": hash_password(pw, log_n=10)}
                for name, pw in ACCOUNTS.items()]
    proc = start_engine(tmp_path, smtp={"tls_cert": str(cert), "tls_key": str(key),
                                        "trusted_networks": []}, accounts=accounts)
    yield proc, tmp_path
    proc.stop()


def submission(i: int) -> Submission:
    rcpt = f"u{i}@dest.test"
    return Submission(f"{account_of(i)}@shop.test", [rcpt],
                      make_body(600, f"m{i}", f"{account_of(i)}@shop.test", rcpt))


def test_each_account_submits_its_own_mail_over_tls(engine) -> None:
    proc, tmp = engine
    result = asyncio.run(run_load(proc.host, proc.port, submission, 30, sessions=4,
                                  logins=Logins(account_of, ACCOUNTS)))
    assert (result.accepted, result.errors) == (30, 0), result.replies
    assert wait_until(lambda: len(read_events(tmp / "events.jsonl", "Reception")) == 30)
    received = read_events(tmp / "events.jsonl", "Reception")
    assert Counter(e["account"] for e in received) == {"acct0": 10, "acct1": 10, "acct2": 10}
    spool = Spool(tmp / "spool", readonly=True)
    try:
        with spool.read() as txn:
            data = [bytes(m["data"]) for m in spool.messages(txn)]
    finally:
        spool.close()
    assert len(data) == 30 and all(b"with ESMTPSA id" in d for d in data)  # TLS, then AUTH


def test_refused_credentials_stop_the_run_at_once(engine) -> None:
    proc, tmp = engine
    wrong = Logins.single("acct0", "not-the-password")
    started = time.monotonic()
    with pytest.raises(AuthRefused, match="AUTH PLAIN as acct0 refused: 535"):
        asyncio.run(run_load(proc.host, proc.port, submission, 1000, sessions=4, logins=wrong))
    assert time.monotonic() - started < 10
    assert not read_events(tmp / "events.jsonl", "Reception")
