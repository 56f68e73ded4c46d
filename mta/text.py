"""Names and text from outside (customers, remote servers): checked once, shown safely.

A campaign name, an account's header value, a bounce's quoted words are data. Where
they enter, `name_problem` says what is wrong with a name (one definition for every
name a customer gives); wherever they are shown (mail headers and bodies, logs,
terminals), `shown` writes every character that could act on the display or the
format (line breaks of any kind, control and format characters, escape sequences,
RFC 2047 encoded-words) as a visible escape instead.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit, urlunsplit

MAX_NAME = 128  # characters; a longer name is refused, never truncated (two would become one)

# Categories that are never part of a name: controls (C0, C1, DEL), format characters
# (bidi overrides, zero-width joiners), line and paragraph separators, surrogates,
# private use and unassigned code points.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[bBqQ]\?")


def hidden(char: str) -> bool:
    """A character that acts on a display or a format instead of showing: controls,
    format characters, line breaks, and white space other than the plain space."""
    return unicodedata.category(char) in _HIDDEN or (char.isspace() and char != " ")


def name_problem(value: str, limit: int = MAX_NAME) -> str | None:
    """What makes `value` unfit as a name, in a few words; None when it is fine."""
    if not value.strip():
        return "is empty"
    if len(value) > limit:
        return f"is longer than {limit} characters"
    for char in value:
        if hidden(char):
            return f"holds {_kind(char)} (U+{ord(char):04X})"
    if _ENCODED_WORD.search(value):
        return "holds an RFC 2047 encoded-word"
    if value != value.strip():
        return "starts or ends with white space"
    return None


def _kind(char: str) -> str:
    if char in "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029":
        return "a line break"
    if char.isspace():
        return "white space other than a plain space"
    return "a control or format character"


def shown(text: str, limit: int | None = None, ascii_only: bool = False) -> str:
    """`text` with everything that is not plainly printable written as an escape
    (\\n, \\x1b, \\u2028, ...) and encoded-words broken (=\\?), cut to `limit`.
    `ascii_only`: every non-ASCII character escaped too (SMTP replies). Escaping twice
    changes nothing more."""
    out = []
    for char in text:
        if hidden(char) or (ascii_only and ord(char) > 0x7E):
            code = ord(char)
            out.append(repr(char)[1:-1] if code < 0x100 and char in "\n\r\t" else (
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                else f"\\U{code:08x}"))
        else:
            out.append(char)
    escaped = "".join(out).replace("=?", "=\\?")
    return escaped if limit is None else escaped[:limit]


def without_password(url: str) -> str:
    """A URL as logs and status may show it: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
