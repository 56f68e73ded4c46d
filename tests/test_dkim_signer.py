"""DkimSigner behaviour: key choice, rotation, tags, counters, and key-file errors at start."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mta.config import ConfigError, DkimConfig, DkimKeyConfig
from mta.dkim import DkimSigner, TxtRecord, txt_record
from tests.helpers.dkim import (
    cached_private_key,
    dkimpy_results,
    opendkim_results,
    sbin_tool,
    signature_ids,
    without_signatures,
    write_key,
)

MESSAGE = (
    b"From: News <news@Example.COM>\r\n"
    b"To: reader@example.org\r\n"
    b"Subject: Hello\r\n"
    b"List-Unsubscribe: <https://example.com/u/1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Body\r\n"
)
NOW = 1_700_000_000.0

# 512 bits: too short for DKIM (RFC 8301); cryptography will not generate one.
RSA_512_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEAwFjc3UeFBGWsi8ua
4a4jt9bjMBWBYES6iMzJgIGuj7Fu8Yr2ndJGbJ/xWMmoz6gdT7d3CsqK6TNMJq+M
Cc/RIwIDAQABAkBqWbfk8YJup/j7YpxEZBCDuWDsWTerjtTEhtZzI0DtWWw8b7oQ
vJzlwco3AYMUVpAAdqmeyYQwa0jQOcGBeu/BAiEA5ji+00lcjsSTvsHe/xjcBTFv
OB4KGMCD5llavrPoYIkCIQDV4nOkDBjuUjvXwkSnWv/yilrTXC8PRC9f9LTXxMMB
SwIhAM4PbmWpHSpAMsmjt1f2xT/0rkq5QGpFLgnoYnuchdqZAiEAqwzbZsq19YKW
kUqwFRdVseasFHSYviDNsnPFXPni6lkCIAt8o415QgwJn7N1tIrIDQHQUVscGW50
O+uw6XHUT4Da
-----END PRIVATE KEY-----
"""


def tags_of(signed: bytes) -> dict[str, str]:
    """The tags of the first DKIM-Signature field, whitespace removed."""
    field = re.match(rb"DKIM-Signature:(.*?)\r\n(?![ \t])", signed, re.S)
    assert field, signed[:200]
    value = re.sub(rb"\s+", b"", field.group(1)).decode()
    return dict(tag.split("=", 1) for tag in value.strip(";").split(";"))


def test_signs_for_the_from_domain_case_insensitively(tmp_path: Path) -> None:
    key = write_key(tmp_path, "example.com", "s1")
    signer = DkimSigner.from_config(DkimConfig(keys=[key.config]))

    signed = signer.sign(MESSAGE, now=NOW)

    assert signature_ids(signed) == [("example.com", "s1")]
    assert dkimpy_results(signed, [key.record]) == {("example.com", "s1"): "pass"}
    assert (signer.signed, signer.unsigned) == (1, 0)


def test_default_header_list_signs_present_fields_and_oversigns_from(tmp_path: Path) -> None:
    signer = DkimSigner.from_config(DkimConfig(keys=[write_key(tmp_path, "example.com", "s1").config]))

    tags = tags_of(signer.sign(MESSAGE, now=NOW))

    # Bottom-up, as a verifier pairs names with fields; X-Mailer is not in the default list.
    assert tags["h"].split(":") == [
        "list-unsubscribe-post", "list-unsubscribe", "subject", "to", "from", "from",
    ]
    assert (tags["v"], tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "1", "rsa-sha256", "relaxed/relaxed", "example.com", "s1",
    )
    assert tags["t"] == str(int(NOW))
    assert "x" not in tags


def test_configured_headers_replace_the_default_but_keep_from(tmp_path: Path) -> None:
    key = write_key(tmp_path, "example.com", "s1")
    signer = DkimSigner.from_config(DkimConfig(keys=[key.config], headers=["Subject", "X-Mailer"]))

    signed = signer.sign(MESSAGE, now=NOW)

    assert tags_of(signed)["h"].split(":") == ["x-mailer", "subject", "from", "from"]
    assert dkimpy_results(signed, [key.record]) == {("example.com", "s1"): "pass"}


def test_expiration_sets_x_after_t(tmp_path: Path) -> None:
    key = write_key(tmp_path, "example.com", "s1")
    signer = DkimSigner.from_config(DkimConfig(keys=[key.config], expiration=86_400))

    tags = tags_of(signer.sign(MESSAGE, now=NOW))

    assert (int(tags["t"]), int(tags["x"])) == (int(NOW), int(NOW) + 86_400)


def test_rotation_two_selectors_both_verify(tmp_path: Path) -> None:
    old = write_key(tmp_path, "example.com", "2023", n=0)
    new = write_key(tmp_path, "example.com", "2024", n=1)
    signer = DkimSigner.from_config(DkimConfig(keys=[old.config, new.config]))

    signed = signer.sign(MESSAGE)
    expected = {("example.com", "2023"): "pass", ("example.com", "2024"): "pass"}

    assert dkimpy_results(signed, [old.record, new.record]) == expected
    assert opendkim_results(signed, [old.record, new.record], tmp_path / "od") == expected
    # A receiver that only has the new record still passes that signature.
    assert dkimpy_results(signed, [new.record])[("example.com", "2024")] == "pass"
    assert signer.signed == 1


def test_rsa_and_ed25519_side_by_side(tmp_path: Path) -> None:
    rsa_key = write_key(tmp_path, "example.com", "rsa", "rsa-sha256")
    ed_key = write_key(tmp_path, "example.com", "ed", "ed25519-sha256")
    signer = DkimSigner.from_config(DkimConfig(keys=[rsa_key.config, ed_key.config]))

    signed = signer.sign(MESSAGE)
    expected = {("example.com", "rsa"): "pass", ("example.com", "ed"): "pass"}

    assert dkimpy_results(signed, [rsa_key.record, ed_key.record]) == expected
    assert opendkim_results(signed, [rsa_key.record, ed_key.record], tmp_path / "od") == expected
    assert "k=ed25519" in ed_key.record.value


def test_no_key_for_the_domain_leaves_it_unsigned_but_normalized(tmp_path: Path) -> None:
    signer = DkimSigner.from_config(DkimConfig(keys=[write_key(tmp_path, "other.org", "s1").config]))

    out = signer.sign(b"From: a@example.com\nSubject: x\n\nbody")

    assert out == b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    assert (signer.signed, signer.unsigned) == (0, 1)


def test_fallback_domain_signs_when_from_domain_has_no_key(tmp_path: Path) -> None:
    fallback = write_key(tmp_path, "mta.example.net", "fb")
    own = write_key(tmp_path, "example.org", "s1", n=1)
    signer = DkimSigner.from_config(
        DkimConfig(keys=[fallback.config, own.config], fallback_domain="mta.example.net")
    )

    foreign = signer.sign(MESSAGE)
    own_signed = signer.sign(MESSAGE.replace(b"news@Example.COM", b"news@example.org"))

    assert dkimpy_results(foreign, [fallback.record]) == {("mta.example.net", "fb"): "pass"}
    assert signature_ids(own_signed) == [("example.org", "s1")]
    assert (signer.signed, signer.unsigned) == (2, 0)


def test_message_without_from_is_unsigned(tmp_path: Path) -> None:
    signer = DkimSigner.from_config(
        DkimConfig(keys=[write_key(tmp_path, "example.com", "s1").config], fallback_domain="example.com")
    )

    out = signer.sign(b"To: x@example.org\r\n\r\nhi\r\n")

    assert out == b"To: x@example.org\r\n\r\nhi\r\n"
    assert signer.unsigned == 1


def test_idn_from_domain_signs_with_the_a_label(tmp_path: Path) -> None:
    key = write_key(tmp_path, "xn--bcher-kva.example", "s1")
    signer = DkimSigner.from_config(DkimConfig(keys=[key.config]))

    signed = signer.sign("From: Bücher <info@bücher.example>\r\n\r\nx\r\n".encode())

    assert signature_ids(signed) == [("xn--bcher-kva.example", "s1")]
    assert dkimpy_results(signed, [key.record]) == {("xn--bcher-kva.example", "s1"): "pass"}


def test_what_is_returned_is_signatures_plus_the_normalized_message(tmp_path: Path) -> None:
    signer = DkimSigner.from_config(DkimConfig(keys=[write_key(tmp_path, "example.com", "s1").config]))
    raw = b"From: a@example.com\nSubject: bare\rCR\n\nline\r\nline\nend"

    signed = signer.sign(raw)

    assert without_signatures(signed) == (
        b"From: a@example.com\r\nSubject: bare\r\nCR\r\n\r\nline\r\nline\r\nend\r\n"
    )


def test_message_without_body_signs_and_verifies(tmp_path: Path) -> None:
    key = write_key(tmp_path, "example.com", "s1")
    signer = DkimSigner.from_config(DkimConfig(keys=[key.config]))

    signed = signer.sign(b"From: a@example.com\nSubject: headers only")

    assert without_signatures(signed) == b"From: a@example.com\r\nSubject: headers only\r\n"
    assert dkimpy_results(signed, [key.record]) == {("example.com", "s1"): "pass"}


def test_pkcs1_rsa_and_dkimpy_raw_ed25519_key_files_load(tmp_path: Path) -> None:
    rsa_key = cached_private_key("rsa-sha256")
    pkcs1 = tmp_path / "pkcs1.key"
    pkcs1.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    ed_key = cached_private_key("ed25519-sha256")
    assert isinstance(ed_key, ed25519.Ed25519PrivateKey)
    raw = tmp_path / "raw-ed25519.key"
    raw.write_bytes(
        base64.b64encode(
            ed_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
        + b"\n"
    )
    signer = DkimSigner.from_config(
        DkimConfig(
            keys=[
                DkimKeyConfig("example.com", "p1", str(pkcs1), "rsa-sha256"),
                DkimKeyConfig("example.com", "raw", str(raw), "ed25519-sha256"),
            ]
        )
    )
    records = [txt_record(rsa_key, "example.com", "p1"), txt_record(ed_key, "example.com", "raw")]

    results = dkimpy_results(signer.sign(MESSAGE), records)

    assert results == {("example.com", "p1"): "pass", ("example.com", "raw"): "pass"}


def test_opendkim_genkey_keys_work(tmp_path: Path) -> None:
    subprocess.run(
        [sbin_tool("opendkim-genkey"), "-D", str(tmp_path), "-d", "example.com", "-s", "od", "-b", "2048"],
        check=True,
        timeout=60,
    )
    zone = (tmp_path / "od.txt").read_text()
    record = TxtRecord("od._domainkey.example.com", "".join(re.findall(r'"([^"]*)"', zone)))
    signer = DkimSigner.from_config(
        DkimConfig(keys=[DkimKeyConfig("example.com", "od", str(tmp_path / "od.private"))])
    )

    signed = signer.sign(MESSAGE)

    assert dkimpy_results(signed, [record]) == {("example.com", "od"): "pass"}
    assert opendkim_results(signed, [record], tmp_path / "od") == {("example.com", "od"): "pass"}


# --- errors at start -------------------------------------------------------


def config_error(tmp_path: Path, key_file: Path, algorithm: str = "rsa-sha256") -> str:
    cfg = DkimConfig(keys=[DkimKeyConfig("example.com", "s1", str(key_file), algorithm)])
    with pytest.raises(ConfigError) as info:
        DkimSigner.from_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    assert config_error(tmp_path, path) == f"DKIM key file {str(path)!r} not found"


def test_garbage_key_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all!\n-----END PRIVATE KEY-----\n")
    assert config_error(tmp_path, path) == (
        f"DKIM key file {str(path)!r} is not an RSA or Ed25519 private key (PEM expected)"
    )


def test_empty_key_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.key"
    path.write_bytes(b"")
    assert config_error(tmp_path, path) == f"DKIM key file {str(path)!r} is empty"


def test_public_key_instead_of_private(tmp_path: Path) -> None:
    path = tmp_path / "public.pem"
    path.write_bytes(
        cached_private_key("rsa-sha256").public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert "holds a public key, not a private key" in config_error(tmp_path, path)


def test_encrypted_key_file(tmp_path: Path) -> None:
    path = tmp_path / "encrypted.key"
    path.write_bytes(
        cached_private_key("rsa-sha256").private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert "encrypted private key" in config_error(tmp_path, path)


def test_directory_instead_of_key_file(tmp_path: Path) -> None:
    assert config_error(tmp_path, tmp_path) == f"DKIM key file {str(tmp_path)!r} is a directory"


def test_key_of_the_wrong_algorithm(tmp_path: Path) -> None:
    ed_file = write_key(tmp_path, "example.com", "ed", "ed25519-sha256").config.key_file
    rsa_file = write_key(tmp_path, "example.com", "rsa", "rsa-sha256").config.key_file
    assert "holds an Ed25519 key, but algorithm is rsa-sha256" in config_error(tmp_path, Path(ed_file))
    assert "holds an RSA key, but algorithm is ed25519-sha256" in config_error(
        tmp_path, Path(rsa_file), "ed25519-sha256"
    )


def test_rsa_key_shorter_than_1024_bits(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(RSA_512_PEM)
    assert "512-bit RSA key; at least 1024 bits are needed" in config_error(tmp_path, path)


def test_duplicate_selector_and_keyless_fallback_are_refused(tmp_path: Path) -> None:
    key = write_key(tmp_path, "example.com", "s1").config
    with pytest.raises(ConfigError, match="selector 's1' is configured twice"):
        DkimSigner.from_config(DkimConfig(keys=[key, key]))
    with pytest.raises(ConfigError, match="fallback_domain 'other.org' has no"):
        DkimSigner.from_config(DkimConfig(keys=[key], fallback_domain="other.org"))
    bad_selector = DkimKeyConfig("example.com", "s1; x=1", key.key_file)
    with pytest.raises(ConfigError, match="selector 's1; x=1' is not a valid DNS name"):
        DkimSigner.from_config(DkimConfig(keys=[bad_selector]))
    with pytest.raises(ConfigError, match="is not a header field name"):
        DkimSigner.from_config(DkimConfig(keys=[key], headers=["Bad Header:"]))
