"""Helpers for the abuse and fuzz tests (no tests here): a self-signed certificate,
STARTTLS on the raw client, spool and process reads."""

from __future__ import annotations

import datetime
import ssl
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mta.queue.spool import Spool
from tests.helpers.engine import RawSmtp


def self_signed_cert(directory: Path, name: str = "mta.localhost") -> tuple[Path, Path]:
    """A throwaway certificate and key (PEM files) for the engine's STARTTLS."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def starttls(client: RawSmtp) -> None:
    """Upgrade the raw client's socket after the server's 220 to STARTTLS."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    assert client.buffer == b"", f"plain-text bytes left before the handshake: {client.buffer!r}"
    client.sock = ctx.wrap_socket(client.sock, server_hostname="mta.localhost")


def replies(client: RawSmtp, n: int) -> list[tuple[int, str]]:
    return [client.reply() for _ in range(n)]


def stored_messages(spool_path: Path) -> dict[str, dict[str, Any]]:
    """Every message record in the spool, by id (envelope, account, data)."""
    spool = Spool(spool_path, readonly=True)
    try:
        with spool.read() as txn:
            return {m["id"]: m for m in spool.messages(txn)}
    finally:
        spool.close()


def new_messages(spool_path: Path, before: set[str]) -> list[dict[str, Any]]:
    return [m for mid, m in stored_messages(spool_path).items() if mid not in before]


def body_of(record: dict[str, Any]) -> bytes:
    """The message as the client sent it: the data without the engine's Received: field."""
    data: bytes = record["data"]
    assert data.startswith(b"Received: "), data[:100]
    end = data.index(b"\r\n", data.index(b";\r\n\t") + 3)
    return data[end + 2:]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def send_slowly(client: RawSmtp, data: bytes, interval: float, limit: float) -> float:
    """Send `data` one byte every `interval` seconds until the server hangs up (or `limit`
    seconds pass); the seconds it took the server to hang up, or `limit`."""
    start = time.monotonic()
    client.sock.settimeout(interval)
    for i in range(len(data)):
        if time.monotonic() - start > limit:
            break
        try:
            client.sock.sendall(data[i:i + 1])
            chunk = client.sock.recv(65536)
            if not chunk:
                return time.monotonic() - start
            client.buffer += chunk
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    return limit


def engine_log(tmp: Path) -> str:
    path = tmp / "engine.log"
    return path.read_text(errors="replace") if path.exists() else ""
