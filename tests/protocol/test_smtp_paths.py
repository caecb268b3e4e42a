"""SMTP envelope syntax: paths, ESMTP parameters, xtext and the DSN/SIZE/BODY/AUTH values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.protocol.smtp_paths import (
    MAIL_PARAMETERS,
    MAX_DOMAIN,
    NULL_PATH,
    RCPT_PARAMETERS,
    AddressError,
    ParameterError,
    Parameters,
    Path,
    UnsupportedParameter,
    parse_auth_param,
    parse_body,
    parse_envid,
    parse_esmtp_parameters,
    parse_forward_path,
    parse_notify,
    parse_orcpt,
    parse_parameters,
    parse_ret,
    parse_reverse_path,
    parse_size,
    xtext_decode,
    xtext_encode,
)

# --- Paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "rest"),
    [
        ("<a@example.org>", Path("a", "example.org"), ""),
        ("<a@example.org> SIZE=10", Path("a", "example.org"), "SIZE=10"),
        ("  <a@example.org>   BODY=7BIT ", Path("a", "example.org"), "BODY=7BIT "),
        ("<first.last+tag@sub.example.org>", Path("first.last+tag", "sub.example.org"), ""),
        ("<!#$%&'*+/=?^_`{|}~-@x.example>", Path("!#$%&'*+/=?^_`{|}~-", "x.example"), ""),
        ('<"a b"@example.org>', Path('"a b"', "example.org"), ""),
        ('<"user@other"@example.org>', Path('"user@other"', "example.org"), ""),
        ('<"a>b\\"c"@example.org> X=1', Path('"a>b\\"c"', "example.org"), "X=1"),
        ("<u@[192.0.2.1]>", Path("u", "[192.0.2.1]"), ""),
        ("<u@[IPv6:2001:db8::1]>", Path("u", "[IPv6:2001:db8::1]"), ""),
        ("<u@[ipv6:::1]>", Path("u", "[ipv6:::1]"), ""),
        ("<@a.example:u@b.example>", Path("u", "b.example", ("a.example",)), ""),
        ("<@a.example,@b.example:u@c.example>", Path("u", "c.example", ("a.example", "b.example")),
         ""),
        ("<p\u00e9l\u00e9@exemple.fr>", Path("p\u00e9l\u00e9", "exemple.fr"), ""),
        ("<\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a>",
         Path("\u7528\u6237", "\u4f8b\u5b50.\u5e7f\u544a"), ""),
        ("<a@1.2.3.4.example>", Path("a", "1.2.3.4.example"), ""),
        ("<a@x-y.example>", Path("a", "x-y.example"), ""),
    ],
)
def test_forward_paths(text: str, path: Path, rest: str) -> None:
    assert parse_forward_path(text) == (path, rest)
    assert parse_reverse_path(text) == (path, rest)


def test_null_and_postmaster() -> None:
    assert parse_reverse_path("<>") == (NULL_PATH, "")
    assert parse_reverse_path("<> RET=HDRS") == (NULL_PATH, "RET=HDRS")
    assert NULL_PATH.address == "" and str(NULL_PATH) == "<>"
    path, _ = parse_forward_path("<postMaster>")
    assert path == Path("postMaster") and path.address == "postMaster"
    with pytest.raises(AddressError, match="null path"):
        parse_forward_path("<>")
    with pytest.raises(AddressError):
        parse_reverse_path("<postmaster>")  # only RCPT has the short form (RFC 5321 4.1.1.3)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a@example.org", "enclosed in <>"),
        ("<a@example.org", "missing closing >"),
        ("<a>", "missing @domain"),
        ("<a@>", "malformed address"),
        ("<@example.org>", "malformed source route"),
        ("<a@example.org.>", "malformed address"),
        ("<a@-example.org>", "malformed address"),
        ("<a@example-.org>", "malformed address"),
        ("<a@exa_mple.org>", "malformed address"),
        ("<a..b@example.org>", "malformed address"),
        ("<.a@example.org>", "malformed address"),
        ("<a.@example.org>", "malformed address"),
        ("<a b@example.org>", "malformed address"),
        ('<"a@example.org>', "malformed address"),
        ("<a@b@example.org>", "malformed address"),
        ("<a\x01@example.org>", "control character"),
        ("<a@example.org>x", "unexpected text after the address"),
        ("<a@[1.2.3.256]>", "invalid IPv4 address literal"),
        ("<a@[IPv6:1::2::3]>", "invalid IPv6 address literal"),
        ("<a@[1.2.3]>", "unsupported address literal"),
        ("<a@[x-tag:stuff]>", "unsupported address literal"),
        ("<@a.example,b.example:u@c.example>", "malformed source route"),
        ("<@[1.2.3.4]:u@c.example>", "malformed source route"),
        ("<a@" + "d." * 130 + "example>", f"longer than {MAX_DOMAIN}"),
    ],
)
def test_bad_paths(text: str, reason: str) -> None:
    with pytest.raises(AddressError, match=reason.replace(".", r"\.")):
        parse_forward_path(text)


def test_pathological_input_is_refused_quickly() -> None:
    # Nested quantifiers must not backtrack exponentially on long junk
    # (pytest-timeout ends the test if they do).
    local_junk = ("a" * 2000 + "(", "a." * 1000 + "(", '"' + "\\a" * 1000, "@a," * 500)
    domain_junk = ("a" * 2000 + "(", "a." * 1000 + "(", "a-" * 999, "a" * 60 + "-" * 2000)
    for junk in local_junk:
        with pytest.raises(AddressError):
            parse_forward_path(f"<{junk}@example.org>")
    for junk in domain_junk:
        with pytest.raises(AddressError):
            parse_forward_path(f"<x@{junk}>")


def test_path_properties() -> None:
    quoted = Path('"a b"', "[192.0.2.1]")
    assert not quoted.is_utf8
    assert Path("j\u00f6", "example.org").is_utf8
    assert Path("a", "b\u00fccher.example").is_utf8
    assert str(Path("a", "b.example", ("r.example",))) == "<a@b.example>"


# --- Parameters -------------------------------------------------------------------


def test_parameters() -> None:
    assert parse_parameters("") == {}
    assert parse_parameters("size=10  BODY=8BITMIME SMTPUTF8 X-Y=a+20b") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
        "X-Y": "a+20b",
    }
    assert parse_parameters("X=caf\u00e9") == {"X": "caf\u00e9"}  # RFC 6531 esmtp-value


def test_a_parameter_repeated_exactly_counts_once() -> None:
    # smtplib sends "SMTPUTF8 SMTPUTF8 BODY=8BITMIME" when its caller passed the options
    # it adds by itself; nothing is ambiguous about that.
    assert parse_parameters("SMTPUTF8 smtputf8 BODY=8BITMIME BODY=8BITMIME") == {
        "SMTPUTF8": None,
        "BODY": "8BITMIME",
    }


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-X=1", "malformed parameter"),
        ("X_Y=1", "malformed parameter"),
        ("=1", "malformed parameter"),
        ("X=", "malformed value for X"),
        ("X=a=b", "malformed value for X"),
        ("X=1 x=2", "duplicate parameter X"),
        ("X x=1", "duplicate parameter X"),
        ("X=1 x", "duplicate parameter X"),
    ],
)
def test_bad_parameters(text: str, reason: str) -> None:
    with pytest.raises(ParameterError, match=reason):
        parse_parameters(text)


def test_esmtp_parameters_checked_and_decoded() -> None:
    params = parse_esmtp_parameters(
        "SIZE=100 body=8bitmime SMTPUTF8 RET=hdrs ENVID=a+2Bb AUTH=<>", MAIL_PARAMETERS
    )
    assert params == Parameters(size=100, body="8BITMIME", smtputf8=True, ret="HDRS",
                                envid="a+b", auth="<>")
    params = parse_esmtp_parameters("NOTIFY=failure,delay ORCPT=rfc822;b+40x", RCPT_PARAMETERS)
    assert params == Parameters(notify=("FAILURE", "DELAY"), orcpt="rfc822;b@x")
    assert parse_esmtp_parameters("", frozenset()) == Parameters()


def test_esmtp_parameters_refused() -> None:
    # A keyword not offered (RFC 5321 4.1.1.11: 555) is found before any bad value.
    with pytest.raises(UnsupportedParameter) as caught:
        parse_esmtp_parameters("SIZE=x NOTIFY=NEVER", MAIL_PARAMETERS)
    assert (caught.value.keyword, caught.value.value) == ("NOTIFY", None)
    with pytest.raises(UnsupportedParameter, match="BODY=BINARYMIME") as caught:
        parse_esmtp_parameters("BODY=binarymime", MAIL_PARAMETERS)
    assert caught.value.value == "binarymime"
    # Values are checked in field order: SIZE before BODY.
    with pytest.raises(ParameterError, match="SIZE"):
        parse_esmtp_parameters("BODY=BINARYMIME SIZE=x", MAIL_PARAMETERS)
    for bad in ("SMTPUTF8=yes", "RET=ALL", "ENVID=a=b", "AUTH=x", "SIZE=1 size=2"):
        with pytest.raises(ParameterError):
            parse_esmtp_parameters(bad, MAIL_PARAMETERS)


# --- xtext (RFC 3461 4) -----------------------------------------------------------


def test_xtext() -> None:
    assert xtext_decode("e+3Dmc2@example.com") == "e=mc2@example.com"
    assert xtext_decode("a+2Bb+2bc") == "a+b+c"
    assert xtext_decode("+C3+A9") == "\u00e9"
    assert xtext_encode("a=b+c d\u00e9") == "a+3Db+2Bc+20d+C3+A9"
    for bad in ("a+", "a+4", "a+GG", "a b", "a=b", "\u00e9", "+FF"):
        with pytest.raises(ParameterError):
            xtext_decode(bad)


@given(st.text(max_size=60))
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert all(0x21 <= ord(c) <= 0x7E and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


# --- Values -----------------------------------------------------------------------


def test_size_body_ret() -> None:
    assert parse_size("0") == 0 and parse_size("9" * 20) == 10**20 - 1
    for bad in (None, "", "-1", "1e3", "9" * 21, "\u0661"):
        with pytest.raises(ParameterError):
            parse_size(bad)
    assert parse_body("8bitmime") == "8BITMIME" and parse_body("7Bit") == "7BIT"
    assert parse_ret("hdrs") == "HDRS" and parse_ret("FULL") == "FULL"
    for call, bad in ((parse_body, "BINARYMIME"), (parse_body, None), (parse_ret, "ALL"),
                      (parse_ret, None)):
        with pytest.raises(ParameterError):
            call(bad)


def test_notify() -> None:
    # RFC 3461 4.1: NEVER alone, or any of SUCCESS, FAILURE, DELAY.
    assert parse_notify("never") == ("NEVER",)
    assert parse_notify("SUCCESS,failure,DELAY") == ("SUCCESS", "FAILURE", "DELAY")
    for bad in (None, "", "NEVER,SUCCESS", "SUCCESS,SUCCESS", "ALWAYS", "SUCCESS,"):
        with pytest.raises(ParameterError):
            parse_notify(bad)


def test_envid() -> None:
    assert parse_envid("QQ314159") == "QQ314159"
    assert parse_envid("a+2Bb+20c") == "a+b c"
    for bad in (None, "", "x" * 101, "+0A", "+C3+A9"):
        with pytest.raises(ParameterError):
            parse_envid(bad)


def test_orcpt() -> None:
    assert parse_orcpt("rfc822;a+2Bb@example.net") == "rfc822;a+b@example.net"
    assert parse_orcpt("RFC822;a@example.net") == "RFC822;a@example.net"
    # RFC 6533 3: the utf-8 address type carries \x{HEX} escapes.
    assert parse_orcpt("utf-8;j\\x{F6}rg@example.net") == "utf-8;j\u00f6rg@example.net"
    assert parse_orcpt("utf-8;a+2Bb@example.net") == "utf-8;a+b@example.net"
    for bad in (None, "", "a@example.net", "rfc822;", ";a@b", "rf c822;a@b", "rfc822;a+0Ab",
                "rfc822;" + "x" * 500, "utf-8;\\x{D800}"):
        with pytest.raises(ParameterError):
            parse_orcpt(bad)


def test_auth_param() -> None:
    assert parse_auth_param("<>") == "<>"
    assert parse_auth_param("e+3Dmc2@example.com") == "e=mc2@example.com"
    for bad in (None, "", "nobody", "a@", "<a@b.example>"):
        with pytest.raises(ParameterError):
            parse_auth_param(bad)
