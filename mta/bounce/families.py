"""Reading a bounce the way its own MTA family and local delivery agents mean it.

The tables are senders.toml: a family is recognised by its marks (headers, subject, a
fixed sentence of its body); within its bounces its own sentences settle the reason and
name the SMTP command. A local delivery agent (Dovecot, mail.local, procmail, ...) is
recognised by its marker in the error text.
"""

from __future__ import annotations

from mta.bounce.mime import MailParts
from mta.bounce.model import Delivery
from mta.bounce.phrases import Family, agents, families, mark_keys, normalize
from mta.bounce.reason import Decision

_BODY_CHARS = 4000  # the marks are sentences near the top of the report


def family_of(parts: MailParts, report: str) -> Family | None:
    """The MTA family whose marks the bounce carries, or None."""
    values = _mark_values(parts)
    values["body"] = report[:_BODY_CHARS].lower()
    for family in families():
        for mark in family.marks:
            for key, wanted in mark:
                value = values.get(key)
                if value is None or wanted not in value:
                    break
            else:
                return family
    return None


def _mark_values(parts: MailParts) -> dict[str, str]:
    """The headers the marks read, raw and lower-cased (the marks are plain ASCII)."""
    keys = mark_keys()
    values: dict[str, str] = {}
    for name, value in parts.message.raw_items():
        key = name.lower()
        if key in keys:
            values[key] = f"{values[key]}\n{value}".lower() if key in values else str(value).lower()
    return values


def family_command(family: Family | None, d: Delivery) -> str:
    """The SMTP command the family's own wording names, or ''."""
    if family is None or not family.commands:
        return ""
    text = normalize(d.diagnosis)
    return next((command for command, phrases in family.commands if phrases.find(text)), "")


def family_hint(family: Family | None, d: Delivery) -> Decision | None:
    """The reason the family's own sentences or codes give, or None."""
    if family is None or (family.local_only and d.command):
        return None
    by_code = family.by_code(d.status) if d.status else None
    if by_code:
        return Decision(by_code[0], f"sender {family.name}: its own status code", by_code[1])
    found = family.find(normalize(d.diagnosis))
    if found:
        reason, said = found
        return Decision(reason, f"sender {family.name}: its own words", said.phrase, family.name)
    if family.at_rcpt and d.command == "RCPT":
        return Decision(family.at_rcpt, f"sender {family.name}: refused at RCPT", "RCPT")
    return None


def agent_hint(d: Delivery) -> Decision | None:
    """The reason a local delivery agent's error gives, or None."""
    if d.command not in ("", "DATA"):
        return None
    text = normalize(d.diagnosis)
    by_name, markers = agents()
    marker = markers.find(text)
    if marker is None:
        return None
    agent = by_name[marker.writer]
    found = agent.find(text)
    if found:
        return Decision(found[0], f"local delivery agent {agent.name}", found[1].phrase, agent.name)
    rule = f"local delivery agent {agent.name}: an error of its own"
    return Decision(agent.otherwise, rule, marker.phrase, agent.name) if agent.otherwise else None
