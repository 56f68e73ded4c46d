"""``python -m mta.bounce FILE...``: one JSON line per file, in input order.

Each line is ``{"file", "kind", "reason", "status", "recipient"}``; a file that
cannot be read gives kind "unknown" with an "error" field, and the exit code is
1 at the end.

``python -m mta.bounce --explain FILE...`` prints, for each file, the part of the
report that was read, the rule that decided and the phrase or code it rested on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from mta.bounce.explain import explain
from mta.bounce.parser import parse_bounce

MAX_FILE_BYTES = 16 * 1024 * 1024
USAGE = "usage: python -m mta.bounce [--explain] FILE..."


def read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(MAX_FILE_BYTES)


def line_for(path: str) -> tuple[dict[str, object], bool]:
    """The JSON object for one file and whether it could be read."""
    try:
        data = read_file(path)
    except OSError as error:
        return {
            "file": path,
            "kind": "unknown",
            "reason": "undefined",
            "status": None,
            "recipient": None,
            "error": f"{type(error).__name__}: {error.strerror or error}",
        }, False
    result = parse_bounce(data)
    return {
        "file": path,
        "kind": result.kind,
        "reason": result.reason,
        "status": result.status,
        "recipient": result.recipient,
    }, True


def explain_files(paths: list[str]) -> int:
    """The --explain report of each file; 1 if any could not be read."""
    failed = False
    for index, path in enumerate(paths):
        if index:
            print()
        print(f"== {path}")
        try:
            print(explain(read_file(path)), end="", flush=True)
        except OSError as error:
            print(f"cannot read: {type(error).__name__}: {error.strerror or error}", flush=True)
            failed = True
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    explaining = "--explain" in paths
    paths = [p for p in paths if p != "--explain"]
    if not paths:
        print(USAGE, file=sys.stderr)
        return 2
    if explaining:
        return explain_files(paths)
    failed = False
    for path in paths:
        record, ok = line_for(path)
        failed = failed or not ok
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
