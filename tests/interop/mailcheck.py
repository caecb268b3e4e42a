"""Build test messages that carry a unique token, and check how a mailbox stored them.

The bodies hold the lines SMTP software tends to get wrong: a lone ".", lines
starting with dots (RFC 5321 4.5.2 transparency), "From " (mbox quoting),
trailing blanks, tabs, and a long line near the 998-octet limit (RFC 5322 2.1.1).
"""

from __future__ import annotations

import email
import email.policy
import uuid

CRLF = b"\r\n"


def new_token() -> str:
    return uuid.uuid4().hex


def tricky_body(token: str) -> bytes:
    """A body whose every line a careless relay would change."""
    lines = [
        f"token {token}".encode(),
        b"",
        b".",
        b".leading dot",
        b"..two leading dots",
        b"From the start of a line",
        b"trailing blanks   ",
        b"\ttab first, then text",
        b"x" * 990,
        b"",
        b"last line",
    ]
    return CRLF.join(lines) + CRLF


def make_message(
    token: str,
    *,
    sender: str,
    recipient: str,
    subject: str = "interop",
    body: bytes | None = None,
    extra_headers: tuple[bytes, ...] = (),
) -> bytes:
    """A complete RFC 5322 message with CRLF line ends whose Subject carries `token`."""
    headers = [
        f"From: <{sender}>".encode(),
        f"To: <{recipient}>".encode(),
        f"Subject: {subject} {token}".encode(),
        b"Date: Fri, 27 Nov 2026 12:00:00 +0000",
        f"Message-ID: <{token}@client.example>".encode(),
        *extra_headers,
    ]
    return CRLF.join(headers) + CRLF + CRLF + (tricky_body(token) if body is None else body)


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block with its final CRLF, body) split at the first empty line."""
    head, sep, body = data.partition(CRLF + CRLF)
    assert sep, f"no empty line ends the header in {data[:300]!r}"
    return head + CRLF, body


def with_token(messages: list[bytes], token: str) -> list[bytes]:
    needle = token.encode()
    return [m for m in messages if needle in m]


def received_headers(stored: bytes) -> list[str]:
    parsed = email.message_from_bytes(stored, policy=email.policy.compat32)
    return [str(v) for v in parsed.get_all("Received", [])]


def assert_trace_added(stored: bytes, hostname: str) -> None:
    """The stored message starts with the Return-Path final delivery writes (RFC 5321
    4.4), then a Received header naming the receiving host."""
    assert stored.startswith(b"Return-Path: <"), f"no leading Return-Path: {stored[:200]!r}"
    after = stored.split(CRLF, 1)[1]
    assert after.startswith(b"Received:"), f"no Received header next: {stored[:200]!r}"
    received = received_headers(stored)
    assert received, "no Received header parsed"
    assert hostname in received[0], f"{hostname!r} missing from {received[0]!r}"


def assert_stored_verbatim(stored: bytes, original: bytes, hostname: str) -> None:
    """The mailbox holds trace headers followed by the exact bytes the client sent."""
    assert_trace_added(stored, hostname)
    assert stored.endswith(original), (
        "stored message does not end with the sent bytes\n"
        f"sent tail:   {original[-300:]!r}\nstored tail: {stored[-300:]!r}"
    )
    prefix = stored[: len(stored) - len(original)]
    assert prefix.endswith(CRLF)
    # Everything added in front must be header fields (trace), nothing else.
    for line in prefix[:-2].split(CRLF):
        assert line[:1] in (b" ", b"\t") or b":" in line, f"not a header line: {line!r}"


def assert_body_intact(stored: bytes, original: bytes, hostname: str) -> None:
    """Headers may have been added by a relay, but the body is byte for byte the same."""
    assert_trace_added(stored, hostname)
    assert split_message(stored)[1] == split_message(original)[1]
