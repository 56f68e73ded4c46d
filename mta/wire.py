"""Message bytes as SMTP carries them: lines end in CRLF, and nothing else ends one.

Intake refuses DATA with a bare CR or LF, and delivery mends any before writing (a
bare LF before a dot could end the data early at a receiver that takes one as a line
end). Both ask `crlf_only` for every message, so it is cheap: one C-level replace and
two memchr scans, where counting each of CR and LF walked the bytes one at a time
(about 16 us for 4 KB, against 3 us).
"""

from __future__ import annotations


def crlf_only(data: bytes) -> bool:
    """True if every CR and LF in `data` is part of a CRLF pair."""
    rest = data.replace(b"\r\n", b"")
    return b"\r" not in rest and b"\n" not in rest
