"""The injection API without sockets: the request's checks, the templates and their
sandbox, each recipient's message, the MIME writer against the standard library's
EmailMessage, API keys; and a request through a real Intake on a real spool."""

from __future__ import annotations

import asyncio
import base64
import json
from email import message_from_bytes
from email import policy as email_policy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.config import AccountConfig, Config, EngineConfig, SpoolConfig
from mta.inject.auth import ApiKeys, api_key_hash, new_api_key, parse_authorization
from mta.inject.build import Settings, build_each, make_builder
from mta.inject.mime import Attachment, Mailbox, Parts, compose, reference_bytes
from mta.inject.request import BadRequest, Limits, Recipient, parse_request
from mta.inject.server import make_injector
from mta.inject.service import Outcome
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool
from mta.smtp.intake import Intake
from mta.smtp.session import Client

A = {"email": "a@b.test", "substitutions": {"code": "C"}}
LIMITS = Limits(max_recipients=100, max_message_size=100_000)
SETTINGS = Settings("X-Campaign-ID", "mta.test", 100_000, 1_000_000)


def request(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "envelope_sender": "bounce@shop.test",
        "campaign": "spring",
        "recipients": [{"email": "ann@dest.test", "name": "Ann",
                        "substitutions": {"code": "A1"}},
                       {"email": "bob@dest.test", "substitutions": {"code": "B2",
                                                                    "shop": "Bob's"}}],
        "substitutions": {"shop": "Shop"},
        "content": {"from": {"email": "news@shop.test", "name": "{{ shop }}"},
                    "subject": "Hello {{ name }}", "text_body": "Your code: {{ code }}\n",
                    "html_body": "<p>{{ code }}</p>\n", "headers": {"X-Extra": "1"}},
    }
    for key, value in changes.items():
        if key.startswith("content_"):
            body["content"][key.removeprefix("content_")] = value
        else:
            body[key] = value
    return body


def parsed(body: dict[str, Any] | bytes) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, LIMITS)


def messages(body: dict[str, Any]) -> list[bytes]:
    req = parsed(body)
    ids = iter(f"ID{i}" for i in range(10_000))
    built = list(build_each(make_builder(req, SETTINGS, lambda: next(ids)), req.recipients,
                            SETTINGS))
    assert all(isinstance(b.data, bytes) for b in built)
    return [b.data for b in built]  # type: ignore[misc]


def refused(body: dict[str, Any] | bytes) -> BadRequest:
    with pytest.raises(BadRequest) as err:
        req = parsed(body)
        list(build_each(make_builder(req, SETTINGS), req.recipients, SETTINGS))
    return err.value


# --- the request -----------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "named"), [
    (b"{", 400, "not valid JSON"),
    (b"[1]", 400, "the request body: must be an object"),
    (request(recipients=None), 400, "recipients: missing"),
    (request(recipients=[]), 400, "recipients: give at least one"),
    (request(recipients=[{"name": "x"}]), 400, "recipients[0].email: missing"),
    (request(recipients=[{"email": 5}]), 400, "recipients[0].email: must be a string"),
    (request(recipients=[{"email": "a@b.test", "cc": 1}]), 400, "recipients[0].cc: unknown"),
    (request(envelope_sender=None), 400, "envelope_sender: missing"),
    (request(envelope_sender="not an address"), 400, "envelope_sender: 553 5.1.3"),
    (request(content=None), 400, "content: missing"),
    (request(content_from=None), 400, "content.from: missing"),
    (request(content_text_body=None, content_html_body=None), 400, "content: give"),
    (request(content_headers={"Subject": "x"}), 400, "content.headers.Subject"),
    (request(content_headers={"Bad Name": "x"}), 400, "not a header field name"),
    (request(content_attachments=[{"content_type": "x", "data": ""}]), 400,
     "content.attachments[0].content_type"),
    (request(content_attachments=[{"content_type": "a/b", "data": "!!", "base64": True}]),
     400, "content.attachments[0].data: not valid base64"),
    (request(campaign="two\nlines"), 400, "campaign:"),
    (request(recipients=[{"email": "a@b.test", "name": "A\r\nBcc: x@y"}]), 400,
     "recipients[0].name: holds CR, LF or NUL"),
    (request(recipients=[{"email": f"u{i}@d.test"} for i in range(101)]), 413,
     "at most 100 per request"),
    (request(content_attachments=[{"content_type": "a/b", "data": "x" * 100_001}]), 413,
     "more than a message may have"),
])
def test_bad_requests_are_refused_naming_the_field(body: Any, status: int, named: str) -> None:
    problem = refused(body)
    assert problem.status == status
    assert named in problem.message


def test_a_valid_request_reads_as_given() -> None:
    req = parsed(request())
    assert str(req.envelope_sender) == "bounce@shop.test" and req.campaign == "spring"
    assert req.recipients[0] == Recipient("ann@dest.test", "Ann", {"code": "A1"})
    assert req.content.headers == (("X-Extra", "1"),)


# --- templates ----------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "named"), [
    ({"content_text_body": "line 1\nline 2 {{ code \n"}, "content.text_body, line 2: syntax"),
    ({"content_html_body": "<p>\n\n{{ missing }}</p>"}, "content.html_body, line 3: undefined"),
    ({"content_subject": "{{ ''.__class__ }}"}, "content.subject, line 1: refused by the sandbox"),
    ({"content_subject": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}, "sandbox"),
    ({"content_text_body": "{{ 'x' * 100000000 }}"}, "content.text_body, line 1: refused"),
    ({"content_text_body": "{{ 'x'.center(10**9) }}"}, "content.text_body, line 1: refused"),
    ({"content_text_body": "{{ 'x'|indent(10**9) }}"}, "content.text_body, line 1: refused"),
    ({"content_text_body": "{{ '%999999999s' % 'x' }}"}, "content.text_body, line 1: refused"),
    ({"content_text_body": "{{ '{:>999999999}'.format('x') }}"}, "refused by the sandbox"),
    ({"content_text_body": "{% for i in range(100000) %}{{ 'x' * 999999 }}{% endfor %}"},
     "the text would be longer than"),
    ({"content_text_body": "{{ 1 / 0 }}"}, "ZeroDivisionError"),
    ({"content_headers": {"X-Code": "{{ code }}"},
      "recipients": [{"email": "a@b.test", "substitutions": {"code": "1\r\nBcc: evil@x.test"}}]},
     "content.headers.X-Code: the rendered value holds CR, LF or NUL"),
    ({"content_subject": "{{ code }}",
      "recipients": [{"email": "a@b.test", "substitutions": {"code": "x\nTo: evil@x.test"}}]},
     "content.subject: the rendered value holds CR"),
    ({"content": "Subject: {{ code }}\n\nbody",
      "recipients": [{"email": "a@b.test", "substitutions": {"code": "x\r\nBcc: e@x.test"}}]},
     "content, header Subject: the rendered value holds CR"),
    ({"content": "From: a@b.test\nSubject: hi\n\nline 4\n{{ nope }}"}, "content, line 5: undefined"),
    ({"content_text_body": "nul \u0000 here"}, "holds a NUL character"),
])
def test_template_problems_are_422_naming_template_and_line(changes: dict[str, Any],
                                                            named: str) -> None:
    problem = refused(request(**changes))
    assert problem.status == 422
    assert named in problem.message


def test_each_recipient_gets_its_own_substitutions() -> None:
    ann, bob = (message_from_bytes(m, policy=email_policy.SMTP) for m in messages(request()))
    assert ann["To"] == "Ann <ann@dest.test>" and ann["Subject"] == "Hello Ann"
    assert ann["From"] == "Shop <news@shop.test>"  # the request's substitutions
    assert ann.get_body(("plain",)).get_content() == "Your code: A1\r\n"
    assert bob["To"] == "bob@dest.test" and bob["Subject"] == "Hello "  # name is defined
    assert bob["From"] == "Bob's <news@shop.test>"  # its own substitutions win
    assert bob.get_body(("html",)).get_content() == "<p>B2</p>\r\n"
    assert ann["X-Campaign-ID"] == "spring" and ann["X-Extra"] == "1"
    assert ann["Message-ID"] == "<ID0@mta.test>" and bob["Message-ID"] == "<ID1@mta.test>"


def test_a_template_naming_no_recipient_value_is_rendered_once() -> None:
    req = parsed(request(recipients=[A, A]))
    builder = make_builder(req, SETTINGS)
    assert builder.from_name.shared and not builder.subject.shared  # type: ignore[attr-defined]
    own_shop = parsed(request(recipients=[A, {"email": "b@b.test", "substitutions": {
        "shop": "Other", "code": "D"}}]))
    assert not make_builder(own_shop, SETTINGS).from_name.shared  # type: ignore[attr-defined]
    ann, bob = messages(request(recipients=[A, {"email": "b@b.test", "substitutions": {
        "shop": "Other", "code": "D"}}]))
    assert b"From: Shop <news@shop.test>" in ann and b"From: Other <news@shop.test>" in bob


def test_name_and_email_win_over_substitutions_and_html_is_escaped() -> None:
    body = request(substitutions={"name": "global", "email": "global", "shop": "Shop"},
                   content_html_body="<p>{{ name }} {{ email }} {{ code }}</p>",
                   recipients=[{"email": "a@b.test", "name": "<Al>",
                                "substitutions": {"code": "<b>"}}])
    [data] = messages(body)
    assert b"<p>&lt;Al&gt; a@b.test &lt;b&gt;</p>" in data


def test_lines_are_crlf_and_messages_identical_but_for_per_message_headers() -> None:
    one = messages(request(recipients=[A] * 2))
    assert all(b"\n" not in m.replace(b"\r\n", b"") for m in one)
    strip = [b"\r\n".join(x for x in m.split(b"\r\n") if not x.startswith(b"Message-ID"))
             for m in one]
    assert strip[0] == strip[1]


def test_given_date_and_message_id_are_kept() -> None:
    [data] = messages(request(recipients=[A],
                              content_headers={"Message-ID": "<{{ code }}.1@app.test>",
                                               "Date": "Mon, 1 Jan 2024 00:00:00 +0000"}))
    assert data.count(b"\r\nMessage-ID:") == 1 and data.count(b"\r\nDate:") == 1
    assert b"\r\nMessage-ID: <C.1@app.test>\r\n" in data
    assert b"\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n" in data  # as given


def test_an_address_smtp_or_a_header_refuses_fails_that_recipient_only() -> None:
    req = parsed(request(recipients=[{"email": "jörg@b.test"}, {"email": "a@@b"}, A]))
    first, second, third = build_each(make_builder(req, SETTINGS), req.recipients, SETTINGS)
    assert isinstance(first.data, str) and first.data.startswith("553 5.6.7")
    assert second.data == "553 5.1.3 Bad domain in address"  # as SMTP's RCPT TO says
    assert isinstance(third.data, bytes) and str(third.address) == "a@b.test"


def test_size_limits_are_413() -> None:
    req = parsed(request(content_text_body="x" * 60 + "\n" + "{{ code }}" * 1))
    small = Settings("X-Campaign-ID", "mta.test", 100, 1_000_000)
    with pytest.raises(BadRequest) as err:
        list(build_each(make_builder(req, small), req.recipients, small))
    assert err.value.status == 413 and "[smtp] max_message_size" in err.value.message
    total = Settings("X-Campaign-ID", "mta.test", 100_000, 1000)
    with pytest.raises(BadRequest) as err:
        list(build_each(make_builder(req, total), req.recipients, total))
    assert err.value.status == 413 and "[inject] max_total_size" in err.value.message


def test_a_raw_message_keeps_its_fields_and_renders_them() -> None:
    raw = ("From: Shop <news@shop.test>\nSubject: Hi {{ name }}\nX-Long: a\n b\n\n"
           "Dear {{ name }},\nyour code is {{ code }}.\n")
    [data] = messages(request(content=raw, recipients=[
        {"email": "a@b.test", "name": "Ann", "substitutions": {"code": "A1"}}]))
    assert data == (b"X-Campaign-ID: spring\r\nFrom: Shop <news@shop.test>\r\n"
                    b"Subject: Hi Ann\r\nX-Long: a\r\n b\r\n\r\n"
                    b"Dear Ann,\r\nyour code is A1.\r\n")


def test_a_raw_message_that_does_not_start_with_fields_is_400() -> None:
    problem = refused(request(content="just text\n\nbody"))
    assert problem.status == 400 and "content, line 1: not a header field" in problem.message


# --- MIME: the same bytes as EmailMessage ------------------------------------------------

TRACE = (("Date", "Sun, 06 Dec 2026 03:47:15 +0000"), ("Message-ID", "<0123ABC@mta.test>"))
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
_header_text = _text.filter(lambda s: not any(c in s for c in "\r\n\0"))
_names = st.one_of(st.just(""), st.from_regex(r"[A-Za-z][A-Za-z .'-]{0,40}", fullmatch=True),
                   _header_text)
_emails = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,20}@[a-z0-9-]{1,20}(\.[a-z]{2,5}){1,2}",
                        fullmatch=True).filter(lambda e: ".." not in e and "._" not in e
                                               and not e.split("@")[0].endswith("."))
_bodies = st.one_of(st.none(), _text, st.text(max_size=3000, alphabet="ab é\n<>=.\t"),
                    st.text(alphabet="abc ", min_size=70, max_size=400))
_attachments = st.lists(st.builds(Attachment.make, st.sampled_from(["", "a.pdf", "résumé.txt"]),
                                  st.sampled_from(["application/pdf", "text/plain"]),
                                  st.binary(max_size=200)), max_size=2)


@settings(max_examples=300, deadline=None)
@given(sender=st.builds(Mailbox, _emails, _names), to=st.builds(Mailbox, _emails, _names),
       subject=st.one_of(st.none(), _header_text),
       headers=st.lists(st.tuples(st.sampled_from(["X-Extra", "Reply-To", "Comments",
                                                   "X-Campaign-ID"]), _header_text),
                        max_size=3),
       text=_bodies, html=_bodies, attachments=_attachments)
def test_compose_writes_what_email_message_writes(sender: Mailbox, to: Mailbox,
                                                  subject: str | None,
                                                  headers: list[tuple[str, str]],
                                                  text: str | None, html: str | None,
                                                  attachments: list[Attachment]) -> None:
    parts = Parts(sender, to, subject, tuple(headers), text, html, tuple(attachments))
    try:
        expected = reference_bytes(parts, TRACE)
    except (ValueError, TypeError, IndexError):  # EmailMessage itself cannot write it
        return
    assert compose(parts, TRACE) == expected


def test_the_same_parts_make_the_same_bytes_and_boundaries_are_not_in_parts() -> None:
    parts = Parts(Mailbox("a@b.test"), Mailbox("c@d.test"), "s", (), "text", "<p>html</p>",
                  (Attachment.make("a.pdf", "application/pdf", b"%PDF"),))
    one, two = compose(parts, TRACE), compose(parts, TRACE)
    assert one == two
    msg = message_from_bytes(one, policy=email_policy.SMTP)
    assert [p.get_content_type() for p in msg.walk()] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html",
        "application/pdf"]
    assert not msg.defects and all(not p.defects for p in msg.walk())


# --- authentication --------------------------------------------------------------------------


def test_authorization_headers() -> None:
    basic = "Basic " + base64.b64encode(b"shop:pass:word").decode()
    assert parse_authorization(basic).user == "shop"
    assert parse_authorization(basic).secret == b"pass:word"
    assert parse_authorization("Bearer mta_abc").secret == b"mta_abc"
    for bad in (None, "", "Basic !!", "Basic " + base64.b64encode(b"nocolon").decode(),
                "Digest x", "Bearer "):
        assert parse_authorization(bad) is None


def test_api_keys_name_their_account_and_nothing_else() -> None:
    key, other = new_api_key(), new_api_key()
    keys = ApiKeys([AccountConfig("shop", api_key_hashes=[api_key_hash(key)]),
                    AccountConfig("blog")])
    assert keys.account(key.encode()) == "shop"
    assert keys.account(key.encode(), "shop") == "shop"
    assert keys.account(key.encode(), "blog") is None  # a key of another account
    assert keys.account(other.encode()) is None
    assert keys.account(b"admin-token") is None
    assert api_key_hash(key) != api_key_hash(other) and key.startswith("mta_")


# --- the service, on a real spool, without sockets --------------------------------------------


async def _inject(tmp_path: Path, body: dict[str, Any], map_size: int = 1 << 26
                  ) -> tuple[Outcome, int, int]:
    """(outcome, commits, messages in the spool) of one request through a real Intake."""
    cfg = Config(spool=SpoolConfig(path=str(tmp_path / "spool"), min_free_disk=0),
                 engine=EngineConfig(event_log=str(tmp_path / "events.jsonl")),
                 accounts=[AccountConfig("shop")])
    spool = Spool(cfg.spool.path, map_size)
    committer = GroupCommitter(spool)
    committer.start()
    try:
        intake = Intake(cfg, spool, committer, emit=lambda event: None)
        before = committer.commits
        outcome = await make_injector(cfg, intake).inject(
            Client("127.0.0.1", login="shop"), json.dumps(body).encode())
        with spool.read() as txn:
            return outcome, committer.commits - before, len(list(spool.messages(txn)))
    finally:
        await committer.close()
        spool.close()


def test_a_request_is_one_spool_transaction(tmp_path: Path) -> None:
    rcpts = [{"email": f"u{i}@dest.test", "substitutions": {"code": str(i)}} for i in range(600)]
    outcome, commits, stored = asyncio.run(_inject(tmp_path, request(recipients=rcpts)))
    assert (outcome.status, len(outcome.stored), commits, stored) == (200, 600, 1, 600)


def test_no_room_in_the_spool_is_503_and_stores_nothing(tmp_path: Path) -> None:
    rcpts = [{"email": f"u{i}@dest.test", "substitutions": {"code": "x" * 5000}}
             for i in range(100)]
    outcome, _, stored = asyncio.run(_inject(tmp_path, request(recipients=rcpts), 1 << 19))
    assert (outcome.status, stored) == (503, 0)
    assert outcome.as_json()["fail_count"] == 100
    assert set(outcome.errors) == {"452 4.3.1 Insufficient system storage, try again later"}
