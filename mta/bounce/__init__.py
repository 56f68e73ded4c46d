"""Bounce, feedback-loop and auto-reply classification.

``parse_bounce(data)`` reads a whole e-mail (RFC 3464 DSNs, the non-standard
bounces of common MTAs and providers, ARF feedback reports, RFC 3834
auto-replies) and returns a ``BounceResult``; ``classify_reply`` classifies the
SMTP replies the engine gets while delivering, with the same reason taxonomy;
``verp`` builds and checks the engine's signed VERP return paths.

What the words mean is data: reasons.toml (the reason taxonomy, its phrases by
writer, its status codes), senders.toml (reporting MTA families and local delivery
agents) and receivers.toml (providers' documented replies). ``python -m mta.bounce
--explain FILE`` shows which words or code decided, and by which rule.
"""

from mta.bounce.model import KINDS, REASONS, BounceResult
from mta.bounce.parser import parse_bounce
from mta.bounce.reply import classify_reply
from mta.bounce.verp import make_return_path, parse_return_path

__all__ = [
    "KINDS",
    "REASONS",
    "BounceResult",
    "classify_reply",
    "make_return_path",
    "parse_bounce",
    "parse_return_path",
]
