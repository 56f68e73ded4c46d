"""Helpers for the DKIM tests (no tests here): keys on disk, and offline verification
with dkimpy's verifier and with OpenDKIM (`opendkim -t` reading TestPublicKeys).

OpenDKIM missing is a failure, not a skip: the tests must prove interoperability.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dkim
from dkim.util import parse_tag_value

from mta.config import DkimKeyConfig
from mta.dkim import TxtRecord, generate_private_key, private_key_pem, txt_record
from mta.dkim.keys import PrivateKey

Results = dict[tuple[str, str], str]  # (d=, s=) -> "pass" / "fail" / ...


@dataclass(frozen=True)
class KeyOnDisk:
    config: DkimKeyConfig
    record: TxtRecord


def cached_private_key(algorithm: str, n: int = 0) -> PrivateKey:
    """Key number `n` for `algorithm` (RSA: 2048 bits), made once per session (RSA keygen is slow)."""
    return _generate_once(algorithm, n)


@functools.cache
def _generate_once(algorithm: str, n: int) -> PrivateKey:
    return generate_private_key(algorithm, 2048)


def write_key(
    directory: Path, domain: str, selector: str, algorithm: str = "rsa-sha256", n: int = 0
) -> KeyOnDisk:
    key = cached_private_key(algorithm, n)
    path = directory / f"{domain}.{selector}.key"
    path.write_bytes(private_key_pem(key))
    return KeyOnDisk(
        DkimKeyConfig(domain=domain, selector=selector, key_file=str(path), algorithm=algorithm),
        txt_record(key, domain, selector),
    )


def signature_ids(message: bytes) -> list[tuple[str, str]]:
    """(d=, s=) of each DKIM-Signature field, top to bottom."""
    ids = []
    for value in re.findall(rb"(?ims)^DKIM-Signature:(.*?)\r?\n(?![ \t])", message):
        tags = parse_tag_value(re.sub(rb"\s+", b"", value))
        ids.append((tags[b"d"].decode(), tags[b"s"].decode()))
    return ids


def without_signatures(message: bytes) -> bytes:
    """The message with its leading DKIM-Signature fields removed."""
    return _LEADING_SIGNATURES.sub(b"", message)


_LEADING_SIGNATURES = re.compile(rb"\A(?:DKIM-Signature:.*?\r\n(?![ \t]))+", re.S | re.I)


def dkimpy_results(message: bytes, records: Iterable[TxtRecord]) -> Results:
    """Verify every signature with dkimpy, answering DNS from `records`."""
    table = {f"{r.name}.".encode(): r.value.encode() for r in records}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name)

    verifier = dkim.DKIM(message)
    results: Results = {}
    for i, ids in enumerate(signature_ids(message)):
        try:
            results[ids] = "pass" if verifier.verify(idx=i, dnsfunc=dnsfunc) else "fail"
        except dkim.DKIMException:
            results[ids] = "fail"
    return results


def sbin_tool(name: str) -> str:
    """The path of an OpenDKIM tool (in /usr/sbin, often not on a user's PATH); fails if missing."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert path, f"{name} is not installed (Debian packages opendkim, opendkim-tools)"
    return path


_AR_RESULT = re.compile(
    r"dkim=(\w+)(?:(?!dkim=).)*?header\.d=([^\s;]+)(?:(?!dkim=).)*?header\.s=([^\s;']+)", re.S
)


def opendkim_results(message: bytes, records: Iterable[TxtRecord], workdir: Path) -> Results:
    """Verify every signature with `opendkim -t`, public keys from a TestPublicKeys file."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys = workdir / "public-keys"
    keys.write_text("".join(f"{r.name} {r.value}\n" for r in records))
    conf = workdir / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keys}\n")
    msg = workdir / "message.eml"
    msg.write_bytes(message)
    run = subprocess.run(
        [sbin_tool("opendkim"), "-x", str(conf), "-t", str(msg), "-vvv"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return {(d, s): result for result, d, s in _AR_RESULT.findall(run.stdout)}


def all_pass(results: Results, expected: Iterable[tuple[str, str]]) -> bool:
    return results == {ids: "pass" for ids in expected}
