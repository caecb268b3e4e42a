"""Real SMTP clients deliver through postroom's SMTP listener into a Maildir, byte for byte.

Each client sends a message with a unique token; the test reads the recipient's
Maildir with Python's `mailbox.Maildir` and wants the sent bytes back exactly,
behind a Received header that names postroom's host.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from mailcheck import assert_stored_verbatim, make_message, new_token, received_headers
from mailharness import LOOPBACK, Postroom

pytestmark = pytest.mark.interop

SENDER = "sender@client.example"
RCPT = "boss@corp.example"


def _unverified_context() -> ssl.SSLContext:
    # postroom's certificate is self-signed: these tests check the protocol, not the PKI.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _delivered(server: Postroom, address: str, token: str) -> bytes:
    """The one stored message carrying `token` (waits a little, as delivery may lag)."""
    found = server.wait_for_message(address, token.encode())
    assert len(found) == 1, (
        f"expected one message with token {token} in {server.maildir(address)}, "
        f"found {len(found)}\nserver output:\n{server.output()}"
    )
    return found[0]


def _run(command: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(command, input=stdin, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, (
        f"{command[0]} exited {result.returncode}\n"
        f"stdout:\n{result.stdout.decode(errors='replace')}\n"
        f"stderr:\n{result.stderr.decode(errors='replace')}"
    )
    return result


def test_smtplib_plain(postroom: Postroom) -> None:
    token = new_token()
    message = make_message(token, sender=SENDER, recipient=RCPT)
    with smtplib.SMTP(LOOPBACK, postroom.smtp_port, timeout=30) as client:
        client.ehlo("client.example")
        refused = client.sendmail(SENDER, [RCPT], message)
    assert refused == {}
    assert_stored_verbatim(_delivered(postroom, RCPT, token), message, postroom.hostname)


def test_smtplib_starttls(postroom: Postroom) -> None:
    token = new_token()
    message = make_message(token, sender=SENDER, recipient=RCPT)
    with smtplib.SMTP(LOOPBACK, postroom.smtp_port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls"), client.esmtp_features
        code, _ = client.starttls(context=_unverified_context())
        assert code == 220
        client.ehlo("client.example")
        assert not client.has_extn("starttls"), "STARTTLS offered again inside TLS"
        client.sendmail(SENDER, [RCPT], message)
    stored = _delivered(postroom, RCPT, token)
    assert_stored_verbatim(stored, message, postroom.hostname)
    # RFC 3848: the trace header says the hop was protected ("with ESMTPS").
    assert "SMTPS" in received_headers(stored)[0]


def test_smtplib_alias_reaches_every_target(postroom: Postroom) -> None:
    token = new_token()
    message = make_message(token, sender=SENDER, recipient="team@corp.example")
    with smtplib.SMTP(LOOPBACK, postroom.smtp_port, timeout=30) as client:
        client.sendmail(SENDER, ["team@corp.example"], message)
    for target in ("boss@corp.example", "alice@corp.example"):
        assert_stored_verbatim(_delivered(postroom, target, token), message, postroom.hostname)


@pytest.mark.parametrize("start_tls", [False, True], ids=["plain", "starttls"])
def test_aiosmtplib(
    postroom: Postroom, require_peer: Callable[..., str], start_tls: bool
) -> None:
    require_peer("aiosmtplib", module=True)
    import aiosmtplib

    token = new_token()
    message = make_message(token, sender=SENDER, recipient=RCPT)

    async def send() -> None:
        client = aiosmtplib.SMTP(
            hostname=LOOPBACK,
            port=postroom.smtp_port,
            start_tls=start_tls,
            validate_certs=False,
            tls_context=_unverified_context() if start_tls else None,
            timeout=30,
        )
        async with client:
            errors, _ = await client.sendmail(SENDER, [RCPT], message)
            assert errors == {}
            assert client.is_connected
            assert bool(client.get_transport_info("sslcontext")) is start_tls

    asyncio.run(send())
    assert_stored_verbatim(_delivered(postroom, RCPT, token), message, postroom.hostname)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_swaks(
    postroom: Postroom, require_peer: Callable[..., str], tmp_path: Path, tls: bool
) -> None:
    swaks = require_peer("swaks")
    token = new_token()
    message = make_message(token, sender=SENDER, recipient=RCPT)
    eml = tmp_path / "message.eml"
    # swaks ends DATA with its own CRLF "." CRLF, adding an empty line, unless
    # the data already ends with the closing dot, which it then sends as is.
    eml.write_bytes(message + b".\r\n")
    command = [
        swaks,
        "--server", f"{LOOPBACK}:{postroom.smtp_port}",
        "--helo", "client.example",
        "--from", SENDER,
        "--to", RCPT,
        "--data", f"@{eml}",
        "--timeout", "15",
    ]
    if tls:
        command.append("-tls")  # STARTTLS required: swaks fails if it cannot start it
    result = _run(command)
    if tls:
        assert b"TLS started" in result.stdout, result.stdout.decode(errors="replace")
    assert_stored_verbatim(_delivered(postroom, RCPT, token), message, postroom.hostname)


def test_curl(postroom: Postroom, require_peer: Callable[..., str], tmp_path: Path) -> None:
    curl = require_peer("curl")
    token = new_token()
    message = make_message(token, sender=SENDER, recipient=RCPT)
    eml = tmp_path / "message.eml"
    eml.write_bytes(message)
    _run(
        [
            curl, "--silent", "--show-error", "--max-time", "15",
            # The URL's path is the EHLO name curl announces.
            f"smtp://{LOOPBACK}:{postroom.smtp_port}/client.example",
            "--mail-from", SENDER,
            "--mail-rcpt", RCPT,
            "--upload-file", str(eml),
        ]
    )
    assert_stored_verbatim(_delivered(postroom, RCPT, token), message, postroom.hostname)


def test_curl_message_with_lines_past_998_octets(
    postroom: Postroom, require_peer: Callable[..., str], tmp_path: Path
) -> None:
    # Real mail has such lines (HTML on one line); Postfix takes them, and so does
    # postroom, up to MAX_MESSAGE_LINE.
    curl = require_peer("curl")
    token = new_token()
    html = b"<html><body>" + b"<p>wide</p>" * 2000 + b"</body></html>\r\n"  # 22 kB line
    message = make_message(token, sender=SENDER, recipient=RCPT, body=html)
    eml = tmp_path / "wide.eml"
    eml.write_bytes(message)
    _run([curl, "--silent", "--show-error", "--max-time", "15",
          f"smtp://{LOOPBACK}:{postroom.smtp_port}/client.example",
          "--mail-from", SENDER, "--mail-rcpt", RCPT, "--upload-file", str(eml)])
    assert_stored_verbatim(_delivered(postroom, RCPT, token), message, postroom.hostname)


def test_msmtp_starttls(postroom: Postroom, require_peer: Callable[..., str]) -> None:
    msmtp = require_peer("msmtp")
    token = new_token()
    message = make_message(token, sender=SENDER, recipient=RCPT)
    # --host makes msmtp ignore every configuration file.
    _run(
        [
            msmtp,
            f"--host={LOOPBACK}",
            f"--port={postroom.smtp_port}",
            "--domain=client.example",
            "--tls=on",
            "--tls-starttls=on",
            "--tls-certcheck=off",
            "--auth=off",
            "--timeout=15",
            f"--from={SENDER}",
            RCPT,
        ],
        stdin=message,
    )
    assert_stored_verbatim(_delivered(postroom, RCPT, token), message, postroom.hostname)


def test_eight_bit_body(postroom: Postroom) -> None:
    token = new_token()
    body = (
        f"token {token}\r\n".encode()
        + "Grüße aus Köln, naïve café — 日本語\r\n".encode()
        + b"latin-1 bytes: \xe9\xe8\xe0 and a lone high byte \xff\r\n"
    )
    message = make_message(
        token,
        sender=SENDER,
        recipient=RCPT,
        body=body,
        extra_headers=(
            b"MIME-Version: 1.0",
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: 8bit",
        ),
    )
    with smtplib.SMTP(LOOPBACK, postroom.smtp_port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.has_extn("8bitmime"), client.esmtp_features
        client.sendmail(SENDER, [RCPT], message, mail_options=["BODY=8BITMIME"])
    assert_stored_verbatim(_delivered(postroom, RCPT, token), message, postroom.hostname)


def test_smtputf8(postroom: Postroom) -> None:
    # A user with a UTF-8 local part when postroom allows one (RFC 6531), else
    # an ASCII user; either way the sender's address is UTF-8.
    utf8_user = "jörg@corp.example"
    if utf8_user in postroom.users or postroom.add_user(utf8_user, "jörg-secret", check=False):
        rcpt = utf8_user
    else:
        rcpt = RCPT
    sender = "δοκιμή@absender.example"
    token = new_token()
    message = (
        f"From: Jörg <{sender}>\r\nTo: <{rcpt}>\r\nSubject: Grüße {token}\r\n"
        f"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{token}@client.example>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        f"token {token}\r\nUnicode in headers and body: ✉ 📬\r\n"
    ).encode()
    with smtplib.SMTP(LOOPBACK, postroom.smtp_port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.has_extn("smtputf8"), client.esmtp_features
        refused = client.sendmail(
            sender, [rcpt], message, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )
    assert refused == {}
    stored = _delivered(postroom, rcpt, token)
    assert_stored_verbatim(stored, message, postroom.hostname)


def test_smtplib_send_message_with_smtputf8_given_twice(postroom: Postroom) -> None:
    # send_message adds SMTPUTF8 and BODY=8BITMIME by itself for a non-ASCII address;
    # a caller who passes them as well makes smtplib send each twice, which Exim accepts.
    sender = "jörg@absender.example"
    token = new_token()
    message = email.message_from_bytes(
        f"From: Jörg <{sender}>\r\nTo: <{RCPT}>\r\nSubject: Grüße {token}\r\n\r\n"
        f"token {token}\r\n".encode(), policy=email.policy.SMTPUTF8,
    )
    with smtplib.SMTP(LOOPBACK, postroom.smtp_port, timeout=30) as client:
        client.ehlo("client.example")
        refused = client.send_message(message, sender, [RCPT],
                                      mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert refused == {}
    stored = _delivered(postroom, RCPT, token)
    assert f"Subject: Grüße {token}".encode() in stored
