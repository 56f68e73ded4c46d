"""Lines over 998 octets are broken before sending and signing (mta/delivery/lines.py)."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.delivery.lines import wrap_long_lines
from tests.helpers.dkim import dkimpy_results, write_key
from tests.helpers.engine import start_engine, wait_until


def longest(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))


def unfolded(data: bytes) -> bytes:
    return data.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t")


def test_a_message_that_fits_is_returned_as_it_is() -> None:
    data = b"Subject: x\r\n\r\n" + b"a" * 998 + b"\r\n"
    assert wrap_long_lines(data) is data


def test_a_long_header_is_folded_at_its_blanks_and_keeps_its_value() -> None:
    words = " ".join(f"word{i}" for i in range(400)).encode()
    data = b"Subject: " + words + b"\r\nTo: a@b.test\r\n\r\nbody\r\n"
    out = wrap_long_lines(data)
    assert longest(out) <= 998 and out.count(b"\r\n") > data.count(b"\r\n")
    assert unfolded(out) == data  # folding only: the field's value is unchanged


def test_a_line_without_blanks_is_cut_on_character_boundaries() -> None:
    body = ("é" * 1500).encode()  # 3000 octets, two per character
    out = wrap_long_lines(b"Subject: x\r\n\r\n" + body + b"\r\n")
    assert longest(out) <= 998
    pieces = out.split(b"\r\n\r\n", 1)[1].split(b"\r\n")
    for piece in pieces:
        piece.decode("utf-8")  # no character split in two
    assert b"".join(p.removeprefix(b" ") for p in pieces) == body


def test_off_when_the_limit_is_zero() -> None:
    data = b"x" * 5000
    assert wrap_long_lines(data, 0) is data


@given(st.lists(st.binary(max_size=3000).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                max_size=5))
def test_every_line_fits_and_no_octet_is_lost(lines: list[bytes]) -> None:
    data = b"\r\n".join(lines)
    out = wrap_long_lines(data, 100)
    assert longest(out) <= 100
    def squeezed(b: bytes) -> bytes:
        return b.replace(b"\r\n", b"").replace(b" ", b"")

    assert squeezed(out) == squeezed(data)


@pytest.mark.parametrize("limit", [998, 0])
def test_sent_lines_fit_and_the_signature_verifies(tmp_path: Path, dns_server,
                                                   asyncio_sink_factory, limit: int) -> None:
    key = write_key(tmp_path, "shop.test", "s1")
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    dns_server.add_mx("dest.test", [(10, "mx.dest.test")])
    dns_server.add_a("mx.dest.test", "127.0.0.2")
    engine = start_engine(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True,
                  "line_length_limit": limit},
        dkim={"keys": [{"domain": "shop.test", "selector": "s1",
                        "key_file": key.config.key_file}]})
    body = b"long " + b"x" * 2500 + b"\r\n" + ("ü" * 700).encode() + b"\r\nend\r\n"
    try:
        with smtplib.SMTP(engine.host, engine.port) as client:
            client.sendmail("news@shop.test", ["u@dest.test"],
                            b"From: news@shop.test\r\nTo: u@dest.test\r\nSubject: long\r\n\r\n"
                            + body)
        assert wait_until(lambda: sink.accepted == 1, timeout=15)
    finally:
        engine.stop()
    received = sink.received[0].data
    assert dkimpy_results(received, [key.record]) == {("shop.test", "s1"): "pass"}
    if limit:
        assert longest(received) <= 998
        assert b"\r\nend\r\n" in received and ("ü" * 100).encode() in received
    else:
        assert b"x" * 2500 in received  # off: sent byte for byte
