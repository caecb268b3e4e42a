"""Local recipients over real SMTP sessions: postmaster, quoted local parts, broken aliases.

RFC 5321 4.5.1: every domain a host receives mail for has a postmaster,
whatever the letter case, on the MX and the submission listeners alike; it is
filed with the administrator (`postmaster` in the config) unless an alias says
otherwise. RFC 5321 4.1.2: `"boss"` is the local part `boss`.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from postroom.config import load_config, postmaster_address
from postroom.server.main import Running, start
from postroom.store.factory import open_store
from postroom.store.users import SQLiteUserDirectory

MESSAGE = b"From: alice@corp.example\r\nSubject: hello\r\n\r\nHello.\r\n"


def write_config(data: Path, top: str = "") -> None:
    (data / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\n'
        'domains = ["corp.example", "second.example"]\n' + top +
        "[listen]\n"
        'smtp = "127.0.0.1:0"\n'
        'submission = "127.0.0.1:0"\n'
    )


@asynccontextmanager
async def running_server(
    tmp_path: Path, top: str = "", setup: Callable[[SQLiteUserDirectory], None] | None = None
) -> AsyncIterator[Running]:
    write_config(tmp_path, top)
    config = load_config(tmp_path)
    directory = open_store(config.store).users
    directory.add_domain("added.example")
    directory.add_user("boss@corp.example", "boss-secret")
    directory.add_user("alice@corp.example", "alice-secret")
    if setup is not None:
        setup(directory)
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


def inbox(tmp_path: Path, address: str) -> list[bytes]:
    local, _, domain = address.partition("@")
    folder = tmp_path / "mail" / domain / local / "new"
    return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def session(server: Running, listener: str) -> smtplib.SMTP:
    client = smtplib.SMTP(*server.address(listener), timeout=10)
    client.ehlo("client.example")
    if listener == "submission":
        client.starttls(context=unverified())
        client.ehlo("client.example")
        client.login("alice@corp.example", "alice-secret")
    return client


def send(server: Running, listener: str, raw_rcpt: str,
         sender: str = "alice@corp.example") -> tuple[int, bytes]:
    """One transaction with `MAIL FROM:<sender>` and `RCPT TO:<raw_rcpt>` sent verbatim
    (smtplib would rewrite a quoted path); the RCPT reply. Accepted, the message is sent."""
    with session(server, listener) as client:
        code, text = client.docmd("MAIL", f"FROM:<{sender}>")
        assert code == 250, (code, text)
        code, text = client.docmd("RCPT", f"TO:<{raw_rcpt}>")
        if code == 250:
            data_code, data_text = client.data(MESSAGE)
            assert data_code == 250, (data_code, data_text)
        return code, text


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(scenario())


LISTENERS = ["smtp", "submission"]
POSTMASTERS = [
    "postmaster@corp.example",
    "POSTMASTER@CORP.EXAMPLE",  # RFC 5321 4.5.1: case-insensitive
    "PostMaster@second.example",  # any domain of the config
    "postmaster@added.example",  # and any `domain add` one
    "postmaster+bounces@corp.example",  # a subaddress of it, too
    "Postmaster",  # RFC 5321 4.1.1.3: <Postmaster> with no domain
]


@pytest.mark.parametrize("listener", LISTENERS)
def test_postmaster_of_every_local_domain_reaches_the_administrator(
    tmp_path: Path, listener: str
) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path, 'postmaster = "Boss@corp.example"\n') as server:
            for rcpt in POSTMASTERS:
                code, text = await asyncio.to_thread(send, server, listener, rcpt)
                assert (code, text[:5]) == (250, b"2.1.5"), (rcpt, text)

    run(scenario)
    assert len(inbox(tmp_path, "boss@corp.example")) == len(POSTMASTERS)
    assert inbox(tmp_path, "postmaster@corp.example") == []


def test_without_a_user_the_postmaster_mailbox_still_takes_its_mail(tmp_path: Path) -> None:
    # No `postmaster` key: the administrator is postmaster@ the first domain, which
    # need not be a user (yet) for its mail to be kept.
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            assert postmaster_address(server.config) == "postmaster@corp.example"
            for rcpt in ("postmaster@corp.example", "postmaster@added.example"):
                code, text = await asyncio.to_thread(send, server, "smtp", rcpt)
                assert code == 250, (rcpt, text)

    run(scenario)
    assert len(inbox(tmp_path, "postmaster@corp.example")) == 2


def test_an_alias_for_postmaster_wins(tmp_path: Path) -> None:
    def alias(directory: SQLiteUserDirectory) -> None:
        directory.add_alias("postmaster@second.example", ["alice@corp.example"])
        directory.add_alias("abuse@corp.example", ["postmaster@corp.example"])

    async def scenario() -> None:
        async with running_server(tmp_path, 'postmaster = "boss@corp.example"\n',
                                  alias) as server:
            for rcpt in ("postmaster@second.example", "postmaster@corp.example",
                         "abuse@corp.example"):
                code, text = await asyncio.to_thread(send, server, "smtp", rcpt)
                assert code == 250, (rcpt, text)

    run(scenario)
    assert len(inbox(tmp_path, "alice@corp.example")) == 1
    assert len(inbox(tmp_path, "boss@corp.example")) == 2  # postmaster@corp and abuse@


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_quoted_local_part_is_the_same_mailbox(tmp_path: Path, listener: str) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            for rcpt in ('"boss"@corp.example', '"Bo\\ss"@Corp.Example'):
                code, text = await asyncio.to_thread(send, server, listener, rcpt)
                assert (code, text[:5]) == (250, b"2.1.5"), (rcpt, text)
            for rcpt in ('"nobody"@corp.example', '"boss smith"@corp.example'):
                code, text = await asyncio.to_thread(send, server, listener, rcpt)
                assert (code, text[:5]) == (550, b"5.1.1"), (rcpt, text)
                assert b"no such user" in text
            # Still no relaying through a quoted local part that hides an address.
            code, text = await asyncio.to_thread(
                send, server, "smtp", '"boss@other.example"@corp.example')
            assert (code, text[:5]) == (554, b"5.7.1"), text

    run(scenario)
    assert len(inbox(tmp_path, "boss@corp.example")) == 2


def test_submission_takes_a_quoted_sender_as_the_users_own(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            code, text = await asyncio.to_thread(
                send, server, "submission", "boss@corp.example", '"alice"@corp.example')
            assert code == 250, text

    run(scenario)
    assert len(inbox(tmp_path, "boss@corp.example")) == 1


def test_an_alias_that_lost_its_targets_gets_a_clear_temporary_reply(tmp_path: Path) -> None:
    def orphan(directory: SQLiteUserDirectory) -> None:
        directory.add_user("gone@corp.example", "gone-secret")
        directory.add_alias("sales@corp.example", ["gone@corp.example"])
        directory.remove_user("gone@corp.example")

    async def scenario() -> None:
        async with running_server(tmp_path, setup=orphan) as server:
            for listener in LISTENERS:
                code, text = await asyncio.to_thread(send, server, listener,
                                                     "sales@corp.example")
                assert (code, text[:5]) == (451, b"4.3.5"), text
                assert b"alias that leads to no mailbox" in text

    run(scenario)
