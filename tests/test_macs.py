"""mta.macs: the same digests as the stdlib's one-shot HMAC, for every kind of key."""

from __future__ import annotations

import hmac

from mta.macs import hmac_sha256


def test_keyed_states_give_the_stdlib_digest_for_short_block_and_long_keys() -> None:
    for secret in (b"k", b"s" * 32, b"b" * 64, b"long" * 40):  # > 64 bytes: hashed first
        for message in (b"", b"unsub1\x94\x01", b"x" * 1000):
            assert hmac_sha256(secret, message) == hmac.digest(secret, message, "sha256")
    first = hmac_sha256(b"k", b"one")
    assert hmac_sha256(b"k", b"two") != first and hmac_sha256(b"k", b"one") == first
