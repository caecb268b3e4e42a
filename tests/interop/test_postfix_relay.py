"""Postfix, a real MTA, relays into postroom: the message lands in the Maildir, body intact.

Postfix adds trace and possibly other headers on its way, so only the body is
compared byte for byte; postroom's own Received header must come first.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from mailcheck import assert_body_intact, make_message, new_token, received_headers
from mailharness import LOOPBACK, Postroom, PrivatePostfix

pytestmark = pytest.mark.interop

RCPT = "alice@corp.example"


@pytest.mark.parametrize("tls_level", ["none", "encrypt"])
def test_postfix_relays_into_postroom(
    postroom: Postroom, private_postfix: Callable[..., PrivatePostfix], tls_level: str
) -> None:
    # "encrypt" makes Postfix's SMTP client insist on STARTTLS (without
    # checking the self-signed certificate), so the relay hop is TLS or nothing.
    relay = private_postfix(relayhost=(LOOPBACK, postroom.smtp_port), tls_level=tls_level)
    token = new_token()
    message = make_message(token, sender="someone@relay.test", recipient=RCPT)
    relay.send("someone@relay.test", [RCPT], message)
    found = postroom.wait_for_message(RCPT, token.encode(), timeout=30)
    assert len(found) == 1, (
        f"message {token} not delivered (found {len(found)})\n"
        f"postfix log:\n{relay.log()}\npostroom output:\n{postroom.output()}"
    )
    stored = found[0]
    assert_body_intact(stored, message, postroom.hostname)
    received = received_headers(stored)
    # postroom's header on top, then the one Postfix added when it took the message.
    assert len(received) >= 2, received
    assert "relay.test" in received[0], received[0]
    # RFC 3848: "with ESMTPS" marks a hop protected by TLS.
    assert ("SMTPS" in received[0]) is (tls_level == "encrypt"), received[0]
