"""The notice mail telling an account that one of its campaigns was paused.

Sent by the engine itself: null return path (no bounce loops), From: the engine's
postmaster, no account and no campaign on the spool record (so no pause, cap or
footer ever applies to it), marked ``notice`` in the record.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from mta.policy.rates import Breach
from mta.queue.spool import NewMessage
from mta.text import shown


def pause_notice(to: str, sender: str, hostname: str, account: str, campaign: str,
                 breach: Breach, now: float | None = None) -> NewMessage:
    now = time.time() if now is None else now
    name = shown(campaign, 200)
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Campaign {name} paused: {breach.describe().split(' (')[0]}"
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = make_msgid("notice", domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        f"Hello,\n\n"
        f"Sending of your campaign \"{name}\" (account {shown(account, 200)}) was paused "
        f"at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now))}:\n"
        f"its {breach.describe()}.\n\n"
        f"Mail of this campaign that was still queued is kept, not sent and not lost; new\n"
        f"mail for it is refused until the campaign is resumed. Please review the list\n"
        f"this campaign was sent to and contact us: we resume or drop the campaign on\n"
        f"your instructions.\n\n"
        f"-- \n{hostname}\n")
    return NewMessage(sender="", recipients=[to], data=msg.as_bytes(policy=SMTP),
                      message_id_header=str(msg["Message-ID"]),
                      extra={"notice": "CampaignPaused", "notice_for": account,
                             "notice_campaign": campaign})


def notice_sender(notice_from: str, hostname: str) -> str:
    return notice_from or f"postmaster@{hostname}"
