"""DKIM signing speed: our signer against the bare `cryptography` RSA operation, one core.

    python -m bench.dkim_speed [--rounds 5] [--round-seconds 0.5] [--size 4096]

Prints the bare RSA-2048 PKCS#1 v1.5 SHA-256 sign rate, then for two messages of
about --size bytes (a typical newsletter: text + indented HTML, quoted-printable;
and a worst case with double and trailing spaces on every line) DkimSigner's
RSA-2048 rate, its ratio to the bare rate (target >= 0.85), and its Ed25519
rate (target >= 5,000 msg/s). Rates are per CPU second of
this process (time.process_time), measured in interleaved rounds, median kept,
so other load on the machine disturbs them little. Every signature is checked
once with dkimpy first, so what is timed is a correct signature.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mta.dkim import DkimSigner, SigningKey, generate_private_key, txt_record

DOMAIN = "bench.example"


def newsletter(size: int) -> bytes:
    """A typical campaign message of about `size` bytes: text + indented HTML, quoted-printable."""
    rows = 1
    while True:
        message = _newsletter(rows)
        if len(message) >= size or rows > 10_000:
            return message
        rows += 1


def _newsletter(rows: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Shop News <news@{DOMAIN}>"
    msg["To"] = "Reader <reader@example.org>"
    msg["Subject"] = "Spring sale: 20% off everything this week"
    msg["Date"] = "Mon, 01 Jan 2024 10:00:00 +0000"
    msg["Message-ID"] = f"<0123456789.abcdef@{DOMAIN}>"
    msg["List-Unsubscribe"] = f"<https://{DOMAIN}/u/0123456789>, <mailto:u-0123456789@{DOMAIN}>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["X-Campaign-ID"] = "c1"
    paragraph = (
        "Our spring sale starts today. Every product in the shop is 20% off until Sunday, "
        "and delivery is free on orders over 50 euros.\n\n"
    )
    msg.set_content("Hello Reader,\n\n" + paragraph * 3, cte="quoted-printable")
    items = "".join(
        f'      <tr>\n        <td class="item">Product {i}</td>\n'
        f'        <td class="price">{i * 3}.99 &euro;</td>\n      </tr>\n'
        for i in range(rows)
    )
    html = (
        "<html>\n  <body>\n    <h1>Spring sale</h1>\n    <p>Every product is 20% off.</p>\n"
        f"    <table>\n{items}    </table>\n"
        f'    <p><a href="https://{DOMAIN}/u/0123456789">Unsubscribe</a></p>\n  </body>\n</html>\n'
    )
    msg.add_alternative(html, subtype="html", cte="quoted-printable")
    return msg.as_bytes(policy=SMTP)


def whitespace_heavy(size: int) -> bytes:
    """A worst case for relaxed canonicalization: double spaces and trailing spaces on every line."""
    head = (
        f"From: Bench Sender <news@{DOMAIN}>\r\n"
        "To: Reader <reader@example.org>\r\n"
        "Subject: Weekly news: prices, products and a few words more\r\n"
        "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        f"Message-ID: <0123456789.abcdef@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        f"List-Unsubscribe: <https://{DOMAIN}/u/0123456789>, <mailto:u-0123456789@{DOMAIN}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        "X-Campaign-ID: c1\r\n"
        "\r\n"
    ).encode()
    line = b"Lorem ipsum dolor sit amet, consectetur  adipiscing elit, sed do eiusmod.  \r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)] + b"\r\n"
    return head + body


def rate(op: Callable[[], object], seconds: float) -> float:
    """Operations per CPU second, running `op` for about `seconds` of CPU time."""
    done = 0
    start = time.process_time()
    deadline = start + seconds
    while True:
        for _ in range(20):
            op()
        done += 20
        now = time.process_time()
        if now >= deadline:
            return done / (now - start)


def check_verifies(signed: bytes, keys: list[SigningKey]) -> None:
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): txt_record(k.key, k.domain, k.selector)
               for k in keys}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        record = records.get(name)
        return record.value.encode() if record else None

    for i in range(len(keys)):
        assert dkim.DKIM(signed).verify(idx=i, dnsfunc=dnsfunc), f"signature {i} does not verify"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()

    messages = {"newsletter": newsletter(args.size), "whitespace-heavy": whitespace_heavy(args.size)}
    rsa_key = generate_private_key("rsa-sha256", 2048)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    rsa_signing = SigningKey(DOMAIN, "rsa", "rsa-sha256", rsa_key)
    ed_signing = SigningKey(DOMAIN, "ed", "ed25519-sha256", generate_private_key("ed25519-sha256"))
    rsa_signer, ed_signer = DkimSigner([rsa_signing]), DkimSigner([ed_signing])
    for message in messages.values():
        check_verifies(rsa_signer.sign(message), [rsa_signing])
        check_verifies(ed_signer.sign(message), [ed_signing])

    # The bare operation signs what a DKIM signature covers: about 700 bytes of headers.
    header_input = messages["newsletter"][:700]
    pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()

    def bare_rsa() -> None:
        rsa_key.sign(header_input, pkcs1, sha256)

    # Interleaved rounds, so a burst of other load hits every measurement alike.
    rates: dict[str, list[float]] = {"bare": []}
    for _ in range(args.rounds):
        rates["bare"].append(rate(bare_rsa, args.round_seconds))
        for name, message in messages.items():
            rates.setdefault(f"rsa {name}", []).append(
                rate(functools.partial(rsa_signer.sign, message), args.round_seconds)
            )
            rates.setdefault(f"ed {name}", []).append(
                rate(functools.partial(ed_signer.sign, message), args.round_seconds / 2)
            )
    median = {name: statistics.median(values) for name, values in rates.items()}

    print(f"bare cryptography RSA-2048 sign:       {median['bare']:7.0f} sig/s  (one core)")
    for name, message in messages.items():
        ours = median[f"rsa {name}"]
        print(f"{name} message, {len(message)} bytes:")
        print(f"  DkimSigner RSA-2048:                {ours:7.0f} msg/s  "
              f"ratio {ours / median['bare']:.3f} (target >= 0.85)")
        print(f"  DkimSigner Ed25519:                 {median[f'ed {name}']:7.0f} msg/s  "
              "(target >= 5000)")


if __name__ == "__main__":
    main()
