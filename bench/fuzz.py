"""Long fuzz runs of the parsers and the SMTP server loop (issue 10), outside CI.

    python -m bench.fuzz                       # hypothesis, 5000 examples per property
    python -m bench.fuzz --examples 20000 --atheris-seconds 300
    python -m bench.fuzz --skip-hypothesis --atheris-seconds 60 --targets path,bounce

Two parts:

1. hypothesis: the properties of tests/test_fuzz_parsers.py and tests/test_fuzz_smtp.py
   (the SMTP one against a real `mta serve` on loopback), with MTA_FUZZ_EXAMPLES raised
   from CI's 150.
2. atheris (coverage-guided, libFuzzer), when it is importable (`pip install atheris`;
   optional): one process per target, each for --atheris-seconds, checking the same
   properties. The bounce target starts from the shared bounce corpus when it is there.
   Crashing inputs are written to var/fuzz/<target>/ (libFuzzer's crash-* files).

Exit status 0 when every run passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.engine_proc import PROJECT_ROOT

HYPOTHESIS_FILES = ["tests/test_fuzz_parsers.py", "tests/test_fuzz_smtp.py"]
BOUNCE_CORPUS = [PROJECT_ROOT.parent / "shared" / "corpus" / "bounces",
                 Path("/work/shared/corpus/bounces")]
PATH_SEEDS = [
    b"<user@example.com>", b"<victim%dest.test@inbound.test>", b'<"v@dest.test"@[127.0.0.1]>',
    b"<@a.test,@b.test:u@c.test> SIZE=10 BODY=8BITMIME", b"<u@[IPv6:2001:db8::1]>", b"<>",
    b"<dest.test!victim@inbound.test>", b"<\xc3\xa9@ex\xc3\xa4mple.com> SMTPUTF8",
]
MESSAGE_SEEDS = [
    b"From: a@example.com\r\nTo: b@c\r\nSubject: s\r\n\r\nbody\r\n.\r\n..x\r\n",
    b"From: \"x\" <a@EXAMPLE.com>\r\nDKIM-Signature: v=1; d=x\r\n\r\n",
    b"Subject: x\r\n\tfolded\r\nFrom: a@example.com\n\nbare lf\r\n",
]
TARGETS = ("path", "data", "headers", "bounce", "dkim")


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_hypothesis(examples: int) -> bool:
    env = child_env(MTA_FUZZ_EXAMPLES=str(examples))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "--timeout", "0", *HYPOTHESIS_FILES]
    print(f"hypothesis: {examples} examples per property: {' '.join(HYPOTHESIS_FILES)}",
          flush=True)
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env)
    print(f"hypothesis: {'passed' if result.returncode == 0 else 'FAILED'} "
          f"in {time.monotonic() - started:.0f}s", flush=True)
    return result.returncode == 0


def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def run_atheris(target: str, seconds: int, workdir: Path) -> bool:
    """One target in its own process (libFuzzer exits the process when done)."""
    corpus = workdir / target / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = {"path": PATH_SEEDS, "data": MESSAGE_SEEDS, "headers": MESSAGE_SEEDS,
             "dkim": MESSAGE_SEEDS, "bounce": MESSAGE_SEEDS}[target]
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)
    if target == "bounce":
        for directory in BOUNCE_CORPUS:
            if directory.is_dir():
                for eml in sorted(directory.rglob("*.eml"))[:300]:
                    shutil.copy(eml, corpus / eml.name)
                break
    cmd = [sys.executable, "-m", "bench.fuzz", "--atheris-target", target, str(corpus),
           f"-max_total_time={seconds}", f"-artifact_prefix={workdir / target}/",
           "-max_len=20000", "-rss_limit_mb=2048", "-print_final_stats=1"]
    print(f"atheris: {target} for {seconds}s", flush=True)
    result = subprocess.run(cmd, cwd=PROJECT_ROOT, env=child_env(), capture_output=True,
                            text=True)
    tail = [line for line in result.stderr.splitlines()
            if line.startswith(("stat::", "==", "Traceback", " ", "AssertionError"))][-25:]
    ok = result.returncode == 0
    print(f"atheris: {target}: {'passed' if ok else 'FAILED'}", flush=True)
    for line in tail:
        print(f"    {line}")
    return ok


# --- atheris targets (run in the child process) --------------------------------------------------


def _target(name: str) -> Callable[[bytes], None]:
    import atheris

    with atheris.instrument_imports():
        import mta.address  # noqa: F401
        import mta.bounce  # noqa: F401
        import mta.dkim.canon  # noqa: F401
        import mta.dkim.signer  # noqa: F401
        import mta.smtp.intake  # noqa: F401
        import mta.smtp.session  # noqa: F401
    from mta.smtp.intake import from_domains, header_value
    from mta.smtp.session import is_clean_data, unstuff
    from tests import test_fuzz_parsers as props

    def path(data: bytes) -> None:
        text = data.decode("utf-8", "surrogateescape")
        props.check_path(text)
        props.check_path(f"<{text}>")

    def data_(data: bytes) -> None:
        wire = b"\r\n" + data
        clean = is_clean_data(wire)
        assert clean == (b"\0" not in wire and wire.count(b"\r") == wire.count(b"\r\n")
                         == wire.count(b"\n"))
        if clean:
            assert unstuff(wire).count(b"\r\n") == wire.count(b"\r\n") - 1

    def headers(data: bytes) -> None:
        value = header_value(data, b"X-Campaign-ID")
        assert "\r" not in value and "\n" not in value
        for dom in from_domains(data):
            assert dom and dom == dom.lower()

    return {"path": path, "data": data_, "headers": headers, "bounce": props.check_bounce,
            "dkim": props.check_sign}[name]


def atheris_main(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    check = _target(target)
    atheris.Setup([sys.argv[0], *libfuzzer_args], check)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--atheris-target"]:
        atheris_main(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000,
                        help="hypothesis examples per property (CI runs 150)")
    parser.add_argument("--atheris-seconds", type=int, default=120,
                        help="seconds per atheris target (0: skip atheris)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"atheris targets, comma-separated ({', '.join(TARGETS)})")
    parser.add_argument("--skip-hypothesis", action="store_true")
    parser.add_argument("--workdir", default="var/fuzz", help="atheris corpora and crashes")
    args = parser.parse_args(argv)

    results: dict[str, bool] = {}
    if not args.skip_hypothesis:
        results["hypothesis"] = run_hypothesis(args.examples)
    if args.atheris_seconds > 0:
        if not atheris_available():
            print("atheris: not installed (pip install atheris); skipped", flush=True)
        else:
            workdir = Path(args.workdir).resolve()
            for target in args.targets.split(","):
                if target not in TARGETS:
                    parser.error(f"unknown target {target!r}")
                results[f"atheris:{target}"] = run_atheris(target, args.atheris_seconds,
                                                           workdir)
    print("\nsummary:")
    for name, ok in results.items():
        print(f"  {name:20} {'passed' if ok else 'FAILED'}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
