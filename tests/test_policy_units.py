"""Policy guard logic without I/O: rates and thresholds, caps, tokens, List-Unsubscribe,
config checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import ConfigError, load_config
from mta.policy.headers import (
    HeaderInjection,
    Unsubscriber,
    header_fields,
    safe_value,
    set_list_unsubscribe,
)
from mta.policy.model import LEGACY_NO_GUARD, CampaignState, Counters
from mta.policy.rates import Thresholds, campaign_rates, find_breach, monthly_cap
from mta.policy.tokens import find_token, make_token, read_token

CONTRACT = Thresholds(hard_bounce_rate=8.0, complaint_rate=0.5, unsubscribe_rate=1.0,
                      min_volume=200)


def sent(delivered: int, hard: int = 0, soft: int = 0, **rest: int) -> Counters:
    return Counters(sent=delivered + hard + soft, delivered=delivered, hard=hard, soft=soft,
                    **rest)


# --- rates and thresholds ---------------------------------------------------------

def test_no_judgement_below_the_minimum_volume() -> None:
    assert find_breach(sent(100, hard=99), CONTRACT) is None
    assert find_breach(sent(180, hard=19), CONTRACT) is None  # 199 sent, 9.5 %
    breach = find_breach(sent(184, hard=16), CONTRACT)  # 200 sent, exactly 8 %
    assert breach is not None and breach.rule == "hard_bounce"
    assert breach.rate == pytest.approx(8.0) and breach.base == 200 and breach.count == 16


def test_hard_bounce_rate_is_at_or_above_its_threshold() -> None:
    assert find_breach(sent(185, hard=15), CONTRACT) is None  # 7.5 %
    assert find_breach(sent(184, hard=16), CONTRACT) is not None  # 8 %
    # Soft bounces count as sent mail but never as hard bounces.
    assert find_breach(sent(150, hard=15, soft=35), CONTRACT) is None


def test_complaint_and_unsubscribe_rates_are_strictly_above_over_delivered() -> None:
    assert find_breach(sent(1000, complaints=5), CONTRACT) is None  # 0.5 %: not above
    breach = find_breach(sent(1000, complaints=6), CONTRACT)
    assert breach is not None and breach.rule == "complaint"
    assert breach.base == 1000 and breach.rate == pytest.approx(0.6)
    assert find_breach(sent(1000, unsubscribes=10), CONTRACT) is None  # 1 %: not above
    breach = find_breach(sent(1000, unsubscribes=11), CONTRACT)
    assert breach is not None and breach.rule == "unsubscribe"
    # The denominator is delivered mail, not sent mail.
    breach = find_breach(sent(500, soft=500, complaints=3), CONTRACT)
    assert breach is not None and breach.rate == pytest.approx(0.6)


def test_configured_band_changes_the_hard_bounce_threshold() -> None:
    lenient = Thresholds(hard_bounce_rate=15.0, min_volume=200)
    assert find_breach(sent(180, hard=20), lenient) is None  # 10 %
    assert find_breach(sent(170, hard=30), lenient) is not None  # 15 %


def test_breach_describes_rate_and_threshold() -> None:
    breach = find_breach(sent(180, hard=20), CONTRACT)
    assert breach is not None
    assert breach.describe() == ("hard bounce rate 10% (20 of 200 sent) reached the "
                                 "threshold of 8%")
    rates = campaign_rates(sent(1000, complaints=6, unsubscribes=11))
    assert rates["complaint"] == pytest.approx(0.6) and rates["unsubscribe"] == pytest.approx(1.1)


def test_rates_after_a_resume_count_from_the_baseline() -> None:
    total = sent(900, hard=100)
    base = sent(180, hard=20)
    assert find_breach(total, CONTRACT) is not None
    fresh = total.minus(base)
    assert fresh.sent == 800 and fresh.hard == 80
    assert find_breach(sent(190, hard=10).minus(sent(10)), CONTRACT) is None


def test_a_resume_of_an_older_version_shows_as_no_guard_with_a_reason() -> None:
    old = CampaignState.from_dict({"status": "active", "checks": False, "by": "cli:op"})
    assert not old.guarded and old.no_guard == LEGACY_NO_GUARD
    assert CampaignState.from_dict({"status": "active", "checks": True}).guarded
    assert "checks" not in CampaignState().as_dict()


def test_monthly_cap_is_109_times_the_level_and_level_0_has_none() -> None:
    assert monthly_cap(10, 109) == 1090
    assert monthly_cap(1, 109) == 109
    assert monthly_cap(0, 109) is None


# --- tokens -----------------------------------------------------------------------------

SECRET = b"k" * 32


def test_token_round_trip_and_forgeries() -> None:
    token = make_token(SECRET, "shop", "spring", "Bob@Example.org")
    target = read_token(SECRET, token)
    assert target is not None
    assert (target.account, target.campaign, target.recipient) == (
        "shop", "spring", "bob@example.org")
    payload, mac = token.split(".")
    assert read_token(b"other-secret", token) is None
    assert read_token(SECRET, payload + "." + mac[:-1] + ("A" if mac[-1] != "A" else "B")) is None
    other = make_token(SECRET, "shop", "spring", "eve@example.org")
    assert read_token(SECRET, other.split(".")[0] + "." + mac) is None  # swapped payload
    for junk in ("", "x", "a.b", token + "x", "../" + token, token.replace(".", "")):
        assert read_token(SECRET, junk) is None


def test_token_is_found_in_a_mail_subject() -> None:
    token = make_token(SECRET, "shop", "spring", "bob@example.org")
    assert find_token(f"Re: unsubscribe {token}") == token
    assert find_token("unsubscribe me please") is None


# --- List-Unsubscribe -----------------------------------------------------------------------

MESSAGE = (b"Received: from x\r\n\tby y; Mon, 1 Jan 2024 10:00:00 +0000\r\n"
           b"From: news@shop.test\r\nList-Unsubscribe: <mailto:theirs@shop.test>,\r\n"
           b" <https://shop.test/u>\r\nSubject: hi\r\nlist-unsubscribe-post: List-Unsubscribe=One-Click\r\n"
           b"\r\nList-Unsubscribe: in the body stays\r\n")


def test_list_unsubscribe_replaces_the_message_own_fields() -> None:
    unsub = Unsubscriber(SECRET, "https://mta.example/", "/unsubscribe/", "unsubscribe",
                         "bounces.mta.example")
    out = unsub.apply(MESSAGE, "shop", "spring", "bob@example.org")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.lower().count(b"list-unsubscribe:") == 1
    assert head.lower().count(b"list-unsubscribe-post:") == 1
    assert b"theirs@shop.test" not in head and b"Subject: hi" in head
    assert body == b"List-Unsubscribe: in the body stays\r\n"
    token = make_token(SECRET, "shop", "spring", "bob@example.org")
    assert (f"List-Unsubscribe: <https://mta.example/unsubscribe/{token}>,\r\n"
            f" <mailto:unsubscribe@bounces.mta.example?subject=unsubscribe%20{token}>\r\n"
            ).encode() in head
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in head
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))


def test_header_injection_is_refused() -> None:
    for bad in ("https://x.test/\r\nBcc: victim@x.test", "a\nb", "nul\0byte"):
        with pytest.raises(HeaderInjection):
            safe_value(bad)
        with pytest.raises(HeaderInjection):
            header_fields(bad, "mailto:a@b")
    with pytest.raises(HeaderInjection):
        Unsubscriber(SECRET, "https://x.test", "/u/", "unsub", "b.test\r\nX-Evil: 1")
    # Input from messages never reaches the header raw: it is inside the signed token.
    unsub = Unsubscriber(SECRET, "https://x.test", "/u/", "unsub", "b.test")
    fields = unsub.fields("shop", "spring\r\nBcc: victim@x.test", "a@b.test\r\nX: y")
    assert fields.count(b"\r\n") == 3 and b"Bcc" not in fields and b"X: y" not in fields


def test_set_list_unsubscribe_on_a_message_without_body() -> None:
    out = set_list_unsubscribe(b"From: a@b\r\n", b"List-Unsubscribe: <x>\r\n")
    assert out == b"List-Unsubscribe: <x>\r\nFrom: a@b\r\n"


# --- configuration ------------------------------------------------------------------------------

def write(tmp: Path, text: str) -> Path:
    path = tmp / "mta.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("value", [7.9, 15.5, 0.08])
def test_hard_bounce_threshold_outside_the_band_is_a_one_line_error(tmp_path: Path,
                                                                     value: float) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"[policy]\nhard_bounce_rate = {value}\n"))
    assert "hard_bounce_rate" in str(err.value) and "8-15" in str(err.value)
    assert "\n" not in str(err.value)


def test_policy_config_defaults_and_checks(tmp_path: Path) -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "mta.toml")
    assert (cfg.policy.hard_bounce_rate, cfg.policy.complaint_rate, cfg.policy.unsubscribe_rate,
            cfg.policy.min_volume, cfg.policy.trial_limit, cfg.policy.monthly_cap_factor,
            cfg.policy.retention_days) == (8.0, 0.5, 1.0, 200, 100, 109, 92.0)
    assert load_config(write(tmp_path, "[policy]\nhard_bounce_rate = 12\n")
                       ).policy.hard_bounce_rate == 12.0
    for bad in ("cache_ttl = 2.0", "unsubscribe_mailbox = \"a b\"", "min_volume = 0",
                "unsubscribe_path = \"nope\""):
        with pytest.raises(ConfigError):
            load_config(write(tmp_path, f"[policy]\n{bad}\n"))
    with pytest.raises(ConfigError, match="plan"):
        load_config(write(tmp_path, '[[accounts]]\nname = "a"\nplan = "gold"\n'))
