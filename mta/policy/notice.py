"""The notice mail telling an account that one of its campaigns was paused.

Sent by the engine itself: null return path (no bounce loops), From: the engine's
postmaster, no account and no campaign on the spool record (so no pause, cap or
footer ever applies to it), marked ``notice`` in the record.
"""

from __future__ import annotations

import itertools
import re
import textwrap
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from mta.policy.model import Suppression
from mta.policy.rates import Breach
from mta.queue.spool import NewMessage
from mta.text import shown

WIDTH = 72  # the notice's lines, so that it reads well as plain text
MAX_REPLIES = 5  # the most frequent replies listed
MAX_EXAMPLES = 3  # addresses shown for each
MAX_SCANNED = 100_000  # suppression entries looked at, at most (in the pause's transaction)
RULE_REASONS = {"hard_bounce": "hard-bounce", "complaint": "complaint",
                "unsubscribe": "unsubscribe"}  # the suppression reason each rule counts


@dataclass(frozen=True)
class ReplyCount:
    """One reply (or report) that came back for the campaign, how often, and to whom."""

    reply: str
    count: int
    examples: tuple[str, ...]


def frequent_replies(entries: Iterable[Suppression], campaign: str, rule: str
                     ) -> list[ReplyCount]:
    """The replies most often behind the campaign's suppressions for `rule`, from the
    account's suppression list (each entry keeps the reply that put it there)."""
    reason = RULE_REASONS.get(rule, rule)
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for entry in itertools.islice(entries, MAX_SCANNED):
        if entry.campaign != campaign or entry.reason != reason:
            continue
        reply = generic_reply(entry.detail, entry.address)
        counts[reply] += 1
        found = examples.setdefault(reply, [])
        if len(found) < MAX_EXAMPLES:
            found.append(entry.address)
    return [ReplyCount(reply, count, tuple(examples[reply]))
            for reply, count in counts.most_common(MAX_REPLIES)]


def generic_reply(detail: str, address: str) -> str:
    """The reply with the recipient's own address taken out, so equal replies group."""
    text = " ".join(detail.split()) or "(no reply text)"
    return re.sub(re.escape(address), "...", text, flags=re.IGNORECASE) if address else text


def paragraph(text: str) -> str:
    return textwrap.fill(text, WIDTH, break_on_hyphens=False)


def replies_text(replies: Sequence[ReplyCount]) -> str:
    """The replies as short lines: count and reply, then a few of the addresses."""
    if not replies:
        return ""
    lines = ["What came back most often (the addresses are yours to check):", ""]
    for r in replies:
        head = f"{r.count:>5} x "
        lines.append(textwrap.fill(shown(r.reply, 300), WIDTH, initial_indent=head,
                                   subsequent_indent=" " * len(head)))
        lines.append(textwrap.fill(", ".join(shown(a, 100) for a in r.examples), WIDTH,
                                   initial_indent=" " * len(head) + "e.g. ",
                                   subsequent_indent=" " * (len(head) + 5)))
    return "\n".join(lines) + "\n\n"


def pause_notice(to: str, sender: str, hostname: str, account: str, campaign: str,
                 breach: Breach, now: float | None = None,
                 replies: Sequence[ReplyCount] = ()) -> NewMessage:
    now = time.time() if now is None else now
    name = shown(campaign, 200)
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Campaign {name} paused: {breach.describe().split(' (')[0]}"
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = make_msgid("notice", domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    msg.set_content(
        "Hello,\n\n"
        + paragraph(f"Sending of your campaign \"{name}\" (account {shown(account, 200)}) "
                    f"was paused at {when}, as its") + "\n"
        + textwrap.fill(f"{breach.describe()}.", WIDTH, initial_indent="  ",
                        subsequent_indent="  ") + "\n\n"
        + replies_text(replies)
        + paragraph("Mail of this campaign that was still queued is kept, not sent and not "
                    "lost; new mail for it is refused until the campaign is resumed. Please "
                    "review the list this campaign was sent to and contact us: we resume or "
                    "drop the campaign on your instructions.") + "\n\n"
        + f"-- \n{hostname}\n")
    return NewMessage(sender="", recipients=[to], data=msg.as_bytes(policy=SMTP),
                      message_id_header=str(msg["Message-ID"]),
                      extra={"notice": "CampaignPaused", "notice_for": account,
                             "notice_campaign": campaign})


def notice_sender(notice_from: str, hostname: str) -> str:
    return notice_from or f"postmaster@{hostname}"
