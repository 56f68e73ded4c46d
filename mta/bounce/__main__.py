"""``python -m mta.bounce FILE...``: one JSON line per file, in input order.

Each line is ``{"file", "kind", "reason", "status", "recipient"}``; a file that
cannot be read gives kind "unknown" with an "error" field, and the exit code is
1 at the end.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from mta.bounce.parser import parse_bounce

MAX_FILE_BYTES = 16 * 1024 * 1024


def line_for(path: str) -> tuple[dict[str, object], bool]:
    """The JSON object for one file and whether it could be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES)
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


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m mta.bounce FILE...", file=sys.stderr)
        return 2
    failed = False
    for path in paths:
        record, ok = line_for(path)
        failed = failed or not ok
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
