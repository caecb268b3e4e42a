"""Exim 4 delivers to postroom's MX listener: every message arrives exactly once.

Exim is Debian's default MTA and pipelines harder than most clients: without
TLS it sends MAIL, RCPT, `BDAT n LAST` with the message and QUIT in one write,
then shuts its sending side and reads the replies. A server that closes on
that half-close files the message but never says 250, so Exim defers and
delivers it again. Here Exim must log every message as delivered, with no
deferral, and each must be in the Maildir once: over plaintext and STARTTLS,
one message per connection and several down one connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from mailharness import Postroom, PrivateExim

pytestmark = pytest.mark.interop

RECIPIENT = "boss@corp.example"


def message(token: str) -> bytes:
    return (f"From: someone@exim.test\nTo: {RECIPIENT}\nSubject: {token}\n\n"
            f"body of {token}\n").encode()


def stored_tokens(server: Postroom, prefix: str) -> list[str]:
    found = []
    for raw in server.messages(RECIPIENT):
        match = re.search(rb"Subject: (" + re.escape(prefix.encode()) + rb"-\d+)", raw)
        if match:
            found.append(match.group(1).decode())
    return sorted(found)


def assert_delivered_once(exim: PrivateExim, server: Postroom, prefix: str, count: int) -> str:
    log = exim.log()
    assert " == " not in log, f"Exim deferred a delivery:\n{log}"
    assert log.count(" => ") == count and log.count(" Completed") == count, log
    assert exim.queued() == 0
    expected = sorted(f"{prefix}-{n}" for n in range(count))
    assert stored_tokens(server, prefix) == expected  # each once, none twice
    return log


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "starttls"])
def test_exim_one_message_per_connection(
    postroom: Postroom, private_exim: Callable[..., PrivateExim], tls: bool
) -> None:
    exim = private_exim(relay=("127.0.0.1", postroom.smtp_port), tls=tls)
    prefix = f"single-{'tls' if tls else 'plain'}"
    for n in range(3):
        exim.send("someone@exim.test", [RECIPIENT], message(f"{prefix}-{n}"))
    log = assert_delivered_once(exim, postroom, prefix, 3)
    assert ("X=TLS" in log) == tls, log


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "starttls"])
def test_exim_several_messages_down_one_connection(
    postroom: Postroom, private_exim: Callable[..., PrivateExim], tls: bool
) -> None:
    exim = private_exim(relay=("127.0.0.1", postroom.smtp_port), tls=tls)
    prefix = f"batch-{'tls' if tls else 'plain'}"
    for n in range(5):
        exim.queue("someone@exim.test", [RECIPIENT], message(f"{prefix}-{n}"))
    exim.run_queue()
    log = assert_delivered_once(exim, postroom, prefix, 5)
    # Exim marks a delivery down a connection it was handed on with "*" after the host.
    assert re.search(r"=> .* H=127\.0\.0\.1 \[127\.0\.0\.1\]\*", log), log
