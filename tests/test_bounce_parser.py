"""Unit tests of the bounce parser, one small synthetic e-mail per format family."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.bounce import classify_reply, make_return_path, parse_bounce, parse_return_path, verp
from mta.bounce.verp import MAX_LOCAL_PART, decode_return_path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def mail(text: str) -> bytes:
    """Synthetic e-mail: strip the indentation of the literal, use CRLF like the wire."""
    lines = text.strip("\n").splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\r\n".join(line[indent:] for line in lines).encode() + b"\r\n"


POSTFIX_DSN = mail(
    """
    From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
    To: sender@example.org
    Subject: Undelivered Mail Returned to Sender
    MIME-Version: 1.0
    Content-Type: multipart/report; report-type=delivery-status; boundary="B1"

    --B1
    Content-Type: text/plain

    This is the mail system at host mx.example.net.

    <nobody@example.jp>: host mx.example.jp[192.0.2.1] said: 550 5.1.1
        <nobody@example.jp>: Recipient address rejected: User unknown in local
        recipient table (in reply to RCPT TO command)

    --B1
    Content-Type: message/delivery-status

    Reporting-MTA: dns; mx.example.net

    Final-Recipient: rfc822; nobody@example.jp
    Original-Recipient: rfc822;nobody@example.jp
    Action: failed
    Status: 5.1.1
    Remote-MTA: dns; mx.example.jp
    Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.jp>: Recipient address
        rejected: User unknown in local recipient table

    --B1
    Content-Type: text/rfc822-headers

    From: sender@example.org
    To: nobody@example.jp
    Subject: Spring offers
    Message-ID: <20240101.abc@example.org>
    X-Campaign-ID: spring-2024

    --B1--
    """
)


def test_rfc3464_dsn_gives_hard_userunknown_with_identifiers() -> None:
    result = parse_bounce(POSTFIX_DSN)
    assert (result.kind, result.reason, result.status) == ("hard", "userunknown", "5.1.1")
    assert result.recipient == "nobody@example.jp"
    assert result.command == "RCPT"
    assert result.message_id == "20240101.abc@example.org"
    assert result.campaign == "spring-2024"


def test_dsn_with_several_recipients_lists_them_all() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.net
        Subject: Undelivered Mail Returned to Sender
        Content-Type: multipart/report; report-type=delivery-status; boundary="B"

        --B
        Content-Type: message/delivery-status

        Reporting-MTA: dns; mx.example.net

        Final-Recipient: rfc822; full@example.jp
        Action: failed
        Status: 5.2.2
        Diagnostic-Code: smtp; 552 5.2.2 Mailbox full

        Final-Recipient: rfc822; other@example.jp
        Action: failed
        Status: 5.2.2
        Diagnostic-Code: smtp; 552 5.2.2 Mailbox full
        --B--
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "mailboxfull", "5.2.2")
    assert result.recipients == ["full@example.jp", "other@example.jp"]


def test_postfix_text_without_dsn_part() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
        Subject: Undelivered Mail Returned to Sender

        This is the mail system at host mx.example.net.

        I'm sorry to have to inform you that your message could not
        be delivered to one or more recipients.

        <buyer@shop.example>: host mx.shop.example[192.0.2.9] said: 554 5.7.1
            Service unavailable; Client host [198.51.100.7] blocked using
            zen.spamhaus.org (in reply to RCPT TO command)
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "blocked", "5.7.1")
    assert result.recipient == "buyer@shop.example"


def test_exim_bounce_with_copy_of_message() -> None:
    data = mail(
        """
        From: Mail Delivery System <Mailer-Daemon@mail.example.org>
        To: sender@example.org
        Subject: Mail delivery failed: returning message to sender
        X-Failed-Recipients: gone@example.com
        Auto-Submitted: auto-replied

        This message was created automatically by mail delivery software.

        A message that you sent could not be delivered to one or more of its
        recipients. This is a permanent error. The following address(es) failed:

          gone@example.com
            SMTP error from remote mail server after RCPT TO:<gone@example.com>:
            host mx.example.com [192.0.2.20]: 550 5.1.1 <gone@example.com>: no such user

        ------ This is a copy of the message, including all the headers. ------

        Message-Id: <orig-1@example.org>
        From: sender@example.org
        To: gone@example.com
        Subject: hello
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("hard", "userunknown", "5.1.1")
    assert result.recipient == "gone@example.com"
    assert result.command == "RCPT"
    assert result.message_id == "orig-1@example.org"


def test_exim_host_not_found_is_hard_hostunknown() -> None:
    data = mail(
        """
        From: Mail Delivery System <Mailer-Daemon@mail.example.org>
        Subject: Mail delivery failed: returning message to sender

        This message was created automatically by mail delivery software.

        A message that you sent could not be delivered to one or more of its
        recipients. This is a permanent error. The following address(es) failed:

          someone@no-such-domain.example
            Unrouteable address
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason) == ("hard", "hostunknown")
    assert result.recipient == "someone@no-such-domain.example"


def test_sendmail_transcript_after_data_is_spam_not_bad_address() -> None:
    data = mail(
        """
        From: Mail Delivery Subsystem <MAILER-DAEMON@relay.example.net>
        Subject: Returned mail: see transcript for details
        Auto-Submitted: auto-generated (failure)

        The original message was received at Mon, 1 Jan 2024 10:00:00 +0900

           ----- The following addresses had permanent fatal errors -----
        <reader@example.co.jp>
            (reason: 554 5.7.1 Message rejected as spam)

           ----- Transcript of session follows -----
        ... while talking to mx.example.co.jp.:
        >>> DATA
        <<< 554 5.7.1 Message rejected as spam
        554 5.0.0 Service unavailable
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "spamdetected", "5.7.1")
    assert result.recipient == "reader@example.co.jp"
    assert result.command == "DATA"


def test_qmail_bounce() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.jp
        Subject: failure notice

        Hi. This is the qmail-send program at mx.example.jp.
        I'm afraid I wasn't able to deliver your message to the following addresses.
        This is a permanent error; I've given up. Sorry it didn't work out.

        <nobody@example.ne.jp>:
        192.0.2.25 does not like recipient.
        Remote host said: 550 5.1.1 <nobody@example.ne.jp>... User Unknown
        Giving up on 192.0.2.25.

        --- Below this line is a copy of the message.
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("hard", "userunknown", "5.1.1")
    assert result.recipient == "nobody@example.ne.jp"


def test_qmail_mailbox_full_without_smtp_code() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.jp
        Subject: failure notice

        Hi. This is the qmail-send program at mx.example.jp.
        I'm afraid I wasn't able to deliver your message to the following addresses.

        <busy@example.jp>:
        Sorry, the user's mailfolder is full. (#4.2.2)
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "mailboxfull", "4.2.2")


def test_exchange_legacy_unknown_recipient_is_hard() -> None:
    data = mail(
        """
        From: postmaster@corp.example.com
        Subject: Undeliverable: Quarterly report
        Content-Type: text/plain

        Your message

          To:      boss@corp.example.com
          Subject: Quarterly report

        did not reach the following recipient(s):

        boss@corp.example.com on Mon, 1 Jan 2007 10:00:00 -0500
            The recipient name is not recognized
            MSEXCH:IMS:CORP:EXAMPLE:MAIL01 0 (000C05A6) Unknown Recipient
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason) == ("hard", "userunknown")
    assert result.recipient == "boss@corp.example.com"


def test_office365_dsn_with_resolver_code() -> None:
    data = mail(
        """
        From: postmaster@example.onmicrosoft.com
        Subject: Undeliverable: hello
        Content-Type: multipart/report; report-type=delivery-status; boundary="X"

        --X
        Content-Type: text/plain

        Delivery has failed to these recipients or groups:

        missing@contoso.example
        The email address you entered couldn't be found.

        --X
        Content-Type: message/delivery-status

        Reporting-MTA: dns;AM0PR01MB0001.eurprd01.prod.outlook.com

        Final-Recipient: rfc822;missing@contoso.example
        Action: failed
        Status: 5.1.10
        Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup
        --X--
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("hard", "userunknown", "5.1.10")
    assert result.recipient == "missing@contoso.example"


def test_gmail_text_bounce_with_state_code() -> None:
    data = mail(
        """
        From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
        Subject: Delivery Status Notification (Failure)

        Delivery to the following recipient failed permanently:

             friend@example.org

        Technical details of permanent failure:
        Google tried to deliver your message, but it was rejected by the recipient domain.
        The error that the other server returned was:
        550 550 5.1.1 <friend@example.org>... User Unknown (state 14).

        ----- Original message -----
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("hard", "userunknown", "5.1.1")
    assert result.recipient == "friend@example.org"


def test_delayed_dsn_is_soft_expired() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.net
        Subject: Delayed Mail (still being retried)
        Content-Type: multipart/report; report-type=delivery-status; boundary="D"

        --D
        Content-Type: message/delivery-status

        Final-Recipient: rfc822; slow@example.com
        Action: delayed
        Status: 4.4.1
        Diagnostic-Code: X-Postfix; connect to mx.example.com[192.0.2.2]:25: Connection timed out
        --D--
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "expired", "4.4.1")


def test_report_written_before_the_first_mime_boundary() -> None:
    data = mail(
        """
        From: postmaster@example.org
        Subject: WARNING: delayed mail.
        Content-Type: multipart/report; report-type=delivery-status; boundary="=_c0"

        This is a delivery status notification from mx.example.org,
        running the Courier mail server.

        <late@example.net>:
            mx.example.net [192.0.2.22]:
        >>> RCPT TO:<late@example.net>
        <<< 450 4.1.7 <me@example.org>: Sender address rejected: unverified address

        --=_c0
        Content-Type: message/delivery-status

        Final-Recipient: rfc822; late@example.net
        Action: delayed
        Status: 4.0.0
        --=_c0--
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "rejected", "4.1.7")
    assert result.command == "RCPT"


def test_provider_wording_settles_unknown_user_after_data() -> None:
    data = mail(
        """
        From: Mail Delivery Subsystem <MAILER-DAEMON@mx2.example.jp>
        Subject: Returned mail: see transcript for details
        Content-Type: multipart/report; report-type=delivery-status; boundary="S"

        --S

           ----- Transcript of session follows -----
        ... while talking to mta6.am0.yahoodns.net.:
        >>> DATA
        <<< 554 delivery error: dd This user doesn't have a yahoo.com account (gone@yahoo.com) [0]
        554 5.0.0 Service unavailable

        --S
        Content-Type: message/delivery-status

        Final-Recipient: RFC822; gone@yahoo.com
        Action: failed
        Status: 5.0.0
        Remote-MTA: DNS; mta6.am0.yahoodns.net
        Diagnostic-Code: SMTP; 554 delivery error: dd This user doesn't have a yahoo.com account
        --S--
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.recipient) == (
        "hard",
        "userunknown",
        "gone@yahoo.com",
    )


def test_qmail_unknown_host_is_hard_for_every_recipient() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@example.com
        Subject: failure notice

        Hi. This is the qmail-send program at example.com.
        I'm afraid I wasn't able to deliver your message to the following addresses.

        <alice@nohost.example>:
        Sorry, I couldn't find any host by that name.

        <bob@nohost.example>:
        Sorry, I couldn't find any host by that name.
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason) == ("hard", "hostunknown")
    assert result.recipients == ["alice@nohost.example", "bob@nohost.example"]


def test_exim_address_shown_without_domain_uses_x_failed_recipients() -> None:
    data = mail(
        """
        From: Mail Delivery System <Mailer-Daemon@mx.example.ru>
        Subject: Mail delivery failed: returning message to sender
        X-Failed-Recipients: kijitora@example.ed.jp

        A message that you sent could not be delivered to one or more of its
        recipients. This is a permanent error. The following address(es) failed:

          kijitora
            SMTP error from remote mail server after MAIL FROM:<me@example.ru> SIZE=1543:
            host mx.example.jp [192.0.2.20]: 550 5.7.0 Please use the smtp server of your ISP.
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "blocked", "5.7.0")
    assert result.recipient == "kijitora@example.ed.jp"


def test_amazon_ses_notification_json() -> None:
    body = json.dumps(
        {
            "notificationType": "Bounce",
            "bounce": {
                "bounceType": "Permanent",
                "bounceSubType": "General",
                "bouncedRecipients": [
                    {"emailAddress": "nobody@example.com", "action": "failed", "status": "5.1.1",
                     "diagnosticCode": "smtp; 550 5.1.1 user unknown"}
                ],
            },
        }
    )  # fmt: skip
    data = (
        "From: no-reply@sns.amazonaws.com\r\nSubject: AWS Notification Message\r\n\r\n" + body
    ).encode()
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("hard", "userunknown", "5.1.1")
    assert result.recipient == "nobody@example.com"


ARF_ABUSE = mail(
    """
    From: feedback@arf.example.net
    To: abuse@example.org
    Subject: Abuse report
    MIME-Version: 1.0
    Content-Type: multipart/report; report-type=feedback-report; boundary="F"

    --F
    Content-Type: text/plain

    This is an email abuse report.

    --F
    Content-Type: message/feedback-report

    Feedback-Type: abuse
    User-Agent: ExampleFBL/1.0
    Version: 1
    Original-Mail-From: <bounce@example.org>
    Original-Rcpt-To: <complainer@example.net>

    --F
    Content-Type: message/rfc822

    From: news@example.org
    To: complainer@example.net
    Subject: News
    Message-ID: <news-42@example.org>
    X-Campaign-ID: cmp-42

    hello
    --F--
    """
)


def test_arf_abuse_is_a_complaint_attributed_to_campaign() -> None:
    result = parse_bounce(ARF_ABUSE)
    assert (result.kind, result.reason, result.feedback_type) == ("complaint", "feedback", "abuse")
    assert result.recipient == "complainer@example.net"
    assert result.status is None
    assert (result.message_id, result.campaign) == ("news-42@example.org", "cmp-42")


def test_arf_opt_out_keeps_its_feedback_type() -> None:
    data = ARF_ABUSE.replace(b"Feedback-Type: abuse", b"Feedback-Type: opt-out")
    data = data.replace(b"Original-Rcpt-To: <complainer@example.net>\r\n", b"")
    result = parse_bounce(data)
    assert (result.kind, result.feedback_type) == ("complaint", "opt-out")
    assert result.recipient == "complainer@example.net"  # from the original message's To


def test_complaint_without_arf_part_hotmail_style() -> None:
    data = mail(
        """
        From: staff@hotmail.example
        Subject: complaint about message from 192.0.2.1
        Content-Type: multipart/mixed; boundary="H"

        --H
        Content-Type: message/rfc822

        X-HmXmrOriginalRecipient: reader@hotmail.example
        From: news@example.org
        To: reader@hotmail.example
        Subject: News

        body
        --H--
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.recipient) == ("complaint", "reader@hotmail.example")


def test_rfc3834_vacation_reply() -> None:
    data = mail(
        """
        From: Alice <alice@example.com>
        To: news@example.org
        Subject: Out of Office: News
        Auto-Submitted: auto-replied
        In-Reply-To: <news-42@example.org>

        I am out of the office until Monday.
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.recipient) == (
        "autoreply",
        "vacation",
        "alice@example.com",
    )


def test_vacation_reply_mentioning_delivery_words_stays_an_autoreply() -> None:
    data = mail(
        """
        From: Bob <bob@example.com>
        Subject: Automatic reply: News
        X-Autoreply: yes
        Return-Path: <>

        I am away until June. Mail that could not be delivered to my
        assistant carol@example.com will be answered on my return.
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.recipient) == ("autoreply", "bob@example.com")


def test_exim_bounce_marked_auto_replied_is_not_a_vacation() -> None:
    data = mail(
        """
        From: Mail Delivery System <Mailer-Daemon@mail.example.org>
        Subject: Mail delivery failed: returning message to sender
        Auto-Submitted: auto-replied

        A message that you sent could not be delivered to one or more of its
        recipients. This is a permanent error. The following address(es) failed:

          full@example.com
            SMTP error from remote mail server after RCPT TO:<full@example.com>:
            host mx.example.com [192.0.2.20]: 452 4.2.2 Mailbox full
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "mailboxfull", "4.2.2")


def test_ordinary_mail_is_unknown() -> None:
    data = mail(
        """
        From: friend@example.com
        To: me@example.org
        Subject: lunch?

        Shall we meet at noon? Write to bob@example.net too.
        """
    )
    assert parse_bounce(data).kind == "unknown"


def test_broken_mime_still_finds_the_dsn_fields() -> None:
    data = mail(
        """
        From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.net>
        Subject: Returned mail: Service unavailable
        Content-Type: multipart/report; report-type=delivery-status;
            boundary="this-boundary-never-appears"

        Reporting-MTA: dns; mx.example.net

        Final-Recipient: RFC822; <lost@example.net>
        Action: failed
        Status: 5.1.1
        Diagnostic-Code: smtp; 550 5.1.1 <lost@example.net>... User unknown
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.recipient, result.status) == ("hard", "lost@example.net", "5.1.1")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\xff" * 5000,
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" * 200,
        b"Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n%%%",
        b"Subject: =?bogus-charset?q?=ff=fe?=\r\nContent-Type: text/plain; charset=nope\r\n\r\n\xff",
        b"From: MAILER-DAEMON@x\r\n\r\n" + b"<a@b.example>: " * 50000,
    ],
    ids=["empty", "binary", "boundaries", "bad-base64", "bad-charset", "long-line"],
)
def test_malformed_input_is_unknown_or_parsed_never_raises(data: bytes) -> None:
    result = parse_bounce(data)
    assert result.kind in ("hard", "soft", "complaint", "autoreply", "unknown")


def test_undecodable_header_bytes_come_back_as_valid_text() -> None:
    data = (
        b"From: MAILER-DAEMON@mx.example\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
        b"<bad@example.com>: host mx said: 550 5.1.1 user unknown\r\n--b\r\n"
        b"Content-Type: message/rfc822\r\n\r\nMessage-ID: <\xff\xfe@x>\r\n"
        b"X-Campaign-ID: c\xff1\r\n\r\nbody\r\n--b--\r\n"
    )
    result = parse_bounce(data)
    assert result.kind == "hard"
    assert result.campaign is not None and result.campaign.startswith("c")
    json.dumps(vars(result), ensure_ascii=False).encode("utf-8")


def test_deeply_nested_multiparts_are_bounded() -> None:
    data = b"Content-Type: text/plain\r\n\r\nuser unknown\r\n"
    for level in range(3000):
        boundary = f"b{level}".encode()
        data = (
            b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--" + boundary
            + b"\r\n" + data + b"\r\n--" + boundary + b"--\r\n"
        )  # fmt: skip
    started = time.perf_counter()
    result = parse_bounce(data)
    assert result.kind == "unknown"
    assert time.perf_counter() - started < 10


def test_huge_input_is_truncated_and_still_classified() -> None:
    head = POSTFIX_DSN
    data = head + b"X" * (30 * 1024 * 1024)
    started = time.perf_counter()
    result = parse_bounce(data)
    assert result.reason == "userunknown"
    assert time.perf_counter() - started < 10


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_parse_bounce_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    result = parse_bounce(data)
    assert result.kind in ("hard", "soft", "complaint", "autoreply", "unknown")
    json.dumps(vars(result), ensure_ascii=False).encode("utf-8")  # valid text only


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=len(POSTFIX_DSN)))
def test_parse_bounce_never_raises_on_mangled_bounces(noise: bytes, cut: int) -> None:
    result = parse_bounce(POSTFIX_DSN[:cut] + noise + POSTFIX_DSN[cut:])
    assert result.kind in ("hard", "soft", "complaint", "autoreply", "unknown")


# --- classify_reply ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "expected"),
    [
        (
            550,
            "5.1.1",
            "<x@example.jp>: Recipient address rejected: User unknown",
            ("hard", "userunknown"),
        ),
        (550, None, "No such user here", ("hard", "userunknown")),
        (550, "5.1.2", "Host or domain name not found", ("hard", "hostunknown")),
        (452, "4.2.2", "Mailbox full", ("soft", "mailboxfull")),
        (450, "4.1.1", "User unknown", ("soft", "userunknown")),
        (
            554,
            "5.7.1",
            "Client host [192.0.2.1] blocked using zen.spamhaus.org",
            ("soft", "blocked"),
        ),
        (
            550,
            "5.7.26",
            "Unauthenticated email is not accepted due to domain's DMARC policy",
            ("soft", "authfailure"),
        ),
        (421, "4.7.0", "Too many connections from your host", ("soft", "toomanyconn")),
        (552, "5.3.4", "Message size exceeds fixed limit", ("soft", "mesgtoobig")),
        (554, None, "Message rejected as spam", ("soft", "spamdetected")),
        (550, "5.7.1", "Relay access denied", ("soft", "norelaying")),
        (556, "5.1.10", "Recipient address has null MX", ("hard", "notaccept")),
    ],
)
def test_classify_reply(
    code: int, enhanced: str | None, text: str, expected: tuple[str, str]
) -> None:
    assert classify_reply(code, enhanced, text) == expected


def test_classify_reply_after_data_user_unknown_is_a_filter() -> None:
    assert classify_reply(550, None, "User unknown", command="DATA") == ("soft", "filtered")


# --- VERP --------------------------------------------------------------------------------

SECRET = b"0123456789abcdef-test-secret"


def test_verp_round_trip_fits_local_part_limit() -> None:
    address = make_return_path(
        SECRET, "b", "bounce.example.org", "018F2A3B4C5DDEADBEEF", "Alice.Smith@Example.com"
    )
    local, domain = address.split("@")
    assert domain == "bounce.example.org" and local.startswith("b+")
    assert len(local) <= MAX_LOCAL_PART
    assert parse_return_path(SECRET, address) == ("018F2A3B4C5DDEADBEEF", "alice.smith@example.com")


def test_verp_survives_case_changes_by_remote_mtas() -> None:
    address = make_return_path(
        SECRET, "b", "bounce.example.org", "018F2A3B4C5DDEADBEEF", "bob@example.net"
    )
    assert parse_return_path(SECRET, address.upper()) == ("018F2A3B4C5DDEADBEEF", "bob@example.net")


def test_verp_refuses_forged_or_altered_tokens() -> None:
    address = make_return_path(
        SECRET, "b", "bounce.example.org", "018F2A3B4C5DDEADBEEF", "bob@example.net"
    )
    assert parse_return_path(b"another-secret", address) is None
    local, domain = address.split("@")
    flipped = local[:-1] + ("a" if local[-1] != "a" else "b")
    assert parse_return_path(SECRET, f"{flipped}@{domain}") is None
    tampered = local[:10] + ("a" if local[10] != "a" else "b") + local[11:]
    assert parse_return_path(SECRET, f"{tampered}@{domain}") is None
    assert parse_return_path(SECRET, "b+notatoken@bounce.example.org") is None
    assert parse_return_path(SECRET, "plain@bounce.example.org") is None


def test_verp_tokens_are_rfc4648_base32_of_the_packed_bytes() -> None:
    # Tokens in flight (bounces come back days later) must keep decoding: the encoding is
    # RFC 4648 base32, lower case, no padding; recipients a base-41 number with a leading 1.
    for length in range(0, 41):
        raw = bytes((i * 37 + length) % 256 for i in range(length))
        assert verp._b32(raw) == base64.b32encode(raw).decode().rstrip("=").lower()
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789.-_@+"
    for address in ("a", "ab", "bob@example.net", "x+tag@d0042.bench.test", "é@x", ""):
        form, packed = verp._pack_recipient(address)
        if address and set(address) <= set(alphabet):
            number = 1
            for char in address:
                number = number * len(alphabet) + alphabet.index(char)
            assert (form, int.from_bytes(packed, "big")) == (verp._RCPT_PACKED, number)
        else:
            assert (form, packed) == (verp._RCPT_UTF8, address.encode())


def test_verp_uses_the_full_token_whenever_it_fits() -> None:
    # the full token is chosen whenever it fits, to the character; else the index form
    named = set()
    for length in range(10, 40):
        rcpt = "r" * (length - 9) + "@ex.test"
        address = make_return_path(SECRET, "b", "x.test", "018F2A3B4C5DDEADBEEF", rcpt, 3)
        full = verp.encode_token(SECRET, "018F2A3B4C5DDEADBEEF", rcpt)
        expected = rcpt if len(full) <= MAX_LOCAL_PART - 2 else "#3"
        assert parse_return_path(SECRET, address)[1] == expected
        assert len(address.split("@")[0]) <= MAX_LOCAL_PART
        named.add(expected == rcpt)
    assert named == {True, False}  # the lengths tried cross the limit


def test_verp_long_recipient_falls_back_to_index_form() -> None:
    long_rcpt = "a.very.long.recipient.address.that.does.not.fit@subdomain.example.com"
    address = make_return_path(
        SECRET, "bounces", "b.example.org", "018F2A3B4C5DDEADBEEF", long_rcpt, 7
    )
    assert len(address.split("@")[0]) <= MAX_LOCAL_PART
    assert parse_return_path(SECRET, address) == ("018F2A3B4C5DDEADBEEF", "#7")
    token = decode_return_path(SECRET, address)
    assert token is not None and token.recipient_index == 7 and token.recipient is None


def test_verp_recipient_with_unusual_characters_round_trips() -> None:
    address = make_return_path(SECRET, "b", "b.example.org", "id-1", "o'brien!x@example.com")
    assert parse_return_path(SECRET, address) == ("id-1", "o'brien!x@example.com")


def test_bounce_names_the_verp_token_and_verified_recipient() -> None:
    return_path = make_return_path(
        SECRET, "b", "bounce.example.org", "018F2A3B4C5DDEADBEEF", "who@example.jp"
    )
    data = mail(
        f"""
        From: MAILER-DAEMON@mx.example.jp
        To: {return_path}
        Subject: failure notice

        Sorry, your message could not be delivered.
        The mailbox is over quota.
        """
    )
    plain = parse_bounce(data)
    assert plain.verp_token == return_path.split("@")[0].split("+", 1)[1]
    verified = parse_bounce(data, verp_secret=SECRET)
    assert verified.verp_message_id == "018F2A3B4C5DDEADBEEF"
    assert verified.recipient == "who@example.jp"
    assert verified.reason == "mailboxfull"


# --- command line ------------------------------------------------------------------------


def test_cli_prints_one_json_line_per_file_in_order(tmp_path: Path) -> None:
    first = tmp_path / "dsn.eml"
    first.write_bytes(POSTFIX_DSN)
    second = tmp_path / "arf.eml"
    second.write_bytes(ARF_ABUSE)
    missing = tmp_path / "missing.eml"
    run = subprocess.run(
        [sys.executable, "-m", "mta.bounce", str(first), str(missing), str(second)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert [line["file"] for line in lines] == [str(first), str(missing), str(second)]
    assert lines[0] == {"file": str(first), "kind": "hard", "reason": "userunknown",
                        "status": "5.1.1", "recipient": "nobody@example.jp"}  # fmt: skip
    assert lines[1]["kind"] == "unknown" and "error" in lines[1]
    assert lines[2]["kind"] == "complaint" and lines[2]["status"] is None


def test_cli_exit_code_zero_when_every_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "x.eml"
    path.write_bytes(b"garbage")
    run = subprocess.run(
        [sys.executable, "-m", "mta.bounce", str(path)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0
    assert json.loads(run.stdout)["kind"] == "unknown"
