"""Message bytes: the line-end check that intake and delivery make on every message, and
header fields taken out by name."""

import pytest

from mta.wire import crlf_only, take_fields, without_fields


@pytest.mark.parametrize("data", [b"", b"a", b"a\r\nb\r\n", b"\r\n\r\n", b"\r\n.\r\n"])
def test_crlf_pairs_only(data: bytes) -> None:
    assert crlf_only(data)


@pytest.mark.parametrize("data", [b"\n", b"\r", b"a\nb", b"a\rb", b"a\r\nb\n", b"\n\r",
                                  b"a\r\r\nb", b"a\r\n\nb", b"end\r"])
def test_a_bare_cr_or_lf(data: bytes) -> None:
    assert not crlf_only(data)


MESSAGE = (b"Received: from x\r\n\tby y\r\nX-Lane: bulk\r\nFrom: a@shop.test\r\n"
           b"x-lane :  transactional,\r\n\t again\r\nX-Lane-Not: kept\r\nSubject: X-Lane: no\r\n"
           b"\r\nX-Lane: in the body stays\r\n")


def test_fields_are_taken_by_name_in_any_case_with_their_folds() -> None:
    data, values = take_fields(MESSAGE, "X-Lane")
    assert values == [b" bulk", b"  transactional,\r\n\t again"]
    assert data == (b"Received: from x\r\n\tby y\r\nFrom: a@shop.test\r\nX-Lane-Not: kept\r\n"
                    b"Subject: X-Lane: no\r\n\r\nX-Lane: in the body stays\r\n")


def test_several_names_at_once_and_nothing_to_take() -> None:
    data = without_fields(MESSAGE, "x-lane-not", "Subject")
    assert b"X-Lane-Not" not in data and b"Subject" not in data and data.lower().count(b"x-lane") == 3
    assert take_fields(MESSAGE, "X-Other") == (MESSAGE, [])
    assert take_fields(MESSAGE, "Lane")[0] is MESSAGE  # a name inside a name is not it


def test_a_header_only_message_and_one_whose_lines_end_in_lf() -> None:
    assert take_fields(b"From: a\r\nX-Lane: bulk", "X-Lane") == (b"From: a\r\n", [b" bulk"])
    lf = b"From: a\nX-Lane: bulk\n  more\nTo: b\n\nX-Lane: body\n"
    assert take_fields(lf, "X-Lane") == (b"From: a\nTo: b\n\nX-Lane: body\n", [b" bulk\n  more"])
