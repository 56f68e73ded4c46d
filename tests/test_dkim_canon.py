"""Canonicalization and header selection, as plain functions, checked against dkimpy and RFC 6376."""

from __future__ import annotations

import re

from dkim.canonicalization import Relaxed
from hypothesis import given
from hypothesis import strategies as st

from mta.dkim.canon import (
    normalize_line_endings,
    parse_header_fields,
    relaxed_body,
    relaxed_header,
    split_message,
)
from mta.dkim.signer import fold_b64, fold_list, from_domain, select_headers

# Text built from the pieces that matter to canonicalization.
pieces = st.sampled_from([b"a", b"Z", b"\xc3\xa9", b" ", b"\t", b"  \t ", b"\r\n", b"\r", b"\n", b"."])
raw_bytes = st.lists(pieces, max_size=40).map(b"".join)
crlf_text = raw_bytes.map(normalize_line_endings)


def test_normalize_line_endings_examples() -> None:
    assert normalize_line_endings(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"
    assert normalize_line_endings(b"\r\r\n\n") == b"\r\n\r\n\r\n"
    assert normalize_line_endings(b"\n\r") == b"\r\n\r\n"
    assert normalize_line_endings(b"ok\r\n\r\n") == b"ok\r\n\r\n"
    assert normalize_line_endings(b"\x00\xff") == b"\x00\xff"


@given(raw_bytes)
def test_normalize_leaves_only_crlf_and_keeps_other_bytes(data: bytes) -> None:
    out = normalize_line_endings(data)
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    assert re.sub(rb"[\r\n]", b"", out) == re.sub(rb"[\r\n]", b"", data)
    assert normalize_line_endings(out) == out


@given(crlf_text)
def test_relaxed_body_matches_dkimpy(body: bytes) -> None:
    body = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


def test_relaxed_body_rfc_examples() -> None:
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n") == b""
    assert relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"  # RFC 6376 3.4.6
    assert relaxed_body(b"last line  ") == b"last line\r\n"  # trailing WSP goes, CRLF added


@given(st.sampled_from([b"Subject", b"SUBJECT", b"x-Custom-1"]), crlf_text)
def test_relaxed_header_matches_dkimpy(name: bytes, value: bytes) -> None:
    value = value.replace(b"\r\n", b"\r\n ")  # keep it one folded field
    (expected_name, expected_value), = Relaxed.canonicalize_headers([(name, value + b"\r\n")])
    assert relaxed_header(name, value) == expected_name + b":" + expected_value


def test_relaxed_header_rfc_example() -> None:
    # RFC 6376 3.4.6: "A: X" and "B : Y\t\r\n\tZ  "
    assert relaxed_header(b"A", b" X") == b"a:X\r\n"
    assert relaxed_header(b"B ", b" Y\t\r\n\tZ  ") == b"b:Y Z\r\n"


def test_split_message() -> None:
    assert split_message(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == (b"A: 1\r\nB: 2\r\n", b"body\r\n")
    assert split_message(b"A: 1\r\n") == (b"A: 1\r\n", b"")
    assert split_message(b"\r\nbody only\r\n") == (b"", b"body only\r\n")
    assert split_message(b"A: 1\r\n\r\n") == (b"A: 1\r\n", b"")


def test_parse_header_fields_keeps_folding_and_skips_lines_without_colon() -> None:
    block = b"Subject: one\r\n two\r\n\tthree\r\nnot a field\r\nTo:x@y\r\n"
    assert parse_header_fields(block) == [
        (b"Subject", b" one\r\n two\r\n\tthree"),
        (b"To", b"x@y"),
    ]


def test_select_headers_bottom_up_with_from_oversigned() -> None:
    fields = [(b"From", b" a@x"), (b"To", b" first"), (b"X", b" no"), (b"to", b" second")]

    names, data = select_headers(fields, [b"from", b"to", b"subject"])

    assert names == [b"from", b"from", b"to", b"to"]
    assert data == b"from:a@x\r\nto:second\r\nto:first\r\n"


def test_folding_keeps_lines_short_and_content_intact() -> None:
    names = [b"list-unsubscribe-post"] * 12
    folded = fold_list(b"h=", names, b":")
    assert all(len(line) <= 76 for line in folded.split(b"\r\n\t"))
    assert folded.replace(b"\r\n\t", b"") == b"h=" + b":".join(names)

    b64 = b"A" * 344
    assert fold_b64(b64).replace(b"\r\n\t", b"") == b64
    assert max(len(line) for line in fold_b64(b64).split(b"\r\n\t")) <= 76


def test_from_domain_variants() -> None:
    assert from_domain([(b"From", b' "Doe, John" <John@Sub.Example.COM.>')]) == "sub.example.com"
    assert from_domain([(b"from", b" plain@example.org (comment)")]) == "example.org"
    assert from_domain([(b"From", " Jörg <j@bücher.example>".encode())]) == "xn--bcher-kva.example"
    assert from_domain([(b"From", b" undisclosed")]) == ""
    assert from_domain([(b"To", b" a@example.org")]) == ""
