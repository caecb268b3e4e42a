"""Submission (RFC 6409) on real sockets: AUTH under TLS, sender checks, headers completed."""

from __future__ import annotations

import asyncio
import base64
import email
import smtplib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store


def write_config(data: Path, extra: str = "") -> None:
    (data / "postroom.toml").write_text(
        'hostname = "mail.isp.example"\n'
        'domains = ["isp.example"]\n'
        "[listen]\n"
        'smtp = "127.0.0.1:0"\n'
        'submission = "127.0.0.1:0"\n'
        'submissions = "127.0.0.1:0"\n'
        "[pop3]\n"
        'auth_failure_delay = "0.1s"\n' + extra
    )


@asynccontextmanager
async def running_server(tmp_path: Path, extra: str = "") -> AsyncIterator[Running]:
    write_config(tmp_path, extra)
    config = load_config(tmp_path)
    directory = open_store(config.store).users
    directory.add_user("smith@isp.example", "smith-secret")
    directory.add_user("jones@isp.example", "jones-secret")
    directory.add_alias("reports@isp.example", ["smith@isp.example"])
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def client(server: Running, implicit: bool = False) -> smtplib.SMTP:
    if implicit:
        return smtplib.SMTP_SSL(*server.address("submissions"), timeout=10, context=unverified())
    c = smtplib.SMTP(*server.address("submission"), timeout=10)
    c.starttls(context=unverified())
    return c


def body(sender: str = "smith@isp.example", extra: str = "") -> bytes:
    return (f"From: Smith <{sender}>\r\nTo: jones@isp.example\r\nSubject: report\r\n{extra}"
            "\r\nHere it is.\r\n").encode()


def inbox(tmp_path: Path, user: str) -> list[bytes]:
    folder = tmp_path / "mail" / "isp.example" / user / "new"
    return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


def run(scenario: Any) -> None:
    asyncio.run(scenario())


def test_mail_without_auth_is_530_and_auth_needs_tls(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:

            def talk() -> None:
                with smtplib.SMTP(*server.address("submission"), timeout=10) as c:
                    c.ehlo("client.example")
                    assert not c.has_extn("auth")  # not before TLS (RFC 4954 4)
                    code, text = c.mail("smith@isp.example")
                    assert code == 530 and text.startswith(b"5.7.0")
                    c.starttls(context=unverified())
                    c.ehlo("client.example")
                    assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]

            await asyncio.to_thread(talk)

    run(scenario)


@pytest.mark.parametrize("implicit", [False, True])
def test_authenticated_user_delivers_with_headers_completed(tmp_path: Path, implicit: bool) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:

            def send() -> None:
                with client(server, implicit) as c:
                    c.login("smith@isp.example", "smith-secret")
                    c.sendmail("smith@isp.example", ["jones@isp.example"], body())

            await asyncio.to_thread(send)

    run(scenario)
    (raw,) = inbox(tmp_path, "jones")
    msg = email.message_from_bytes(raw)
    assert "with ESMTPSA id" in msg["Received"]
    assert msg["Message-ID"].endswith("@mail.isp.example>")  # RFC 6409 8.3
    assert msg["Date"]  # RFC 6409 8.2
    assert raw.endswith(b"\r\n\r\nHere it is.\r\n")


def test_login_mechanism_and_wrong_password(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:

            def talk() -> None:
                with client(server) as c:
                    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                        c.login("smith@isp.example", "wrong")
                    assert info.value.smtp_code == 535
                    c.user, c.password = "smith@isp.example", "smith-secret"
                    code, _ = c.auth("LOGIN", c.auth_login)
                    assert code == 235

            await asyncio.to_thread(talk)

    run(scenario)


@pytest.mark.parametrize(
    ("sender", "from_header", "code", "enhanced"),
    [
        ("jones@isp.example", "smith@isp.example", 553, b"5.7.1"),  # another user's sender
        ("boss@corp.example", "smith@isp.example", 553, b"5.7.1"),  # a foreign sender
        ("smith@isp.example", "jones@isp.example", 550, b"5.7.1"),  # From: not hers
    ],
)
def test_sender_must_be_the_users_own(
    tmp_path: Path, sender: str, from_header: str, code: int, enhanced: bytes
) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:

            def send() -> None:
                with client(server) as c:
                    c.login("smith@isp.example", "smith-secret")
                    with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPDataError)) as e:
                        c.sendmail(sender, ["jones@isp.example"], body(from_header))
                    assert e.value.smtp_code == code
                    assert e.value.smtp_error.startswith(enhanced)

            await asyncio.to_thread(send)

    run(scenario)
    assert inbox(tmp_path, "jones") == []


@pytest.mark.parametrize("sender", ["reports@isp.example", "smith+tag@isp.example", ""])
def test_alias_subaddress_and_null_sender_are_allowed(tmp_path: Path, sender: str) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:

            def send() -> None:
                with client(server) as c:
                    c.login("smith@isp.example", "smith-secret")
                    c.sendmail(sender, ["jones@isp.example"], body("reports@isp.example"))

            await asyncio.to_thread(send)

    run(scenario)
    assert len(inbox(tmp_path, "jones")) == 1


def test_open_relay_probe_on_the_mx_port_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:

            def probe() -> None:
                with smtplib.SMTP(*server.address("smtp"), timeout=10) as c:
                    c.ehlo("probe.example")
                    assert not c.has_extn("auth")
                    c.mail("smith@isp.example")
                    code, text = c.rcpt("victim@elsewhere.example")
                    assert (code, text[:5]) == (554, b"5.7.1")

            await asyncio.to_thread(probe)

    run(scenario)


def login_utf8(c: smtplib.SMTP, user: str, password: str) -> None:
    """AUTH PLAIN with UTF-8 credentials (RFC 4616 2), which smtplib.login cannot send."""
    c.ehlo_or_helo_if_needed()
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
    assert c.docmd("AUTH", f"PLAIN {token}")[0] == 235


def test_utf8_user_sends_with_her_own_address_in_from(tmp_path: Path) -> None:
    # RFC 6532 3: with SMTPUTF8 the header fields are UTF-8, so From: carries her
    # address as she wrote it in MAIL FROM, not as undecodable bytes.
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            directory = open_store(load_config(tmp_path).store).users
            directory.add_user("jörg@isp.example", "jörg-secret")

            def send() -> dict[str, tuple[int, bytes]]:
                with client(server) as c:
                    login_utf8(c, "jörg@isp.example", "jörg-secret")
                    return c.sendmail("jörg@isp.example", ["jones@isp.example"],
                                      body("jörg@isp.example").replace(b"Smith", "Jörg".encode()),
                                      mail_options=["SMTPUTF8"])

            assert await asyncio.to_thread(send) == {}

    run(scenario)
    (raw,) = inbox(tmp_path, "jones")
    assert "From: Jörg <jörg@isp.example>".encode() in raw


def test_utf8_from_of_another_user_is_refused_with_her_address(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            directory = open_store(load_config(tmp_path).store).users
            directory.add_user("jörg@isp.example", "jörg-secret")

            def send() -> None:
                with client(server) as c:
                    c.login("smith@isp.example", "smith-secret")
                    with pytest.raises(smtplib.SMTPDataError) as e:
                        c.sendmail("smith@isp.example", ["jones@isp.example"],
                                   body("jörg@isp.example"), mail_options=["SMTPUTF8"])
                    assert e.value.smtp_code == 550
                    assert "<jörg@isp.example>".encode() in e.value.smtp_error

            await asyncio.to_thread(send)

    run(scenario)
    assert inbox(tmp_path, "jones") == []


def test_non_ascii_from_without_smtputf8_is_refused_cleanly(tmp_path: Path) -> None:
    # RFC 6532 3 / RFC 6531 3.4: UTF-8 header fields need an SMTPUTF8 transaction.
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            directory = open_store(load_config(tmp_path).store).users
            directory.add_user("jörg@isp.example", "jörg-secret")

            def send() -> None:
                with client(server) as c:
                    c.login("smith@isp.example", "smith-secret")
                    with pytest.raises(smtplib.SMTPDataError) as e:
                        c.sendmail("smith@isp.example", ["jones@isp.example"],
                                   body("jörg@isp.example"), mail_options=["BODY=8BITMIME"])
                    assert e.value.smtp_code == 550
                    assert e.value.smtp_error.startswith(b"5.6.7 From: holds a non-ASCII")
                    c.noop()  # the session goes on

            await asyncio.to_thread(send)

    run(scenario)
    assert inbox(tmp_path, "jones") == []
