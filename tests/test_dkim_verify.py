"""Signatures made by DkimSigner verify with dkimpy and with OpenDKIM, for many kinds of mail."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from pathlib import Path

import pytest

from mta.config import DkimConfig
from mta.dkim import DkimSigner, normalize_line_endings
from mta.dkim.canon import ensure_final_crlf
from tests.helpers.dkim import (
    dkimpy_results,
    opendkim_results,
    without_signatures,
    write_key,
)

DOMAIN = "example.com"
BOTH = {(DOMAIN, "r1"), (DOMAIN, "e1")}


def plain_text() -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\n"
        b"To: bob@example.org\r\n"
        b"Subject: Plain text\r\n"
        b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        b"Message-ID: <plain@example.com>\r\n"
        b"\r\n"
        b"Hello Bob,\r\n\r\nJust text.   Spaces  and\ttabs \t\r\n\r\n\r\n"
    )


def multipart_with_attachments() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <news@example.com>"
    msg["To"] = "carol@example.net"
    msg["Subject"] = "Your invoice"
    msg["List-Unsubscribe"] = "<https://example.com/u/123>, <mailto:u-123@example.com>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content("Invoice attached.\n")
    msg.add_alternative("<html><body><p>Invoice <b>attached</b>.</p></body></html>\n", subtype="html")
    msg.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="pdf", filename="invoice.pdf")
    msg.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="items.csv")
    return msg.as_bytes(policy=SMTP)


def utf8_headers_and_body() -> bytes:
    msg = EmailMessage(policy=SMTPUTF8)
    msg["From"] = "Jürgen Müller <jürgen@example.com>"
    msg["To"] = "Zoë <zoe@example.org>"
    msg["Subject"] = "Grüße aus Köln ✓ — 東京"
    msg.set_content("Schöne Grüße,\nnaïve café déjà vu ✓ 東京\n", cte="8bit")
    return msg.as_bytes(policy=SMTPUTF8)


def raw_8bit_headers() -> bytes:
    return (
        "From: \"Ünïcödé Sender\" <sender@example.com>\r\n"
        "To: empfänger@example.org\r\n"
        "Subject: 8-bit bytes in the subject: ÄÖÜ ß €\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Body with 8-bit text: ÅÄÖ åäö € 😀\r\n"
    ).encode()


def long_folded_headers() -> bytes:
    recipients = ",\r\n\t".join(f"user{i} <user{i}@example.org>" for i in range(40))
    subject = " ".join(f"word{i}" for i in range(60))
    references = "\r\n ".join(f"<ref{i}.{'x' * 30}@example.com>" for i in range(20))
    return (
        f"From: Long <long@example.com>\r\n"
        f"To: {recipients}\r\n"
        f"Subject: {subject[:70]}\r\n \t {subject[70:150]}\r\n\t{subject[150:]}\r\n"
        f"References: {references}\r\n"
        f"X-Not-Signed: folded\r\n   continuation   \r\n"
        f"\r\n"
        f"Body.\r\n"
    ).encode()


def bare_lf_body() -> bytes:
    return (
        b"From: lf@example.com\nTo: x@example.org\nSubject: bare LF\n\n"
        b"line one\nline two  \n\nbare CR here\rand CRLF here\r\nlast line without newline"
    )


def odd_whitespace() -> bytes:
    return (
        b"From:lf@example.com\r\n"
        b"Subject:\t  spaces   \t inside  \r\n"
        b"To: a@example.org\r\n"
        b"To: second-to@example.org\r\n"
        b"Cc:\r\n"
        b"\r\n"
    )


MESSAGES = {
    "plain_text": plain_text,
    "multipart_with_attachments": multipart_with_attachments,
    "utf8_headers_and_body": utf8_headers_and_body,
    "raw_8bit_headers": raw_8bit_headers,
    "long_folded_headers": long_folded_headers,
    "bare_lf_body": bare_lf_body,
    "odd_whitespace_empty_body": odd_whitespace,
}


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def rsa_and_ed25519(keydir: Path):
    return [
        write_key(keydir, DOMAIN, "r1", "rsa-sha256"),
        write_key(keydir, DOMAIN, "e1", "ed25519-sha256"),
    ]


@pytest.fixture(scope="module")
def signer(rsa_and_ed25519) -> DkimSigner:
    return DkimSigner.from_config(DkimConfig(keys=[k.config for k in rsa_and_ed25519]))


@pytest.mark.parametrize("make", MESSAGES.values(), ids=MESSAGES.keys())
def test_signatures_verify_with_dkimpy_and_opendkim(make, signer, rsa_and_ed25519, tmp_path):
    original = make()
    signed = signer.sign(original)
    records = [k.record for k in rsa_and_ed25519]

    assert without_signatures(signed) == ensure_final_crlf(normalize_line_endings(original))
    assert dkimpy_results(signed, records) == {ids: "pass" for ids in BOTH}
    assert opendkim_results(signed, records, tmp_path) == {ids: "pass" for ids in BOTH}


@pytest.mark.parametrize("make", [plain_text, multipart_with_attachments, bare_lf_body])
def test_a_changed_body_fails_both_verifiers(make, signer, rsa_and_ed25519, tmp_path):
    signed = signer.sign(make())
    tampered = signed[:-3] + b"X" + signed[-2:]
    records = [k.record for k in rsa_and_ed25519]

    assert dkimpy_results(tampered, records) == {ids: "fail" for ids in BOTH}
    assert opendkim_results(tampered, records, tmp_path) == {ids: "fail" for ids in BOTH}


def test_a_changed_signed_header_fails(signer, rsa_and_ed25519, tmp_path):
    signed = signer.sign(plain_text()).replace(b"Subject: Plain text", b"Subject: Plain texts")
    records = [k.record for k in rsa_and_ed25519]

    assert dkimpy_results(signed, records) == {ids: "fail" for ids in BOTH}
    assert opendkim_results(signed, records, tmp_path) == {ids: "fail" for ids in BOTH}


def test_an_added_from_field_breaks_the_signature(signer, rsa_and_ed25519):
    signed = signer.sign(plain_text())
    forged = signed.replace(b"To: bob", b"From: evil@example.net\r\nTo: bob", 1)

    assert dkimpy_results(signed, [k.record for k in rsa_and_ed25519]) == {i: "pass" for i in BOTH}
    assert dkimpy_results(forged, [k.record for k in rsa_and_ed25519]) == {i: "fail" for i in BOTH}


def test_an_unsigned_header_may_change(signer, rsa_and_ed25519, tmp_path):
    signed = signer.sign(long_folded_headers()).replace(b"X-Not-Signed: folded", b"X-Not-Signed: other")
    records = [k.record for k in rsa_and_ed25519]

    assert dkimpy_results(signed, records) == {ids: "pass" for ids in BOTH}
    assert opendkim_results(signed, records, tmp_path) == {ids: "pass" for ids in BOTH}
