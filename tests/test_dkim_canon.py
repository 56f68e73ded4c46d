"""Canonicalization and header selection, as plain functions, checked against dkimpy and RFC 6376."""

from __future__ import annotations

import re

from dkim import rfc822_parse
from dkim.canonicalization import Relaxed
from hypothesis import given
from hypothesis import strategies as st

from mta.dkim.canon import (
    normalize_line_endings,
    normalize_message,
    relaxed_body,
    relaxed_fields,
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
    assert normalize_line_endings(b"") == b""
    assert normalize_message(b"a\nb") == b"a\r\nb\r\n"
    assert normalize_message(b"a\r\n\r\n") == b"a\r\n\r\n"
    assert normalize_message(b"") == b""


@given(raw_bytes)
def test_normalize_leaves_only_crlf_and_keeps_other_bytes(data: bytes) -> None:
    out = normalize_line_endings(data)
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    assert re.sub(rb"[\r\n]", b"", out) == re.sub(rb"[\r\n]", b"", data)
    assert normalize_line_endings(out) == out
    assert normalize_message(data) == (out + b"\r\n" if data and not out.endswith(b"\r\n") else out)


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


field_values = st.lists(
    st.sampled_from([b"a", b"B", b" ", b"\t", b"  \t", b"\r\n ", b"\r\n\t", b"\xc3\xa9", b":", b";"]),
    max_size=12,
).map(b"".join)
header_blocks = st.lists(
    st.tuples(st.sampled_from([b"Subject", b"TO", b"x-Long-Name", b"From"]), field_values),
    max_size=6,
).map(lambda fields: b"".join(name + b":" + value + b"\r\n" for name, value in fields))


@given(header_blocks)
def test_relaxed_fields_match_dkimpy(block: bytes) -> None:
    parsed, _ = rfc822_parse(block + b"\r\n")
    expected = [(name, value) for name, value in Relaxed.canonicalize_headers(parsed)]
    assert [(key, value + b"\r\n") for key, value in relaxed_fields(block)] == expected


def test_relaxed_fields_unfold_and_skip_lines_without_colon() -> None:
    block = b"Subject : one\r\n two\r\n\tthree  \r\nnot a field\r\nTo:x@y\r\n"
    assert relaxed_fields(block) == [(b"subject", b"one two three"), (b"to", b"x@y")]


def test_select_headers_bottom_up_with_from_oversigned() -> None:
    fields = [(b"from", b"a@x"), (b"to", b"first"), (b"x", b"no"), (b"to", b"second")]

    names, data = select_headers(fields, {b"from", b"to", b"subject"})

    assert names == [b"to", b"to", b"from", b"from"]
    assert data == b"to:second\r\nto:first\r\nfrom:a@x\r\n"


def test_folding_keeps_lines_short_and_content_intact() -> None:
    names = [b"list-unsubscribe-post"] * 12
    folded = fold_list(b"h=", names, b":")
    assert all(len(line) <= 76 for line in folded.split(b"\r\n\t"))
    assert folded.replace(b"\r\n\t", b"") == b"h=" + b":".join(names)

    b64 = b"A" * 344
    assert fold_b64(b64).replace(b"\r\n\t", b"") == b64
    assert max(len(line) for line in fold_b64(b64).split(b"\r\n\t")) <= 76


def test_from_domain_variants() -> None:
    assert from_domain([(b"from", b'"Doe, John" <John@Sub.Example.COM.>')]) == "sub.example.com"
    assert from_domain([(b"from", b"plain@example.org (comment)")]) == "example.org"
    assert from_domain([(b"from", b"plain@example.org")]) == "example.org"
    assert from_domain([(b"from", b'"a@b" <real@example.net>')]) == "example.net"
    assert from_domain([(b"from", "Jörg <j@bücher.example>".encode())]) == "xn--bcher-kva.example"
    assert from_domain([(b"from", b"undisclosed")]) == ""
    assert from_domain([(b"to", b"a@example.org")]) == ""
