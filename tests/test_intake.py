"""SMTP intake into the LMDB spool, against a real `mta serve` on loopback."""

from __future__ import annotations

import asyncio
import json
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tomli_w

from bench.load import Submission, make_body, run_load
from mta.smtp.auth import hash_password
from tests.helpers.engine import RawSmtp, engine_config, spooled_ids, start_engine, wait_until

MSG = b"From: a@shop.test\r\nTo: b@dest.test\r\nSubject: t\r\nX-Campaign-ID: spring\r\n\r\nhello\r\n"


def mta(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True, text=True,
                          check=check, timeout=60)


def test_accept_spool_restart_still_there(tmp_path: Path) -> None:
    engine = start_engine(tmp_path)
    with smtplib.SMTP(engine.host, engine.port) as client:
        client.sendmail("a@shop.test", ["b@dest.test", "c@dest.test", "d@other.test"], MSG)
        client.sendmail("a@shop.test", ["e@dest.test"], MSG)
    engine.stop()
    engine.start()
    try:
        stats = json.loads(mta("queue", "stats", "--json", "--config", str(engine.config_path)).stdout)
        assert stats["total"] == 2
        assert stats["recipients"] == 4
        assert stats["by_domain"]["dest.test"]["queued"] == 2
        listing = json.loads(mta("queue", "list", "--json", "--config",
                                 str(engine.config_path)).stdout)
        assert {m["campaign"] for m in listing} == {"spring"}
        assert {m["account"] for m in listing} == {"default"}
        many = next(m for m in listing if len(m["rcpts"]) == 3)
        shown = json.loads(mta("queue", "show", many["id"], "--json", "--config",
                               str(engine.config_path)).stdout)
        assert sorted(r[0] for job in shown["jobs"] for r in job["rcpts"]) == [
            "b@dest.test", "c@dest.test", "d@other.test"]
        assert len(shown["jobs"]) == 2  # one per destination domain, message stored once
    finally:
        engine.stop()


def test_queue_stats_on_stopped_engine_and_missing_spool(tmp_path: Path) -> None:
    engine = start_engine(tmp_path)
    with smtplib.SMTP(engine.host, engine.port) as client:
        client.sendmail("a@shop.test", ["b@dest.test"], MSG)
    engine.stop()
    out = mta("queue", "stats", "--config", str(engine.config_path)).stdout
    assert "messages: 1" in out
    bad = tmp_path / "other.toml"
    bad.write_text(f'[spool]\npath = "{tmp_path}/nothing-here"\n')
    result = mta("queue", "stats", "--config", str(bad), check=False)
    assert result.returncode == 2 and "no spool" in result.stderr and "Traceback" not in result.stderr


def _submission(i: int) -> Submission:
    rcpt = f"user{i}@d{i % 10}.test"
    return Submission("s@shop.test", [rcpt], make_body(4096, f"m{i}", "s@shop.test", rcpt))


def test_kill9_while_20_clients_stream_keeps_every_accepted_message(tmp_path: Path) -> None:
    engine = start_engine(tmp_path, workers=2)
    accepted: list[str] = []

    def load() -> None:
        result = asyncio.run(run_load(engine.host, engine.port, _submission, 100_000,
                                      sessions=20, duration=3.0,
                                      on_accept=lambda qid, t: accepted.append(qid)))
        assert result.accepted > 0

    thread = threading.Thread(target=load)
    thread.start()
    assert wait_until(lambda: len(accepted) > 300, timeout=20)
    engine.kill9()
    thread.join(30)
    got = set(accepted)
    engine.start()  # the spool opens cleanly after the crash
    try:
        assert got <= spooled_ids(tmp_path / "spool")
        assert len(got) > 300
    finally:
        engine.stop()


def test_tiny_map_refuses_with_452_and_keeps_earlier_mail(tmp_path: Path) -> None:
    engine = start_engine(tmp_path, spool={"map_size": 1024 * 1024, "max_map_use": 0.99})
    stored, refusal = [], None
    body = make_body(20_000, "big", "a@shop.test", "b@dest.test")
    try:
        with smtplib.SMTP(engine.host, engine.port) as client:
            for _ in range(200):
                try:
                    client.sendmail("a@shop.test", ["b@dest.test"], body)
                    stored.append(1)
                except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as exc:
                    refusal = exc
                    break
        assert refusal is not None and stored
        assert refusal.smtp_code == 452 and b"4.3.1" in refusal.smtp_error
    finally:
        engine.stop()
    assert len(spooled_ids(tmp_path / "spool")) == len(stored)


SMUGGLING = {
    "lf.lf": b"\n.\n", "lf.crlf": b"\n.\r\n", "cr.crlf": b"\r.\r\n", "crlf.lf": b"\r\n.\n",
    "lf.cr": b"\n.\r", "cr.lf": b"\r.\n", "cr.cr": b"\r.\r", "crlf.cr": b"\r\n.\r",
    "nul.dot": b"\r\n\0.\r\n", "dot.nul": b"\r\n.\0\r\n",
}


@pytest.fixture(scope="module")
def shared_engine(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("shared")
    accounts = [{"name": "shop", "password_hash": hash_password("s3cret", log_n=10),
                 "sender_domains": ["shop.test"]},
                {"name": "other", "password_hash": hash_password("pw", log_n=10)}]
    engine = start_engine(tmp, smtp={"trusted_networks": ["127.0.0.1/32"],
                                     "max_recipients": 100, "max_message_size": 100_000,
                                     "max_connections_per_ip": 5, "idle_timeout": 3.0},
                          accounts=accounts)
    yield engine, tmp
    engine.stop()


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_variant_is_refused_and_nothing_spooled(shared_engine, name: str) -> None:
    engine, tmp = shared_engine
    before = spooled_ids(tmp / "spool")
    c = RawSmtp(engine.host, engine.port)
    c.greet()
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
    c.send(b"Subject: smuggle\r\n\r\nhello" + SMUGGLING[name]
           + b"MAIL FROM:<evil@shop.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
           + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")
    code, text = c.reply()
    assert code == 550 and "5.5.2" in text
    c.close()
    assert spooled_ids(tmp / "spool") == before


@pytest.mark.parametrize("data", [b"bare\rcr\r\n", b"nul\0byte\r\n", b"bare\nlf\r\n"])
def test_bare_cr_lf_nul_in_data_refused(shared_engine, data: bytes) -> None:
    engine, tmp = shared_engine
    before = spooled_ids(tmp / "spool")
    c = RawSmtp(engine.host, engine.port)
    c.greet()
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
    assert c.cmd(b"Subject: x\r\n\r\n" + data + b".\r\n")[0] == 550
    assert c.cmd("NOOP")[0] == 250  # the session goes on
    c.close()
    assert spooled_ids(tmp / "spool") == before


def test_command_ending_in_bare_lf_is_refused(shared_engine) -> None:
    engine, _ = shared_engine
    c = RawSmtp(engine.host, engine.port)
    c.greet()
    code, text = c.cmd(b"MAIL FROM:<a@shop.test>\n")
    assert code == 521 and "5.5.2" in text
    assert c.closed()


def test_open_relay_refused_from_untrusted_address(shared_engine) -> None:
    engine, tmp = shared_engine
    c = RawSmtp(engine.host, engine.port, source="127.0.0.2")
    c.greet()
    assert c.cmd("MAIL FROM:<a@shop.test>")[0] == 250
    for probe in ["<victim@dest.test>", "<victim%dest.test@[127.0.0.1]>", "<@relay.test:v@dest.test>",
                  '<"v@dest.test"@[127.0.0.1]>', "<dest.test!victim@[127.0.0.1]>"]:
        code, text = c.cmd(f"RCPT TO:{probe}")
        assert code == 550 and "5.7.1" in text, probe
    code, _ = c.cmd("RCPT TO:<v@dest.test@[127.0.0.1]>")
    assert code in (501, 553)
    c.close()


def test_auth_plain_text_refused_from_untrusted_but_works_from_trusted(shared_engine) -> None:
    engine, tmp = shared_engine
    c = RawSmtp(engine.host, engine.port, source="127.0.0.2")
    c.greet()
    code, text = c.cmd("AUTH PLAIN AHNob3AAczNjcmV0")
    assert code == 538 and "5.7.11" in text
    c.close()
    with smtplib.SMTP(engine.host, engine.port) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("shop", "wrong")
    with smtplib.SMTP(engine.host, engine.port) as client:
        client.login("shop", "s3cret")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@other-brand.test", ["b@dest.test"], MSG)
        assert refused.value.smtp_code == 553
        client.sendmail("a@shop.test", ["b@dest.test"], MSG.replace(b"spring", b"authd"))
    out = json.loads(mta("queue", "list", "--json", "--config", str(engine.config_path)).stdout)
    assert any(m["account"] == "shop" and m["campaign"] == "authd" for m in out)


def test_limits_recipients_size_and_connections(shared_engine) -> None:
    engine, _ = shared_engine
    c = RawSmtp(engine.host, engine.port)
    c.greet()
    assert c.cmd("MAIL FROM:<a@shop.test> SIZE=200000")[0] == 552
    assert c.cmd("MAIL FROM:<a@shop.test>")[0] == 250
    codes = [c.cmd(f"RCPT TO:<r{i}@dest.test>")[0] for i in range(101)]
    assert codes[:100] == [250] * 100
    assert codes[100] == 452
    assert c.cmd("DATA")[0] == 354
    code, text = c.cmd(b"Subject: big\r\n\r\n" + b"x" * 200 + (b"y" * 900 + b"\r\n") * 120 + b".\r\n")
    assert code == 552 and "5.3.4" in text
    assert c.cmd("NOOP")[0] == 250
    c.close()
    held = [RawSmtp(engine.host, engine.port) for _ in range(5)]
    for h in held:
        assert h.reply()[0] == 220
    extra = RawSmtp(engine.host, engine.port)
    code, text = extra.reply()
    assert code == 421 and "4.7.0" in text
    for h in held + [extra]:
        h.close()


def test_every_reply_has_an_enhanced_status_code(shared_engine) -> None:
    engine, _ = shared_engine
    c = RawSmtp(engine.host, engine.port)
    assert c.reply()[0] == 220
    code, text = c.cmd("EHLO client.test")
    assert {"PIPELINING", "SIZE 100000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"} <= set(
        text.splitlines())
    for line in ["MAIL FROM:<a@shop.test>", "RCPT TO:<b@dest.test>", "RSET", "NOOP", "BOGUS",
                 "RCPT TO:<x@dest.test>", "MAIL FROM:<bad address>"]:
        code, text = c.cmd(line)
        assert text[:1].isdigit() and text.split(" ")[0].count(".") == 2, (line, text)


def test_two_workers_both_take_connections(tmp_path: Path) -> None:
    engine = start_engine(tmp_path, workers=2)
    try:
        result = asyncio.run(run_load(engine.host, engine.port, _submission, 400, sessions=20,
                                      messages_per_session=5))
        assert result.accepted == 400
        assert len(engine.worker_pids()) == 2
    finally:
        engine.stop()
    workers = {json.loads(line)["worker"] for line in (tmp_path / "events.jsonl").open()
               if '"Reception"' in line}
    assert workers == {0, 1}


@pytest.mark.parametrize("text,named", [
    ('[smtp]\nlisten = "nowhere"\n', "[smtp] listen"),
    ("[smtp]\nmax_recipents = 5\n", "max_recipents"),
    ('[spool]\npath = 5\n', "[spool] path"),
    ("[smtp\n", "not valid TOML"),
    ('[smtp]\ntrusted_networks = ["300.1.1.1/8"]\n', "trusted_networks"),
])
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = mta("serve", "--config", str(path), check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("section", ["smtp", "http"])
def test_a_listen_address_in_use_is_one_clear_line(tmp_path: Path, section: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = engine_config(tmp_path, **{section: {"listen": address}})
        path = tmp_path / "mta.toml"
        path.write_text(tomli_w.dumps(config))
        result = mta("serve", "--config", str(path), check=False)
    assert result.returncode == 1  # not a config error: the address is taken
    assert result.stderr.strip().splitlines() == [
        f"mta: cannot listen on {address} ([{section}] listen): Address already in use"
    ], result.stderr


def test_default_config_loads_and_documents_the_contract_keys() -> None:
    from mta.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "config" / "mta.toml")
    assert cfg.smtp.listen == "127.0.0.1:2525"
    assert cfg.http.listen == "127.0.0.1:8025"
    assert cfg.spool.path == str(root / "var" / "spool")  # relative to the config file
    text = (root / "config" / "mta.toml").read_text()
    for key in ["listen", "trusted_networks", "nameservers", "allow_loopback_mx", "port"]:
        assert f"\n{key} " in text


def test_processing_slower_than_commit_timeout_answers_451(tmp_path: Path) -> None:
    # commit_timeout 0 makes every commit "late": the reply must be 451, never a late 250.
    engine = start_engine(tmp_path, smtp={"commit_timeout": 0.0})
    try:
        with smtplib.SMTP(engine.host, engine.port) as client, pytest.raises(
                smtplib.SMTPDataError) as err:
            client.sendmail("a@shop.test", ["b@dest.test"], MSG)
        assert err.value.smtp_code == 451
    finally:
        engine.stop()
    time.sleep(0.1)
