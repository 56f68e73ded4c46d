"""The reason taxonomy, its tie-breaking and status inference, rule by rule.

The wordings are the field's documented ones (RFC 3463/5321 texts, the MTAs' own sources
and the providers' published error pages), written here for each rule; none is taken
from a collection of real bounces.
"""

from __future__ import annotations

import json

import pytest

from mta.bounce import classify_reply, parse_bounce
from mta.bounce.model import REASONS, Delivery
from mta.bounce.phrases import book, families, providers
from mta.bounce.reason import decide, inferred_status, kind_of
from mta.bounce.status import STATUS_REASONS, is_status


def mail(text: str) -> bytes:
    lines = text.strip("\n").splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\r\n".join(line[indent:] for line in lines).encode() + b"\r\n"


def reason_of(diagnosis: str, status: str = "", command: str = "") -> str:
    return decide(Delivery(diagnosis=diagnosis, status=status, command=command)).reason


# --- the tables ---------------------------------------------------------------------------


def test_every_table_reason_is_in_the_taxonomy() -> None:
    table = book()
    assert set(table.reasons) <= REASONS
    assert set(table.first) | set(table.second) <= set(table.reasons)
    assert set(STATUS_REASONS.values()) <= REASONS


def test_inferred_codes_are_codes_of_the_right_class() -> None:
    for reason in book().reasons.values():
        permanent, temporary = reason.status
        assert not permanent or (is_status(permanent) and permanent.startswith("5.")), reason.name
        assert not temporary or (is_status(temporary) and temporary.startswith("4.")), reason.name


def test_every_phrase_is_attributed_to_a_writer() -> None:
    for reason in book().reasons.values():
        for _, said in reason.phrases.plain + reason.phrases.aligned:
            assert said.writer, (reason.name, said.phrase)


def test_sender_and_receiver_tables_name_reasons_of_the_taxonomy() -> None:
    for voice in (*families(), *providers()):
        named = {s.writer for _, s in voice.said.plain + voice.said.aligned}
        named |= {reason for _, reason in voice.codes}
        assert named <= REASONS, voice.name


@pytest.mark.parametrize(
    ("reason", "status", "reply", "kind"),
    [
        ("userunknown", "5.1.1", "550", "hard"),
        ("hostunknown", "5.1.2", "550", "hard"),
        ("hasmoved", "5.1.6", "551", "hard"),
        ("notaccept", "5.3.2", "521", "hard"),
        ("notaccept", "4.3.2", "421", "soft"),
        ("mailboxfull", "5.2.2", "552", "soft"),
        ("filtered", "5.2.0", "550", "soft"),
        ("blocked", "5.7.1", "554", "soft"),
        ("spamdetected", "5.7.1", "550", "soft"),
        ("suspend", "5.2.1", "550", "soft"),
        ("expired", "4.4.7", "", "soft"),
        ("feedback", "", "", "complaint"),
        ("vacation", "", "", "autoreply"),
    ],
)
def test_hard_is_only_for_a_bad_address(reason: str, status: str, reply: str, kind: str) -> None:
    assert kind_of(reason, status, reply, "") == kind


# --- words first --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("diagnosis", "status", "command", "expected"),
    [
        # RFC 3463 / RFC 5321 texts
        ("550 5.1.1 Bad destination mailbox address", "5.1.1", "RCPT", "userunknown"),
        ("552 5.2.2 Mailbox full", "5.2.2", "", "mailboxfull"),
        ("554 5.3.4 Message too big for system", "5.3.4", "DATA", "mesgtoobig"),
        ("551 User not local; please try <new@example.org>", "", "RCPT", "hasmoved"),
        ("521 5.3.2 System not accepting network messages", "5.3.2", "", "notaccept"),
        # Postfix
        ("550 5.1.1 <a@example.jp>: Recipient address rejected: User unknown in local "
         "recipient table", "5.1.1", "RCPT", "userunknown"),
        ("554 5.7.1 <a@example.jp>: Relay access denied", "5.7.1", "RCPT", "norelaying"),
        ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using "
         "zen.spamhaus.org", "5.7.1", "RCPT", "blocked"),
        ("Host or domain name not found. Name service error for name=example.invalid "
         "type=A: Host not found", "5.4.4", "", "hostunknown"),
        # Sendmail
        ("550 5.1.1 <a@example.jp>... User unknown", "5.1.1", "RCPT", "userunknown"),
        ("553 5.1.8 <s@example.org>... Domain of sender address s@example.org does not exist",
         "5.1.8", "MAIL", "rejected"),
        # Exim
        ("Unrouteable address", "", "", "hostunknown"),
        ("550 No Such User Here", "", "RCPT", "userunknown"),
        # qmail
        ("Sorry, no mailbox here by that name. (#5.1.1)", "5.1.1", "", "userunknown"),
        ("Sorry, I couldn't find any host named nohost.example. (#5.1.2)", "5.1.2", "", "hostunknown"),
        ("Sorry, the user's mailfolder is full. (#4.2.2)", "4.2.2", "", "mailboxfull"),
        # Exchange / Office 365
        ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
         "5.1.10", "", "userunknown"),
        ("554 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain", "5.4.4", "", "hostunknown"),
        # Gmail
        ("550-5.1.1 The email account that you tried to reach does not exist.", "5.1.1", "DATA",
         "userunknown"),
        ("550-5.2.1 The email account that you tried to reach is disabled.", "5.2.1", "", "suspend"),
        ("452-4.2.2 The email account that you tried to reach is over quota.", "4.2.2", "RCPT",
         "mailboxfull"),
        ("550-5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail "
         "requires all senders to authenticate with either SPF or DKIM.", "5.7.26", "DATA",
         "authfailure"),
        # Lotus Domino: its directory settles it whatever the SMTP stage
        ("User some.name (a@example.jp) not listed in Domino Directory", "", "", "userunknown"),
        # local delivery
        ("procmail: Quota exceeded while writing \"/var/mail/a\"", "", "", "mailboxfull"),
    ],
)  # fmt: skip
def test_documented_wordings(diagnosis: str, status: str, command: str, expected: str) -> None:
    assert reason_of(diagnosis, status, command) == expected


def test_user_unknown_at_rcpt_is_a_bad_address() -> None:
    assert reason_of("550 unknown user", command="RCPT") == "userunknown"


def test_user_unknown_after_data_is_a_filter() -> None:
    decision = decide(Delivery(diagnosis="550 unknown user", command="DATA"))
    assert (decision.reason, decision.rule) == ("filtered", "'user unknown' after DATA")


def test_user_unknown_with_no_command_and_no_code_is_a_filter() -> None:
    assert reason_of("550 unknown user") == "filtered"


def test_a_user_unknown_code_settles_it_even_after_data() -> None:
    assert reason_of("550 5.1.1 unknown user", "5.1.1", "DATA") == "userunknown"


# --- the code breaks ties, it does not outweigh clear words ---------------------------------


@pytest.mark.parametrize(
    ("diagnosis", "expected"),
    [
        ("550 5.1.1 <a@example.jp>... Mailbox full", "mailboxfull"),
        ("550 5.1.1 Message rejected as spam by Content Filtering", "spamdetected"),
        ("550 5.1.1 Service unavailable; client host blocked using bl.spamcop.net", "blocked"),
        ("550 5.1.1 Message filtered. Please see the FAQs section on spam", "filtered"),
        ("550 5.1.1 Email not accepted for policy reasons", "policyviolation"),
        ("550 5.1.1 Account has been suspended", "suspend"),
    ],
)
def test_clear_words_outweigh_a_user_unknown_code(diagnosis: str, expected: str) -> None:
    assert reason_of(diagnosis, "5.1.1", "RCPT") == expected


def test_clear_words_outweigh_a_host_unknown_code() -> None:
    text = "550 5.1.2 Client host [192.0.2.1] blocked using zen.spamhaus.org"
    assert reason_of(text, "5.1.2", "RCPT") == "blocked"
    assert reason_of("550 5.1.2 Host unknown", "5.1.2") == "hostunknown"


def test_the_code_breaks_a_tie_between_words() -> None:
    text = "550 5.1.1 <a@example.jp>: Recipient address rejected: User unknown (spam check)"
    decision = decide(Delivery(diagnosis=text, status="5.1.1", command="RCPT"))
    assert (decision.reason, decision.rule) == ("userunknown", "status code and words agree")


def test_the_code_decides_when_the_words_say_nothing() -> None:
    decision = decide(Delivery(diagnosis="550 5.1.1 see https://example.org/why", status="5.1.1"))
    assert (decision.reason, decision.rule, decision.evidence) == (
        "userunknown",
        "status code",
        "5.1.1",
    )


def test_every_decision_names_its_rule_and_evidence() -> None:
    decision = decide(Delivery(diagnosis="552 5.2.2 Mailbox full", status="5.2.2"))
    assert decision.rule and decision.evidence


# --- status inference -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "temporary", "expected"),
    [
        ("userunknown", False, "5.1.1"),
        ("hostunknown", False, "5.1.2"),
        ("hostunknown", True, "5.1.2"),
        ("mailboxfull", False, "5.2.2"),
        ("mailboxfull", True, "4.2.2"),
        ("filtered", False, "5.2.0"),
        ("expired", True, "4.4.7"),
        ("onhold", False, "5.0.0"),
        ("onhold", True, "4.0.0"),
    ],
)
def test_inferred_status(reason: str, temporary: bool, expected: str) -> None:
    assert inferred_status(reason, temporary) == expected


def test_a_bounce_without_any_code_gets_the_reasons_code() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.jp
        Subject: failure notice

        Hi. This is the qmail-send program at mx.example.jp.
        I'm afraid I wasn't able to deliver your message to the following addresses.

        <gone@example.jp>:
        Sorry, no mailbox here by that name.
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("hard", "userunknown", "5.1.1")


def test_a_temporary_failure_without_code_gets_a_4xx() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.jp
        Subject: Warning: could not send message for past 4 hours

        This is a warning message only. Delivery attempts will continue.

        <slow@example.com>:
            Deferred: Connection timed out with mx.example.com.
        """
    )
    result = parse_bounce(data)
    assert result.kind == "soft"
    assert result.status is not None and result.status.startswith("4.")


def test_a_specific_code_in_the_prose_beats_a_generic_dsn_status() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.net
        Subject: Undelivered Mail Returned to Sender
        Content-Type: multipart/report; report-type=delivery-status; boundary="B"

        --B
        Content-Type: text/plain

        <box@example.jp>: host mx.example.jp[192.0.2.1] said: 552 5.2.2 <box@example.jp>:
            Mailbox quota exceeded (in reply to RCPT TO command)

        --B
        Content-Type: message/delivery-status

        Final-Recipient: rfc822; box@example.jp
        Action: failed
        Status: 5.0.0
        Diagnostic-Code: smtp; 552 Requested mail action aborted
        --B--
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "mailboxfull", "5.2.2")


def test_the_stated_code_is_never_replaced_by_an_inferred_one() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.net
        Subject: Undelivered Mail Returned to Sender
        Content-Type: multipart/report; report-type=delivery-status; boundary="B"

        --B
        Content-Type: message/delivery-status

        Final-Recipient: rfc822; a@example.jp
        Action: failed
        Status: 5.1.3
        Diagnostic-Code: smtp; 501 5.1.3 Bad recipient address syntax
        --B--
        """
    )
    assert parse_bounce(data).status == "5.1.3"


# --- what a report family or a provider means by its own words -----------------------------


def test_a_provider_reply_after_data_can_still_name_a_bad_address() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.org
        Subject: Undelivered Mail Returned to Sender

        This is the mail system at host mx.example.org.

        <gone@yahoo.com>: host mta7.am0.yahoodns.net[192.0.2.7] said: 554 delivery error:
            dd This user doesn't have a yahoo.com account (gone@yahoo.com) [0]
            (in reply to end of DATA command)
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.recipient) == (
        "hard",
        "userunknown",
        "gone@yahoo.com",
    )


def test_a_carriers_filter_code_reads_as_filtered() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mx.example.org
        Subject: Returned mail: see transcript for details
        Content-Type: multipart/report; report-type=delivery-status; boundary="S"

        --S
        Content-Type: message/delivery-status

        Final-Recipient: RFC822; someone@docomo.ne.jp
        Action: failed
        Status: 5.2.0
        Remote-MTA: DNS; mfsmax.docomo.ne.jp
        Diagnostic-Code: SMTP; 550 Unknown user someone@docomo.ne.jp
        --S--
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason) == ("soft", "filtered")


def test_office365_codes_are_read_in_its_own_reports() -> None:
    data = mail(
        """
        From: postmaster@contoso.onmicrosoft.com
        Subject: Undeliverable: hello
        X-MS-Exchange-Message-Is-Ndr:
        Content-Type: multipart/report; report-type=delivery-status; boundary="X"

        --X
        Content-Type: message/delivery-status

        Final-Recipient: rfc822;someone@example.com
        Action: failed
        Status: 5.7.509
        Diagnostic-Code: smtp;550 5.7.509 Access denied, sending domain example.org does not
         pass DMARC verification and has a DMARC policy of reject.
        --X--
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("soft", "authfailure", "5.7.509")


def test_a_local_delivery_agents_quota_error_is_mailbox_full() -> None:
    data = mail(
        """
        From: MAILER-DAEMON@mail.example.org
        Subject: Undelivered Mail Returned to Sender

        This is the mail system at host mail.example.org.

        <full@example.org>: Command died with status 75: "/usr/bin/maildrop".
            Command output: maildrop: maildir over quota.
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason) == ("soft", "mailboxfull")


def test_gmail_help_keys_speak_for_themselves() -> None:
    text = "550 5.7.1 ... https://support.google.com/mail/?p=UnsolicitedMessageError abc - gsmtp"
    data = mail(
        f"""
        From: MAILER-DAEMON@mx.example.org
        Subject: Undelivered Mail Returned to Sender

        <reader@example.net>: host mx.example.net[192.0.2.9] said: {text}
            (in reply to end of DATA command)
        """
    )
    assert parse_bounce(data).reason == "spamdetected"


def test_ses_notification_inside_an_sns_envelope() -> None:
    # Amazon SES bounce notifications reach e-mail through SNS: the SES object is the
    # envelope's "Message" string (the mailbox simulator's bounce@ address answers 5.1.1).
    notification = {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": "Permanent",
            "bounceSubType": "General",
            "bouncedRecipients": [
                {"emailAddress": "bounce@simulator.amazonses.com", "action": "failed",
                 "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user unknown"}
            ],
        },
        "mail": {"source": "sender@example.org", "destination": ["bounce@simulator.amazonses.com"]},
    }  # fmt: skip
    envelope = {"Type": "Notification", "Message": json.dumps(notification)}
    data = (
        "From: AWS Notifications <no-reply@sns.amazonaws.com>\r\n"
        "Subject: AWS Notification Message\r\n\r\n" + json.dumps(envelope, indent=2) + "\r\n"
    ).encode()
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.status) == ("hard", "userunknown", "5.1.1")
    assert result.recipient == "bounce@simulator.amazonses.com"


def test_a_session_transcript_names_the_refused_command() -> None:
    # MDaemon / Kerio write "--> RCPT To:<...>" and "<-- 550 ..." lines
    data = mail(
        """
        From: MDaemon@mail.example.com
        Subject: Permanent Delivery Failure

        The attached message had PERMANENT fatal delivery errors!

         --- Session Transcript ---
         Mon 2024-01-01 10:00:01: --> RCPT To:<gone@example.org>
         Mon 2024-01-01 10:00:01: <-- 550 <gone@example.org>... User unknown
         --- End Transcript ---
        """
    )
    result = parse_bounce(data)
    assert (result.kind, result.reason, result.command) == ("hard", "userunknown", "RCPT")


# --- live SMTP replies share the taxonomy ---------------------------------------------------


def test_classify_reply_reads_words_before_the_code() -> None:
    assert classify_reply(550, "5.1.1", "Mailbox full") == ("soft", "mailboxfull")
    assert classify_reply(550, "5.1.1", "Recipient address rejected: User unknown") == (
        "hard",
        "userunknown",
    )
    assert classify_reply(550, None, "Requested action not taken: mailbox unavailable") == (
        "hard",
        "userunknown",
    )
