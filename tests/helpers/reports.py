"""Bounces (RFC 3464 DSNs) and complaints (RFC 5965 ARF) as a remote MTA would send them."""

from __future__ import annotations


def dsn(to: str, recipients: list[str], status: str = "5.1.1") -> bytes:
    """A DSN sent to `to`, reporting each of `recipients` as failed with `status`."""
    blocks = "".join(f"Final-Recipient: rfc822; {r}\nAction: failed\nStatus: {status}\n"
                     f"Diagnostic-Code: smtp; 550 {status} <{r}>: Recipient address rejected: "
                     f"User unknown\n\n" for r in recipients)
    return f"""From: MAILER-DAEMON@mx.dest.test
To: {to}
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

Your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.dest.test

{blocks}--B--
""".replace("\n", "\r\n").encode()


def arf(to: str, recipients: list[str], quoted_headers: str = "",
        campaign: str = "spring") -> bytes:
    """An abuse report sent to `to` naming `recipients`; the quoted original starts with
    `quoted_headers` (lines ending in a newline), then From, Subject, X-Campaign-ID."""
    rcpt_fields = "".join(f"Original-Rcpt-To: {r}\n" for r in recipients)
    return f"""From: fbl@isp.test
To: {to}
Subject: Abuse report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="F"

--F
Content-Type: text/plain

This is an abuse report.

--F
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: isp-fbl/1.0
Version: 1
{rcpt_fields}
--F
Content-Type: message/rfc822

{quoted_headers}From: news@shop.test
Subject: spring sale
X-Campaign-ID: {campaign}

hello
--F--
""".replace("\n", "\r\n").encode()
