"""`mta dkim genkey|records`: make DKIM keys and show the DNS records to publish.

Key files are unencrypted PEM PKCS#8 (``-----BEGIN PRIVATE KEY-----``) for both
rsa-sha256 and ed25519-sha256 (RFC 8410 for Ed25519), written with mode 0600.
The TXT record is ``<selector>._domainkey.<domain>`` with the value
``v=DKIM1; k=rsa; p=<base64 DER SubjectPublicKeyInfo>`` or
``v=DKIM1; k=ed25519; p=<base64 raw 32-byte public key>`` (RFC 8463).
"""

from __future__ import annotations

import argparse
import re
import sys

from mta.commands.common import add_config_arg, config_from, fail
from mta.dkim import (
    ED25519_SHA256,
    RSA_SHA256,
    DkimSigner,
    TxtRecord,
    generate_private_key,
    private_key_pem,
    txt_record,
    write_key_file,
)

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")

GENKEY_HELP = """\
Write a new DKIM private key and print the DNS TXT record that publishes it.

The key file is unencrypted PEM PKCS#8 ("-----BEGIN PRIVATE KEY-----") for
both algorithms (RFC 8410 for Ed25519), mode 0600. Point a [[dkim.keys]]
entry at it (domain, selector, key_file, algorithm) and publish the record:
  <selector>._domainkey.<domain>  TXT  "v=DKIM1; k=rsa|ed25519; p=..."
For ed25519, p= is the raw 32-byte public key in base64 (RFC 8463).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dkim", help="DKIM keys and DNS records")
    dsub = p.add_subparsers(dest="dkim_command", required=True)
    gen = dsub.add_parser(
        "genkey",
        help="write a new private key and print its DNS TXT record",
        description=GENKEY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--domain", required=True, help="signing domain (d=)")
    gen.add_argument("--selector", required=True, help="selector (s=)")
    gen.add_argument("--algorithm", choices=[RSA_SHA256, ED25519_SHA256], default=RSA_SHA256)
    gen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    gen.add_argument("--out", help="key file to write (default: ./DOMAIN.SELECTOR.key)")
    gen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    gen.set_defaults(func=run_genkey)
    records = dsub.add_parser(
        "records", help="check the configured key files and print the TXT record of each"
    )
    add_config_arg(records)
    records.set_defaults(func=run_records)


def run_genkey(args: argparse.Namespace) -> int:
    problem = genkey_problem(args.domain, args.selector, args.algorithm, args.bits)
    if problem:
        return fail(f"dkim genkey: {problem}")
    domain = args.domain.rstrip(".").lower()
    out = args.out or f"{domain}.{args.selector}.key"
    key = generate_private_key(args.algorithm, args.bits)
    try:
        write_key_file(out, private_key_pem(key), force=args.force)
    except FileExistsError:
        return fail(f"dkim genkey: {out} already exists; use --force to overwrite it")
    except OSError as exc:
        return fail(f"dkim genkey: cannot write {out}: {exc.strerror}")
    print(f"key:   {out} ({args.algorithm}, PEM PKCS#8, mode 0600)")
    print_record(txt_record(key, domain, args.selector))
    return 0


def genkey_problem(domain: str, selector: str, algorithm: str, bits: int) -> str:
    """Why these genkey arguments cannot work, or '' when they can."""
    if not _DNS_NAME.fullmatch(domain):
        return f"{domain!r} is not a domain name"
    if not _DNS_NAME.fullmatch(selector) or selector.endswith("."):
        return f"{selector!r} is not a valid selector"
    if algorithm == RSA_SHA256 and not 1024 <= bits <= 8192:
        return f"--bits {bits}: RSA keys must have 1024 to 8192 bits (2048 recommended)"
    return ""


def run_records(args: argparse.Namespace) -> int:
    signer = DkimSigner.from_config(config_from(args).dkim)
    for domain in signer.domains:
        for key in signer.keys_for(domain):
            print_record(txt_record(key.key, key.domain, key.selector))
    if not signer.domains:
        print("no [[dkim.keys]] configured", file=sys.stderr)
    return 0


def print_record(record: TxtRecord) -> None:
    print(f"name:  {record.name}")
    print(f"value: {record.value}")
    print(f"zone:  {record.zone_line()}")
