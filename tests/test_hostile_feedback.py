"""Feedback from outsiders acts only for the account it proves it belongs to (issue 24).

The inbound handler's events go into a real policy guard on a real LMDB spool: forged
bounces and complaints change nothing and are recorded as unverified, a token binds
exactly one recipient, a replayed report counts once, unsubscribe tokens are per
recipient, a hostile campaign name can never stop the counting of others, and what
outsiders wrote is escaped wherever it is shown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.bounce import parse_bounce
from mta.bounce.provenance import Proof, parse_networks, provenance
from mta.bounce.verp import make_return_path
from mta.cli import SafeOutput
from mta.config import BounceConfig
from mta.delivery.dsn import original_headers
from mta.delivery.inbound import InboundHandler, with_cfbl
from mta.policy.ledger import Submission
from mta.policy.model import month_of
from mta.policy.notice import pause_notice
from mta.policy.rates import Breach
from mta.policy.tokens import read_token
from mta.policy.unsubscribes import InvalidUnsubscribe
from mta.queue.spool import NewMessage
from mta.text import hidden, name_problem, shown
from tests.helpers.reports import arf as abuse_report
from tests.helpers.reports import dsn
from tests.test_policy_guard import Env, guard_env

SECRET = b"verp-secret-for-tests"
EXAMPLES = 300
BOUNCE_DOMAIN = "bounces.mta.test"


def arf(recipients: list[str], quoted_headers: str = "") -> bytes:
    return abuse_report(f"fbl@{BOUNCE_DOMAIN}", recipients, quoted_headers)


class Inbound:
    """The inbound handler of a guard's spool, its events fed to the guard."""

    def __init__(self, env: Env, sources: list[str] | None = None) -> None:
        self.env = env
        cfg = env.cfg
        cfg.bounce = BounceConfig(domain=BOUNCE_DOMAIN, feedback_sources=sources or [],
                                  unparsed_dir=str(env.tmp / "unparsed"))

        async def complete(item: Any, results: Any) -> None:
            return None

        self.handler = InboundHandler(cfg, env.spool, self.emit, complete, SECRET)

    def emit(self, event: dict[str, Any]) -> None:
        self.env.events.append(event)
        self.env.guard.on_event(event)

    def sent(self, recipients: list[str], campaign: str = "spring") -> NewMessage:
        """A campaign message of account shop, as intake stores it (then delivered)."""
        return self.env.store(recipients, campaign=campaign)

    def report(self, data: bytes, to: str, client: str = "127.0.0.3") -> None:
        message = {"id": f"R{time.monotonic_ns()}", "from": "", "data": data,
                   "client": client}
        self.handler.process_report(to, message)


def verp(message_id: str, recipient: str) -> str:
    return make_return_path(SECRET, "b", BOUNCE_DOMAIN, message_id, recipient)


# --- provenance, without sockets ---------------------------------------------------------

def test_a_report_without_a_token_proves_nothing() -> None:
    result = parse_bounce(dsn(f"b@{BOUNCE_DOMAIN}", ["victim@dest.test"]), SECRET)
    assert result.kind == "hard" and result.recipients == ["victim@dest.test"]
    assert provenance(result, f"b@{BOUNCE_DOMAIN}", SECRET, "127.0.0.3", []) is None


def test_a_token_binds_its_recipient_and_the_report_cannot_widen_it() -> None:
    to = verp("00000000000A11223344", "real@dest.test")
    result = parse_bounce(dsn(to, ["real@dest.test", "victim1@dest.test", "victim2@dest.test"]),
                          SECRET)
    proof = provenance(result, to, SECRET, "127.0.0.3", [])
    assert proof is not None and proof.proof == Proof.ENVELOPE
    assert (proof.message_id, proof.recipients) == ("00000000000A11223344", ["real@dest.test"])


def test_complaints_prove_by_quoted_return_path_cfbl_or_a_configured_source() -> None:
    token_path = verp("00000000000A11223344", "bob@dest.test")
    quoted = arf(["eve@dest.test"], f"Return-Path: <{token_path}>\n")
    proof = provenance(parse_bounce(quoted, SECRET), f"fbl@{BOUNCE_DOMAIN}", SECRET, "", [])
    assert proof is not None and proof.recipients == ["bob@dest.test"]
    signed = with_cfbl(b"From: a@shop.test\r\n\r\nhi\r\n", f"fbl@{BOUNCE_DOMAIN}",
                       token_path.split("@")[0].split("+", 1)[1])
    head = signed.split(b"\r\n\r\n")[0].decode().replace("\r\n", "\n") + "\n"
    by_cfbl = provenance(parse_bounce(arf(["eve@dest.test"], head), SECRET),
                         f"fbl@{BOUNCE_DOMAIN}", SECRET, "", [])
    assert by_cfbl is not None and by_cfbl.recipients == ["bob@dest.test"]
    plain = parse_bounce(arf(["eve@dest.test"]), SECRET)
    sources = parse_networks(["192.0.2.0/24"])
    assert provenance(plain, f"fbl@{BOUNCE_DOMAIN}", SECRET, "127.0.0.3", sources) is None
    trusted = provenance(plain, f"fbl@{BOUNCE_DOMAIN}", SECRET, "192.0.2.7", sources)
    assert trusted is not None and trusted.proof == Proof.SOURCE
    assert trusted.recipients == ["eve@dest.test"]
    # A bounce from that network still needs a token: the source vouches for complaints.
    bounce = parse_bounce(dsn(f"b@{BOUNCE_DOMAIN}", ["x@dest.test"]), SECRET)
    assert provenance(bounce, f"b@{BOUNCE_DOMAIN}", SECRET, "192.0.2.7", sources) is None


def test_an_index_token_names_the_recipient_the_spool_remembers() -> None:
    long_rcpt = "a.very.long.local.part.for.a.recipient@a-long-destination.example"
    to = make_return_path(SECRET, "b", BOUNCE_DOMAIN, "00000000000A11223344", long_rcpt, 1)
    result = parse_bounce(dsn(to, [long_rcpt]), SECRET)
    proof = provenance(result, to, SECRET, "", [], ["first@dest.test", long_rcpt])
    assert proof is not None and proof.recipients == [long_rcpt]


# --- through the guard ---------------------------------------------------------------------

@pytest.mark.asyncio
async def test_forged_reports_change_nothing_and_are_shown_as_unverified(tmp_path: Path) -> None:
    async with guard_env(tmp_path, min_volume=10) as env:
        inbound = Inbound(env)
        env.deliveries(10)
        for _ in range(3):
            inbound.report(dsn(f"b@{BOUNCE_DOMAIN}", [f"v{i}@dest.test" for i in range(5)]),
                           f"b@{BOUNCE_DOMAIN}")
            inbound.report(arf([f"w{i}@dest.test" for i in range(5)]), f"fbl@{BOUNCE_DOMAIN}")
        await env.guard.flush()
        assert env.counters()["hard"] == 0 and env.counters()["complaints"] == 0
        assert not env.of_type("CampaignPaused")
        assert env.guard.check_rcpt("shop", "v0@dest.test") is None
        assert env.guard.check_rcpt("shop", "w0@dest.test") is None
        unverified = env.of_type("UnverifiedFeedback")
        assert len(unverified) == 6 and {u["kind"] for u in unverified} == {"hard", "complaint"}


@pytest.mark.asyncio
async def test_a_real_token_counts_once_for_its_recipient_only(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        inbound = Inbound(env)
        message = inbound.sent(["real@dest.test"])
        to = verp(message.id, "real@dest.test")
        for _ in range(3):  # the same report again, and again with other recipients named
            inbound.report(dsn(to, ["real@dest.test", "victim@dest.test"]), to)
        await env.guard.flush()
        assert env.counters()["hard"] == 1
        assert env.guard.check_rcpt("shop", "real@dest.test") is not None
        assert env.guard.check_rcpt("shop", "victim@dest.test") is None
        bounces = env.of_type("Bounce")
        assert {b["recipient"] for b in bounces} == {"real@dest.test"}
        assert {b["proof"] for b in bounces} == {"verp"}


@pytest.mark.asyncio
async def test_a_configured_feedback_loop_counts_its_complaints(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        inbound = Inbound(env, sources=["192.0.2.0/24"])
        env.deliveries(1)  # the campaign is known: a report naming it finds its account
        await env.guard.flush()
        inbound.report(arf(["eve@dest.test"]), f"fbl@{BOUNCE_DOMAIN}", client="192.0.2.9")
        await env.guard.flush()
        assert env.counters()["complaints"] == 1
        assert env.guard.check_rcpt("shop", "eve@dest.test") is not None


@pytest.mark.asyncio
async def test_unsubscribe_tokens_name_one_recipient(tmp_path: Path) -> None:
    async with guard_env(tmp_path) as env:
        g = env.guard
        # A token made the old way, for "everyone" of a message: refused.
        payload = msgpack.packb([1, "shop", "spring", ""], use_bin_type=True)
        secret = await g.committer.submit(g.store.ensure_secret)
        mac = hmac.new(secret, b"unsub1" + payload, hashlib.sha256).digest()[:16]

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        shared = f"{b64(payload)}.{b64(mac)}"
        assert read_token(secret, shared) is None
        with pytest.raises(InvalidUnsubscribe):
            await g.unsubscribe(shared)
        token = g.token_for("shop", "spring", "bob@dest.test")
        results = [await g.unsubscribe(token) for _ in range(6)]  # replayed
        assert [r.counted for r in results] == [True] + [False] * 5
        assert env.counters()["unsubscribes"] == 1


@pytest.mark.asyncio
async def test_a_notice_that_cannot_be_made_never_stops_the_counting(tmp_path: Path) -> None:
    async with guard_env(tmp_path, min_volume=10) as env:
        g = env.guard

        def broken(account: str, campaign: str, breach: Breach, replies: Any
                   ) -> NewMessage | None:
            if campaign.startswith("bad"):
                raise ValueError("no notice for this one")
            return None

        g.ledger.make_notice = broken
        env.deliveries(10, campaign="bad\u2028name")
        env.hard_bounces(10, campaign="bad\u2028name")
        env.deliveries(10, campaign="autumn")
        env.hard_bounces(2, campaign="autumn")  # 16.7 %
        await g.flush()
        paused = {p["campaign"] for p in env.of_type("CampaignPaused")}
        assert paused == {"bad\u2028name", "autumn"}
        assert env.counters(campaign="autumn")["hard"] == 2


@pytest.mark.asyncio
async def test_an_entry_that_cannot_be_written_is_dropped_alone(tmp_path: Path) -> None:
    async with guard_env(tmp_path, min_volume=10) as env:
        g = env.guard
        env.deliveries(10, campaign="autumn")
        env.hard_bounces(2, campaign="autumn")
        # A submission whose month cannot be encoded: one poisoned entry in the batch.
        g.counting.pending.submissions.append(Submission("shop", "x", 1, "\ud800"))
        g.counting.pending.submissions.append(Submission("shop", "y", 1, month_of(time.time())))
        await g.flush()
        assert env.counters(campaign="autumn")["hard"] == 2
        assert [p["campaign"] for p in env.of_type("CampaignPaused")] == ["autumn"]
        assert g.metrics()["count_failures"] == 1 and not g.counting.pending


# --- names and text from outside ------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "a\nb", "a\rb", "a\x0bb", "a\x0cb", "a\x85b", "a\u2028b", "a\u2029b", "a\x1b[31mb",
    "a\u202eb", "=?utf-8?q?Reply-To=3A_x?=", "x" * 129, "", " padded "])
def test_one_definition_refuses_names_that_could_act(name: str) -> None:
    assert name_problem(name) is not None


@pytest.mark.parametrize("name", ["spring-2026", "Frühling 2026", "summer/sale #3", "x" * 128])
def test_ordinary_names_pass(name: str) -> None:
    assert name_problem(name) is None


def test_a_hostile_name_in_a_notice_stays_in_its_subject() -> None:
    breach = Breach("hard_bounce", 10.0, 8.0, 20, 200)
    for name in ("x\u2028Reply-To: evil@x.test", "=?utf-8?q?x=0D=0AReply-To=3A_e=40x?=",
                 "x\r\n\r\nbody of the attacker", "\x1b]0;title\x07"):
        notice = pause_notice("ops@shop.test", "postmaster@mta.test", "mta.test", "shop",
                              name, breach, 0.0)
        head = notice.data.split(b"\r\n\r\n")[0]
        names = [line.split(b":")[0].lower() for line in head.split(b"\r\n")
                 if line and line[:1] not in b" \t"]
        assert b"reply-to" not in names and len(names) == len(set(names))
        assert b"body of the attacker\r\n" not in head and b"\x1b" not in notice.data


def test_terminal_output_escapes_what_outsiders_wrote() -> None:
    out = io.StringIO()
    print("spring\x1b[2J\u2028x\tcolumn", file=SafeOutput(out))
    assert out.getvalue() == "spring\\x1b[2J\\u2028x\tcolumn\n"
    assert shown(shown("\x1b=?q?")) == shown("\x1b=?q?") == "\\x1b=\\?q?"


def test_a_dsn_quotes_only_the_original_s_header_fields() -> None:
    body = b"Subject: hi\r\nX-A: 1\r\n continued\r\n\r\nsecret body\r\n"
    assert original_headers(body) == b"Subject: hi\r\nX-A: 1\r\n continued\r\n"
    no_blank_line = b"Subject: hi\r\nnot a field, the body\r\nmore body\r\n"
    assert original_headers(no_blank_line) == b"Subject: hi\r\n"


# --- properties ---------------------------------------------------------------------------

@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text())
def test_shown_text_can_never_act_on_a_display(text: str) -> None:
    out = shown(text)
    assert not any(hidden(c) for c in out)
    assert "=?" not in out and shown(out) == out
    assert shown(text, ascii_only=True).isascii()


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(max_size=200))
def test_an_accepted_name_is_shown_as_itself(name: str) -> None:
    if name_problem(name) is None:
        assert shown(name) == name and 0 < len(name) <= 128


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.emails(), max_size=5), st.emails(), st.booleans())
def test_a_report_counts_for_its_token_s_recipient_or_for_nobody(
        named: list[str], bound: str, with_token: bool) -> None:
    to = verp("00000000000A11223344", bound) if with_token else f"b@{BOUNCE_DOMAIN}"
    result = parse_bounce(dsn(to, named or ["x@dest.test"]), SECRET)
    proof = provenance(result, to, SECRET, "127.0.0.3", [])
    if with_token:
        assert proof is not None and proof.recipients == [bound.lower()]
    else:
        assert proof is None
