"""``python -m mta.bounce --explain``: the part read, the deciding words or code, the rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mta.bounce.explain import explain

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def mail(text: str) -> bytes:
    lines = text.strip("\n").splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\r\n".join(line[indent:] for line in lines).encode() + b"\r\n"


POSTFIX_UNKNOWN = mail(
    """
    From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
    Subject: Undelivered Mail Returned to Sender

    This is the mail system at host mx.example.net.

    <nobody@example.jp>: host mx.example.jp[192.0.2.1] said: 550 5.1.1
        <nobody@example.jp>: Recipient address rejected: User unknown in local
        recipient table (in reply to RCPT TO command)
    """
)

QMAIL_NO_CODE = mail(
    """
    From: MAILER-DAEMON@mx.example.jp
    Subject: failure notice

    Hi. This is the qmail-send program at mx.example.jp.
    I'm afraid I wasn't able to deliver your message to the following addresses.

    <gone@example.jp>:
    Sorry, no mailbox here by that name.
    """
)


def field(report: str, name: str, summary: bool = False) -> str:
    """A 'name: value' of the first recipient's section (or of the summary at the top)."""
    for line in report.splitlines():
        if line.startswith("  ") != summary and line.strip().startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name!r} line in:\n{report}")


def test_explanation_names_the_part_the_words_and_the_rule() -> None:
    report = explain(POSTFIX_UNKNOWN)
    assert field(report, "kind", summary=True) == "hard"
    assert field(report, "reason") == "userunknown"
    assert "Recipient address rejected: User unknown" in field(report, "read")
    assert field(report, "rule") == "status code and words agree"
    assert "5.1.1" in field(report, "decided") and "user unknown" in field(report, "decided")
    assert field(report, "command") == "RCPT"
    assert field(report, "status").startswith("5.1.1 (stated by the report)")


def test_explanation_says_when_the_status_was_inferred() -> None:
    report = explain(QMAIL_NO_CODE)
    assert field(report, "rule") == "sender qmail: its own words"
    assert field(report, "decided") == '"no mailbox here by that name" (written by qmail)'
    assert "inferred" not in field(report, "rule")
    assert field(report, "status").startswith("5.1.1 (the report states none")


def test_explanation_of_ordinary_mail_says_nothing_was_found() -> None:
    report = explain(b"From: a@example.com\r\nSubject: hi\r\n\r\nlunch?\r\n")
    assert field(report, "kind", summary=True) == "unknown"
    assert "no failed delivery was found" in report


def test_cli_explain_prints_each_file_and_fails_on_unreadable(tmp_path: Path) -> None:
    first = tmp_path / "postfix.eml"
    first.write_bytes(POSTFIX_UNKNOWN)
    missing = tmp_path / "missing.eml"
    run = subprocess.run(
        [sys.executable, "-m", "mta.bounce", "--explain", str(first), str(missing)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert f"== {first}" in run.stdout and f"== {missing}" in run.stdout
    assert "rule:" in run.stdout and "cannot read" in run.stdout


def test_cli_without_files_prints_usage() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mta.bounce", "--explain"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "--explain" in run.stderr
