"""DKIM signing of outgoing mail (RFC 6376, RFC 8463).

Build one `DkimSigner` at engine start with `DkimSigner.from_config(cfg.dkim)`
(it parses every key file then, so a bad key stops the start with one line),
then call `signer.sign(message_bytes)` just before sending. See `keys` for the
key file format and the DNS record.
"""

from mta.dkim.canon import normalize_line_endings
from mta.dkim.keys import (
    ED25519_SHA256,
    RSA_SHA256,
    KeyFileError,
    TxtRecord,
    generate_private_key,
    load_private_key,
    private_key_pem,
    txt_record,
    write_key_file,
)
from mta.dkim.signer import DEFAULT_HEADERS, DkimSigner, SigningKey

__all__ = [
    "DEFAULT_HEADERS",
    "ED25519_SHA256",
    "RSA_SHA256",
    "DkimSigner",
    "KeyFileError",
    "SigningKey",
    "TxtRecord",
    "generate_private_key",
    "load_private_key",
    "normalize_line_endings",
    "private_key_pem",
    "txt_record",
    "write_key_file",
]
