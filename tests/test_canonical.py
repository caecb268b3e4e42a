"""Addresses: splitting at the right "@", and one canonical spelling per mailbox."""

from __future__ import annotations

import pytest

from postroom.canonical import (
    canonical,
    canonical_domain,
    display_domain,
    mail_domain,
    mailbox_address,
    split,
    unquoted,
)


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("a@b.example", ("a", "b.example")),
        ('"a@b"@c.example', ('"a@b"', "c.example")),
        ('"a\\"@"@c.example', ('"a\\"@"', "c.example")),
        ("a@b@c.example", ("a@b", "c.example")),
    ],
)
def test_split(address: str, parts: tuple[str, str]) -> None:
    assert split(address) == parts


@pytest.mark.parametrize("address", ["plain", '"unterminated@x.example', '"a@b"'])
def test_split_errors(address: str) -> None:
    with pytest.raises(ValueError):
        split(address)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("Boss@Corp.Example", "Boss@corp.example"),  # the local part keeps its case
        ("boss@corp.example.", "boss@corp.example"),
        ('"boss"@corp.example', "boss@corp.example"),
        ('"first last"@corp.example', '"first last"@corp.example'),
        ("x@bücher.example", "x@xn--bcher-kva.example"),  # A-labels are canonical
        ("x@XN--BCHER-KVA.Example", "x@xn--bcher-kva.example"),
        ("用户@例子.example", "用户@xn--fsqu00a.example"),  # RFC 6531 local parts pass
        ("x@[127.0.0.1]", "x@[127.0.0.1]"),
        ("x@[ipv6:0:0:0:0:0:0:0:1]", "x@[IPv6:::1]"),
    ],
)
def test_canonical(address: str, expected: str) -> None:
    assert canonical(address) == expected


@pytest.mark.parametrize(
    "address",
    ["@x.example", "x@", "x@.", "a b@x.example", "x@-bad.example", "x@bad_.example",
     "x@xn--zz.example", "x@[300.1.1.1]", "x@a..b", "x" * 65 + "@x.example",
     "x@" + "a." * 130 + "example", '"a\nb"@x.example'],
)
def test_canonical_errors(address: str) -> None:
    with pytest.raises(ValueError):
        canonical(address)


def test_display_domain() -> None:
    assert display_domain(canonical_domain("Bücher.Example")) == "bücher.example"


@pytest.mark.parametrize(("local", "text"), [("boss", "boss"), ('"boss"', "boss"),
                                             ('"a\\"b\\\\c"', 'a"b\\c'), ('"a b"', "a b")])
def test_unquoted(local: str, text: str) -> None:
    assert unquoted(local) == text


def test_mail_domain() -> None:
    assert mail_domain("Corp.Example.") == "corp.example"
    assert mail_domain("123.example") == "123.example"  # only the last label may not be a number
    for name, words in [("1.2.3.4", "is an IP address"), ("[1.2.3.4]", "address literal"),
                        ("host.42", "last label is a number"), ("a..b", "not a valid")]:
        with pytest.raises(ValueError, match=words):
            mail_domain(name)


def test_mailbox_address() -> None:
    assert mailbox_address('"Boss"@Corp.Example') == "boss@corp.example"
    with pytest.raises(ValueError, match="plain dot-atom"):
        mailbox_address('"a b"@corp.example')
    with pytest.raises(ValueError, match="plain dot-atom"):
        mailbox_address("a/b@corp.example")
    with pytest.raises(ValueError, match="no domain after the @"):
        mailbox_address("boss@")
