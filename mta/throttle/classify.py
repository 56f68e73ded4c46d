"""What an SMTP reply says about the destination's pace: the input of adaptation.

Only replies that mean "you are sending too fast / too much" slow a destination down.
Replies about one mailbox (full, over quota, receiving too fast: 4.2.x), about one
address (4.1.x) or greylisting say nothing about the destination's rate and are neutral.
"""

from __future__ import annotations

import enum
import re

CONNECTION_FAILED = 0  # the code to report a refused, reset or timed-out connection


class Signal(enum.Enum):
    OK = "ok"  # accepted
    SLOW_DOWN = "slow_down"  # cut the message rate and the connections
    SLOW_CONNECTIONS = "slow_connections"  # cut the connections only
    NEUTRAL = "neutral"  # a deferral about this message or mailbox only
    PERMANENT = "permanent"  # a 5xx: the bounce logic decides, pacing unchanged


_MAILBOX = re.compile(
    r"mailbox (is )?full|over ?quota|quota exceeded|insufficient (system )?storage"
    r"|user unknown|no such user|mailbox (unavailable|disabled|not found)",
    re.IGNORECASE,
)
_GREYLIST = re.compile(
    r"gr[ae]y-?list|postgrey|not yet authori[sz]ed"
    r"|(please )?(try|come) back later(?!.*\b(rate|volume|reputation)\b)",
    re.IGNORECASE,
)
_CONNECTIONS = re.compile(
    r"too many (concurrent |simultaneous |open )?(connections|sessions)"
    r"|too many concurrent|connection (limit|rate limit)|max(imum)? (number of )?connections",
    re.IGNORECASE,
)
_RATE = re.compile(
    r"rate.?limit|\brate\b|too many (messages|mails|emails)|throttl|slow down|unusual rate"
    r"|unexpected volume|\bvolume\b|temporarily deferred|reputation|too fast|server busy"
    r"|\bbusy\b|congest|\[tss?0\d\]|\bS3150\b|\bS3114\b|\bS775\b|\bRP-00\d\b",
    re.IGNORECASE,
)
_RATE_CODES = frozenset({"4.7.28", "4.7.650", "4.7.651", "4.7.500", "4.4.5", "4.3.2"})


def classify(code: int, enhanced: str | None, text: str, connecting: bool = False) -> Signal:
    """The pace signal of one reply. `connecting`: it came before the session was set up
    (the greeting or EHLO), so it is about connections, not messages."""
    if code == CONNECTION_FAILED:
        return Signal.SLOW_CONNECTIONS
    if 200 <= code < 400:
        return Signal.OK
    if code >= 500:
        return Signal.PERMANENT
    enhanced = enhanced or ""
    if enhanced.startswith(("4.1.", "4.2.")) or _MAILBOX.search(text) or _GREYLIST.search(text):
        return Signal.NEUTRAL
    if _CONNECTIONS.search(text):
        return Signal.SLOW_CONNECTIONS
    about_rate = code == 421 or enhanced in _RATE_CODES or bool(_RATE.search(text))
    if not about_rate:
        return Signal.NEUTRAL
    return Signal.SLOW_CONNECTIONS if connecting else Signal.SLOW_DOWN
