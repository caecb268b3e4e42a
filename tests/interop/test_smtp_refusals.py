"""What a real client (smtplib) sees when postroom refuses: unknown users, relaying, address tricks.

A receiving host must not be an open relay (RFC 5321 3.6.2, 7.1): mail for
other domains is refused, and so are the old routing forms that smuggle a
foreign destination inside a local-looking address (the "%" hack, source
routes of RFC 5321 4.1.2 / appendix C, a quoted local part holding an "@").
"""

from __future__ import annotations

import smtplib

import pytest
from mailcheck import make_message, new_token
from mailharness import LOOPBACK, Postroom

pytestmark = pytest.mark.interop

SENDER = "sender@client.example"


def _rcpt(server: Postroom, raw_path: str) -> tuple[int, bytes]:
    """Open a transaction and send `RCPT TO:<raw_path>` verbatim (smtplib would rewrite it)."""
    with smtplib.SMTP(LOOPBACK, server.smtp_port, timeout=30) as client:
        client.ehlo("client.example")
        code, text = client.mail(SENDER)
        assert code == 250, (code, text)
        return client.docmd("RCPT", f"TO:<{raw_path}>")


def test_unknown_user_gets_550_5_1_1(postroom: Postroom) -> None:
    code, text = _rcpt(postroom, "nobody-here@corp.example")
    assert code == 550, (code, text)
    assert text.startswith(b"5.1.1"), text


def test_unknown_user_refused_by_sendmail(postroom: Postroom) -> None:
    message = make_message(new_token(), sender=SENDER, recipient="ghost@corp.example")
    with smtplib.SMTP(LOOPBACK, postroom.smtp_port, timeout=30) as client, pytest.raises(
        smtplib.SMTPRecipientsRefused
    ) as refused:
        client.sendmail(SENDER, ["ghost@corp.example"], message)
    code, text = refused.value.recipients["ghost@corp.example"]
    assert (code, text[:5]) == (550, b"5.1.1")


def test_other_domain_gets_554_5_7_1(postroom: Postroom) -> None:
    code, text = _rcpt(postroom, "someone@other.example")
    assert code == 554, (code, text)
    assert text.startswith(b"5.7.1"), text


def test_one_good_recipient_among_refused_ones_still_delivers(postroom: Postroom) -> None:
    token = new_token()
    message = make_message(token, sender=SENDER, recipient="alice@corp.example")
    with smtplib.SMTP(LOOPBACK, postroom.smtp_port, timeout=30) as client:
        refused = client.sendmail(
            SENDER, ["ghost@corp.example", "alice@corp.example", "x@other.example"], message
        )
    assert set(refused) == {"ghost@corp.example", "x@other.example"}
    assert postroom.wait_for_message("alice@corp.example", token.encode())


@pytest.mark.parametrize(
    "raw_path",
    [
        "boss%other.example@corp.example",
        "user%other.example@corp.example",
        "@corp.example:user@other.example",
        "@corp.example,@mx.corp.example:user@other.example",
        '"user@other.example"@corp.example',
        '"boss@other.example"@corp.example',
    ],
)
def test_address_tricks_refused(postroom: Postroom, raw_path: str) -> None:
    code, text = _rcpt(postroom, raw_path)
    assert 500 <= code < 600, f"RCPT TO:<{raw_path}> got {code} {text!r}"
