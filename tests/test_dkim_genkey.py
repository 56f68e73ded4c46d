"""`mta dkim genkey` and `mta dkim records`, run as real subprocesses."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
from pathlib import Path

from mta.config import DkimConfig, DkimKeyConfig
from mta.dkim import DkimSigner, TxtRecord
from tests.helpers.dkim import dkimpy_results, opendkim_results

MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: genkey\r\n\r\nhello\r\n"
REPO = Path(__file__).resolve().parent.parent


def mta(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mta", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def printed_record(stdout: str) -> TxtRecord:
    lines = dict(line.split(":", 1) for line in stdout.splitlines())
    return TxtRecord(lines["name"].strip(), lines["value"].strip())


def test_rsa_genkey_writes_a_0600_pkcs8_key_whose_record_verifies(tmp_path: Path) -> None:
    run = mta("dkim", "genkey", "--domain", "example.com", "--selector", "s1", cwd=tmp_path)

    assert run.returncode == 0, run.stderr
    key_file = tmp_path / "example.com.s1.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    record = printed_record(run.stdout)
    assert record.name == "s1._domainkey.example.com"
    assert record.value.startswith("v=DKIM1; k=rsa; p=MIIB")
    assert 's1._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=' in run.stdout

    signer = DkimSigner.from_config(
        DkimConfig(keys=[DkimKeyConfig("example.com", "s1", str(key_file))])
    )
    signed = signer.sign(MESSAGE)
    assert dkimpy_results(signed, [record]) == {("example.com", "s1"): "pass"}
    assert opendkim_results(signed, [record], tmp_path / "od") == {("example.com", "s1"): "pass"}


def test_ed25519_genkey_with_out(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "ed.pem"
    out.parent.mkdir()

    run = mta(
        "dkim", "genkey", "--domain", "example.com", "--selector", "ed",
        "--algorithm", "ed25519-sha256", "--out", str(out), cwd=tmp_path,
    )

    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    record = printed_record(run.stdout)
    assert record.value.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(record.value.split("p=")[1])) == 32
    signer = DkimSigner.from_config(
        DkimConfig(keys=[DkimKeyConfig("example.com", "ed", str(out), "ed25519-sha256")])
    )
    signed = signer.sign(MESSAGE)
    assert dkimpy_results(signed, [record]) == {("example.com", "ed"): "pass"}
    assert opendkim_results(signed, [record], tmp_path / "od") == {("example.com", "ed"): "pass"}


def test_genkey_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    key_file = tmp_path / "example.com.s1.key"
    key_file.write_bytes(b"precious")
    key_file.chmod(0o644)
    args = ("dkim", "genkey", "--domain", "example.com", "--selector", "s1",
            "--algorithm", "ed25519-sha256")

    refused = mta(*args, cwd=tmp_path)

    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "already exists; use --force" in refused.stderr
    assert key_file.read_bytes() == b"precious"

    forced = mta(*args, "--force", cwd=tmp_path)

    assert forced.returncode == 0, forced.stderr
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_genkey_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    bad_domain = mta("dkim", "genkey", "--domain", "no spaces.com", "--selector", "s", cwd=tmp_path)
    short = mta("dkim", "genkey", "--domain", "a.com", "--selector", "s", "--bits", "512", cwd=tmp_path)
    no_dir = mta("dkim", "genkey", "--domain", "a.com", "--selector", "s",
                 "--out", str(tmp_path / "missing" / "k.key"), cwd=tmp_path)

    for run, words in ((bad_domain, "is not a domain name"), (short, "1024 to 8192 bits"),
                       (no_dir, "cannot write")):
        assert run.returncode == 2
        assert run.stderr.count("\n") == 1 and words in run.stderr, run.stderr
    assert list(tmp_path.iterdir()) == []


def test_records_prints_configured_keys_and_stops_on_a_bad_key_file(tmp_path: Path) -> None:
    made = mta("dkim", "genkey", "--domain", "example.com", "--selector", "s1",
               "--algorithm", "ed25519-sha256", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    config = tmp_path / "mta.toml"
    config.write_text(
        '[[dkim.keys]]\ndomain = "example.com"\nselector = "s1"\n'
        'key_file = "example.com.s1.key"\nalgorithm = "ed25519-sha256"\n'
    )

    shown = mta("dkim", "records", "--config", str(config), cwd=tmp_path)

    assert shown.returncode == 0, shown.stderr
    assert printed_record(shown.stdout) == printed_record(made.stdout)

    config.write_text(config.read_text().replace("example.com.s1.key", "gone.key"))
    broken = mta("dkim", "records", "--config", str(config), cwd=tmp_path)

    assert broken.returncode == 2
    assert broken.stderr == f"mta: config error: DKIM key file '{tmp_path / 'gone.key'}' not found\n"
