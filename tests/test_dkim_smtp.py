"""Signed mail sent with aiosmtplib to an SMTP sink on 127.0.0.1 verifies as received."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib

from bench.rig.sinks import AsyncioSink
from mta.config import DkimConfig
from mta.dkim import DkimSigner
from tests.helpers.dkim import dkimpy_results, opendkim_results, write_key
from tests.test_dkim_verify import (
    bare_lf_body,
    long_folded_headers,
    multipart_with_attachments,
    raw_8bit_headers,
)

DOTS = (
    b"From: dots@example.com\r\nTo: x@example.org\r\nSubject: dots\r\n\r\n"
    b".leading dot\r\n..two dots\r\n.\r\nnext line is a lone dot above\r\nno final newline"
)


async def send_all(messages: list[bytes]) -> list[bytes]:
    """Each message's bytes as the sink received them (dot-stuffing undone)."""
    sink = await AsyncioSink("127.0.0.1", record=True).start_async()
    try:
        for message in messages:
            await aiosmtplib.send(
                message,
                sender="bounce@example.com",
                recipients=["x@example.org"],
                hostname="127.0.0.1",
                port=sink.port,
                timeout=10,
            )
    finally:
        await sink.stop_async()
    return [m.data for m in sink.received]


def test_signed_messages_verify_after_smtp(tmp_path: Path) -> None:
    keys = [
        write_key(tmp_path, "example.com", "r1", "rsa-sha256"),
        write_key(tmp_path, "example.com", "e1", "ed25519-sha256"),
    ]
    records = [k.record for k in keys]
    expected = {("example.com", "r1"): "pass", ("example.com", "e1"): "pass"}
    signer = DkimSigner.from_config(DkimConfig(keys=[k.config for k in keys]))
    originals = [
        multipart_with_attachments(),
        raw_8bit_headers(),
        long_folded_headers(),
        bare_lf_body(),
        DOTS,
    ]
    signed = [signer.sign(m) for m in originals]

    received = asyncio.run(send_all(signed))

    assert received == signed  # byte for byte: what was signed is what arrived
    for i, message in enumerate(received):
        assert dkimpy_results(message, records) == expected, i
        assert opendkim_results(message, records, tmp_path / f"od{i}") == expected, i
