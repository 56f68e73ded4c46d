"""crlf_only: the line-end check that intake and delivery make on every message."""

import pytest

from mta.wire import crlf_only


@pytest.mark.parametrize("data", [b"", b"a", b"a\r\nb\r\n", b"\r\n\r\n", b"\r\n.\r\n"])
def test_crlf_pairs_only(data: bytes) -> None:
    assert crlf_only(data)


@pytest.mark.parametrize("data", [b"\n", b"\r", b"a\nb", b"a\rb", b"a\r\nb\n", b"\n\r",
                                  b"a\r\r\nb", b"a\r\n\nb", b"end\r"])
def test_a_bare_cr_or_lf(data: bytes) -> None:
    assert not crlf_only(data)
