"""The footer: MIME-aware, both text parts, every transfer encoding, and DKIM signatures
made after it verify (dkimpy)."""

from __future__ import annotations

import email
from email.message import EmailMessage
from email.policy import SMTP, default
from pathlib import Path

from mta.config import DkimConfig
from mta.dkim import DkimSigner
from mta.policy.footer import UnsubscribeLink, add_footer
from mta.policy.headers import Unsubscriber
from tests.helpers.dkim import dkimpy_results, write_key

FOOTER = "Email Marketing by Example"


def newsletter(cte: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <news@example.com>"
    msg["To"] = "carol@example.net"
    msg["Subject"] = "Spring sale"
    msg["Message-ID"] = "<spring@example.com>"
    msg.set_content("Hello Carol,\nour spring sale starts today.\n", cte=cte)
    msg.add_alternative("<html><body><p>Hello Carol,</p><p>our <b>spring sale</b>"
                        " starts today.</p></body></html>\n", subtype="html", cte=cte)
    msg.add_attachment(b"%PDF-1.4 not text\n" * 20, maintype="application", subtype="pdf",
                       filename="catalogue.pdf")
    msg.add_attachment("a,b\n1,2\n", subtype="csv", filename="prices.csv")
    return msg.as_bytes(policy=SMTP)


def parts(data: bytes) -> dict[str, str]:
    parsed = email.message_from_bytes(data, policy=default)
    found: dict[str, str] = {}
    for part in parsed.walk():
        if part.is_multipart():
            continue
        key = part.get_filename() or part.get_content_type()
        content = part.get_content()
        text = content if isinstance(content, str) else content.decode("latin-1")
        found[key] = text.replace("\r\n", "\n")
    return found


def test_footer_in_text_and_html_parts_only() -> None:
    original = newsletter()
    out = add_footer(original, FOOTER)
    got = parts(out)
    assert got["text/plain"].rstrip().endswith(FOOTER)
    assert got["text/plain"].startswith("Hello Carol,\nour spring sale starts today.\n")
    html = got["text/html"]
    assert FOOTER in html and html.index(FOOTER) < html.index("</body>")
    assert FOOTER not in got["prices.csv"] and FOOTER not in got["catalogue.pdf"]
    assert got["catalogue.pdf"] == parts(original)["catalogue.pdf"]
    parsed = email.message_from_bytes(out, policy=default)
    assert not parsed.defects and parsed.get_content_type() == "multipart/mixed"
    assert out.split(b"\r\n\r\n")[0] == original.split(b"\r\n\r\n")[0]  # headers kept


def test_quoted_printable_and_base64_parts_are_re_encoded() -> None:
    for cte in ("quoted-printable", "base64"):
        out = add_footer(newsletter(cte), "Email Marketing by Ünïcode ✓")
        parsed = email.message_from_bytes(out, policy=default)
        texts = [p for p in parsed.walk() if p.get_content_maintype() == "text"
                 and not p.get_filename()]
        assert len(texts) == 2
        for part in texts:
            assert part["Content-Transfer-Encoding"] == cte
            assert "Email Marketing by Ünïcode ✓" in part.get_content()
            assert "spring" in part.get_content()
        raw_body = out.split(b"\r\n\r\n", 1)[1]
        assert "Ünïcode".encode() not in raw_body  # encoded, never raw 8-bit
        assert all(len(line) <= 78 for line in out.split(b"\r\n"))


def test_plain_message_and_non_ascii_footer_becomes_mime() -> None:
    plain = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: x\r\n\r\nhello\r\n"
    ascii_out = add_footer(plain, FOOTER)
    assert ascii_out == plain + b"\r\n" + FOOTER.encode() + b"\r\n"
    out = add_footer(plain, "Envoyé par Éxample")
    parsed = email.message_from_bytes(out, policy=default)
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_content_charset() == "utf-8"
    assert parsed.get_content().rstrip().endswith("Envoyé par Éxample")


def test_attached_message_and_undecodable_parts_are_left_alone() -> None:
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner text\n")
    outer = EmailMessage()
    outer["From"] = "a@example.com"
    outer.set_content("outer text\n")
    outer.add_attachment(inner)
    out = add_footer(outer.as_bytes(policy=SMTP), FOOTER)
    assert out.count(FOOTER.encode()) == 1
    assert "inner text" in out.decode() and FOOTER not in out.decode().split("inner text")[1]
    bad = (b"From: a@example.com\r\nContent-Type: text/plain; charset=x-unknown-charset\r\n"
           b"\r\nhello\r\n")
    assert add_footer(bad, FOOTER) == bad


def test_dkim_signature_made_after_footer_and_list_unsubscribe_verifies(tmp_path: Path) -> None:
    key = write_key(tmp_path, "example.com", "s1")
    signer = DkimSigner.from_config(DkimConfig(keys=[key.config]))
    unsub = Unsubscriber(b"s" * 32, "https://mta.example.com", "/unsubscribe/", "unsubscribe",
                         "bounces.example.com")
    for cte in (None, "quoted-printable", "base64"):
        data = unsub.apply(add_footer(newsletter(cte), "Email Marketing by Ünï"), "shop",
                           "spring", "carol@example.net")
        signed = signer.sign(data)
        assert dkimpy_results(signed, [key.record]) == {("example.com", "s1"): "pass"}
        signature = signed.split(b"\r\n\r\n")[0].split(b"DKIM-Signature:")[1]
        assert b"list-unsubscribe" in signature.lower()  # RFC 8058: the fields are signed
        tampered = signed.replace(b"Email Marketing by", b"Email Marketing from")
        if tampered != signed:
            assert dkimpy_results(tampered, [key.record]) != {("example.com", "s1"): "pass"}


def test_single_text_part_gets_the_footer_appended_as_it_is() -> None:
    head = (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
    out = add_footer(head + "Grüße\r\n".encode(), "Envoyé par Éxample")
    assert out == head + "Grüße\r\n\r\nEnvoyé par Éxample\r\n".encode()
    no_newline = add_footer(b"From: a@example.com\r\n\r\nhello", FOOTER)
    assert no_newline == b"From: a@example.com\r\n\r\nhello\r\n\r\n" + FOOTER.encode() + b"\r\n"
    latin = (b"From: a@example.com\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n")
    out = add_footer(latin, "Envoyé par Éxample")  # charset kept: the footer is re-encoded
    assert email.message_from_bytes(out, policy=default).get_content().replace(
        "\r\n", "\n") == "café\n\nEnvoyé par Éxample\n"


URL = "https://mta.example.com/unsubscribe/abc.def"


def test_visible_unsubscribe_link_in_both_parts_every_encoding() -> None:
    link = UnsubscribeLink(URL)
    for cte in (None, "quoted-printable", "base64"):
        original = newsletter(cte)
        out = add_footer(original, FOOTER, "", link)
        got = parts(out)
        assert got["text/plain"].rstrip().endswith(f"{FOOTER}\nUnsubscribe: {URL}")
        html = got["text/html"]
        assert f'<a href="{URL}">Unsubscribe</a>' in html
        assert html.index(FOOTER) < html.index(URL) < html.index("</body>")
        assert URL not in got["prices.csv"]
        assert got["catalogue.pdf"] == parts(original)["catalogue.pdf"]
        ctes = [p.get("Content-Transfer-Encoding") for p in
                email.message_from_bytes(out, policy=default).walk()]
        assert ctes == [p.get("Content-Transfer-Encoding") for p in
                        email.message_from_bytes(original, policy=default).walk()]
    # PRO: no branding, the link all the same.
    got = parts(add_footer(newsletter(), "", "", link))
    assert FOOTER not in got["text/plain"] and got["text/plain"].rstrip().endswith(URL)
    assert FOOTER not in got["text/html"] and f'href="{URL}"' in got["text/html"]


def test_placeholder_takes_the_link_where_the_customer_put_it() -> None:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg.set_content("Hi\nStop: {{unsubscribe_url}}\n", cte="quoted-printable")
    msg.add_alternative('<html><body><p>Hi</p><a href="{{unsubscribe_url}}">stop</a>'
                        "</body></html>\n", subtype="html")
    out = add_footer(msg.as_bytes(policy=SMTP), "", "", UnsubscribeLink(URL + "&x"))
    got = parts(out)
    assert "{{unsubscribe_url}}" not in out.decode()
    assert got["text/plain"] == f"Hi\nStop: {URL}&x\n"  # placed, so not appended again
    assert got["text/html"].count("mta.example.com") == 1
    assert f'<a href="{URL}&amp;x">stop</a>' in got["text/html"]  # HTML-escaped
    # Only the HTML part holds it: the text part still gets the link appended.
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg.set_content("Hi\n")
    msg.add_alternative('<p><a href="[[u]]">stop</a></p>', subtype="html")
    got = parts(add_footer(msg.as_bytes(policy=SMTP), "", "",
                           UnsubscribeLink(URL, placeholder="[[u]]", label="Leave")))
    assert got["text/plain"] == f"Hi\n\nLeave: {URL}\n"
    assert got["text/html"].count(URL) == 1
    # The fast path (one plain 7bit part): in place, or appended.
    plain = b"From: a@example.com\r\n\r\nbye {{unsubscribe_url}}\r\n"
    assert add_footer(plain, "", "", UnsubscribeLink(URL)).endswith(f"bye {URL}\r\n".encode())
    assert add_footer(b"From: a@example.com\r\n\r\nbye\r\n", FOOTER, "",
                      UnsubscribeLink(URL)).endswith(
        f"bye\r\n\r\n{FOOTER}\r\nUnsubscribe: {URL}\r\n".encode())


def test_fast_path_matches_the_email_package_and_declines_the_unusual() -> None:
    from mta.policy import footer
    from mta.policy.mimeparts import change_text_parts

    link = UnsubscribeLink(URL)
    for cte in (None, "quoted-printable", "base64"):
        original = newsletter(cte)
        fast = add_footer(original, "Email Marketing by Ünï", "", link)
        assert change_text_parts(original, lambda *_: None) is original  # simple MIME
        message = footer.parse(original)  # the email package's answer, forced
        for part, body in footer.text_bodies(message):
            first = True  # one text and one HTML part
            change = (footer.plain_change(body, "Email Marketing by Ünï", link, first)
                      if part.get_content_type() == "text/plain" else
                      footer.html_change(body, footer.html_footer("Email Marketing by Ünï"),
                                         link, first))
            footer.replace_body(part, change)
        slow = footer.serialize(message)
        assert {k: v.replace("\n\n\n", "\n\n") for k, v in parts(fast).items()} == {
            k: v.replace("\n\n\n", "\n\n") for k, v in parts(slow).items()}
        assert email.message_from_bytes(fast, policy=default).defects == []
    unusual = [
        b"From: a@x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nhi\r\n",
        b"From: a@x\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uue\r\n\r\nhi\r\n",
        b"From: a@x\r\nContent-Type: text/plain; charset=x-unknown\r\n\r\nhi\r\n",
        b"From: a@x\r\nContent-Type: multipart/mixed\r\n\r\n--b\r\n\r\nhi\r\n--b--\r\n",
    ]
    for data in unusual:
        assert change_text_parts(data, lambda leaf, text, n: text + "x") is None


def test_a_repeated_content_field_is_read_as_the_email_package_reads_it() -> None:
    """The first of two Content-Type fields counts: a single text part that claims to be
    text/plain first gets the footer appended, one that claims text/html first does not
    take the text/plain fast path."""
    body = b"hello\r\n"
    plain_first = (b"From: a@x\r\nContent-Type: text/plain; charset=us-ascii\r\n"
                   b"Content-Type: text/html\r\n\r\n" + body)
    assert add_footer(plain_first, "Sent by us").endswith(b"hello\r\n\r\nSent by us\r\n")
    html_first = (b"From: a@x\r\nContent-Type: text/html\r\n"
                  b"Content-Type: text/plain\r\n\r\n" + body)
    changed = add_footer(html_first, "Sent by us")
    assert b"<p " in changed and b"\r\n\r\nSent by us\r\n" not in changed
