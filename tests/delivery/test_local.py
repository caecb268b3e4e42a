"""The local courier: queued messages into Maildirs through the user directory's expansion."""

from __future__ import annotations

import asyncio
import errno
import mailbox
import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from message_content import content_of
from postroom.delivery.local import LocalCourier
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.result import DeliveryResult
from postroom.store import durable
from postroom.store.cache import CachedDirectory
from postroom.store.mailboxes import MaildirMailboxes
from postroom.store.users import SQLiteUserDirectory

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
MESSAGE = (
    b"Received: from localhost by mx.corp.example with local; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: MAILER-DAEMON@corp.example\r\n"
    b"To: boss@corp.example\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"\r\n"
    b"This is the mail system.\r\n"
)


@pytest.fixture
def directory(tmp_path: Path) -> SQLiteUserDirectory:
    users = SQLiteUserDirectory(tmp_path / "users.sqlite3", ["corp.example"], hasher=CHEAP)
    users.add_user("boss@corp.example", "secret-one")
    users.add_user("alice@corp.example", "secret-two")
    users.add_alias("team@corp.example", ["boss@corp.example", "alice@corp.example"])
    users.add_user("nobody@corp.example", "secret-three")
    users.add_alias("ghost@corp.example", ["nobody@corp.example"])
    users.remove_user("nobody@corp.example")  # the alias is left leading to no one
    # add_alias refuses targets off this host; a directory may hold one from before.
    with closing(sqlite3.connect(users.path)) as conn, conn:
        conn.executemany(
            "INSERT INTO aliases (source, position, target) VALUES ('out@corp.example', ?, ?)",
            [(0, "boss@corp.example"), (1, "friend@elsewhere.example")],
        )
    return users


@pytest.fixture
def store(tmp_path: Path) -> MaildirMailboxes:
    return MaildirMailboxes(tmp_path / "mail", "mx.corp.example")


def courier_for(store: MaildirMailboxes, directory: SQLiteUserDirectory) -> LocalCourier:
    return LocalCourier(store, CachedDirectory(directory).expand)


@pytest.fixture
def queued(tmp_path: Path) -> Path:
    path = tmp_path / "queued.eml"
    path.write_bytes(MESSAGE)
    return path


FILED = b"Return-Path: <>\r\n" + MESSAGE  # a bounce: the null sender (RFC 5321 4.4)


def deliver(
    courier: LocalCourier, addresses: list[str], message: Path, sender: str = ""
) -> list[DeliveryResult]:
    envelope = Envelope(
        queue_id="4XyZ", sender=sender, recipients=[Recipient(a) for a in addresses],
        created=0.0,
    )
    with content_of(message) as content:
        return asyncio.run(courier.deliver(envelope, envelope.recipients, content))


def stored(store: MaildirMailboxes, address: str) -> list[bytes]:
    """The raw files of a mailbox, checked to be a Maildir Python's mailbox module reads."""
    folder = store.maildir_for(address)
    if not folder.is_dir():
        return []
    assert len(mailbox.Maildir(folder, create=False)) == len(list((folder / "new").iterdir()))
    return [path.read_bytes() for path in sorted((folder / "new").iterdir())]


def test_delivers_the_queued_bytes_behind_the_return_path(
    store: MaildirMailboxes, directory: SQLiteUserDirectory, queued: Path
) -> None:
    courier = courier_for(store, directory)
    [result] = deliver(courier, ["boss@corp.example"], queued)
    assert result == DeliveryResult("boss@corp.example", "delivered", "2.0.0", result.text)
    assert result.remote_mta is None
    [path] = (store.maildir_for("boss@corp.example") / "new").iterdir()
    assert path.read_bytes() == FILED
    assert f",S={len(FILED)}," in path.name


def test_a_return_path_in_the_queued_message_is_replaced(
    store: MaildirMailboxes, directory: SQLiteUserDirectory, tmp_path: Path
) -> None:
    # RFC 5321 4.4: the final-delivery host writes the envelope sender; one that came
    # with the message (from a `postroom sendmail` script, say) is removed first.
    path = tmp_path / "script.eml"
    path.write_bytes(b"Return-Path: <forged@evil.example>\r\n" + MESSAGE)
    courier = courier_for(store, directory)
    deliver(courier, ["boss@corp.example"], path, sender="cron@corp.example")
    assert stored(store, "boss@corp.example") == [
        b"Return-Path: <cron@corp.example>\r\n" + MESSAGE]


def test_alias_expands_and_shared_mailboxes_get_one_copy(
    store: MaildirMailboxes, directory: SQLiteUserDirectory, queued: Path
) -> None:
    courier = courier_for(store, directory)
    results = deliver(courier, ["team@corp.example", "Boss@corp.example"], queued)
    assert [r.outcome for r in results] == ["delivered", "delivered"]
    # RFC 3464 2.3.3: the alias reached several mailboxes ("expanded" in a report).
    assert [r.expanded for r in results] == [True, False]
    assert len(stored(store, "boss@corp.example")) == 1
    assert len(stored(store, "alice@corp.example")) == 1


def test_unknown_recipients_fail_and_others_still_get_mail(
    store: MaildirMailboxes, directory: SQLiteUserDirectory, queued: Path
) -> None:
    courier = courier_for(store, directory)
    results = deliver(
        courier,
        [
            "nobody@corp.example",
            "ghost@corp.example",
            "alice@corp.example",
            "someone@elsewhere.example",
            "out@corp.example",
        ],
        queued,
    )
    assert [(r.recipient, r.outcome, r.dsn_status) for r in results] == [
        ("nobody@corp.example", "permanent", "5.1.1"),
        ("ghost@corp.example", "temporary", "4.3.5"),  # the set-up is at fault
        ("alice@corp.example", "delivered", "2.0.0"),
        ("someone@elsewhere.example", "permanent", "5.1.1"),
        ("out@corp.example", "permanent", "5.7.1"),
    ]
    assert len(stored(store, "alice@corp.example")) == 1
    # The alias that also forwards off-host left no partial copy behind.
    assert stored(store, "boss@corp.example") == []


def test_subaddress_goes_to_the_user(
    store: MaildirMailboxes, directory: SQLiteUserDirectory, queued: Path
) -> None:
    courier = courier_for(store, directory)
    [result] = deliver(courier, ["boss+reports@corp.example"], queued)
    assert result.outcome == "delivered"
    assert stored(store, "boss@corp.example") == [FILED]


@pytest.mark.parametrize("padding", [0, 1024 * 1024], ids=["in memory", "spooled"])
def test_store_failure_is_temporary_and_leaves_nothing(
    store: MaildirMailboxes,
    directory: SQLiteUserDirectory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    padding: int,
) -> None:
    queued = tmp_path / "queued.eml"
    queued.write_bytes(MESSAGE + b"x" * padding + b"\r\n")

    def full(fd: int, path: Path, *, metadata: bool = False) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durable.OS, "datasync", full)
    courier = courier_for(store, directory)
    results = deliver(courier, ["boss@corp.example", "nobody@corp.example"], queued)
    assert [(r.outcome, r.dsn_status) for r in results] == [
        ("temporary", "4.3.1"),
        ("permanent", "5.1.1"),
    ]
    assert [p for p in store.mail_dir.rglob("*") if not p.is_dir()] == []  # no copy, no spool


def test_large_message_is_copied_whole(
    store: MaildirMailboxes, directory: SQLiteUserDirectory, tmp_path: Path
) -> None:
    body = b"".join(b"line %07d of a long report\r\n" % i for i in range(120_000))  # ~3.5 MB
    path = tmp_path / "big.eml"
    path.write_bytes(MESSAGE + body)
    courier = courier_for(store, directory)
    [result] = deliver(courier, ["alice@corp.example"], path)
    assert result.outcome == "delivered"
    [copy] = (store.maildir_for("alice@corp.example") / "new").iterdir()
    assert copy.read_bytes() == FILED + body


def test_a_directory_entry_that_can_name_no_mailbox_is_the_hosts_fault(
    store: MaildirMailboxes, directory: SQLiteUserDirectory, queued: Path
) -> None:
    # `user add` refuses "/" in a mailbox name; a row written past it reaches the courier.
    with closing(sqlite3.connect(directory.path)) as conn, conn:
        conn.execute("INSERT INTO users (address, domain, password, created) "
                     "VALUES ('a/b@corp.example', 'corp.example', 'x', 0)")
    [result] = deliver(courier_for(store, directory), ["a/b@corp.example"], queued)
    assert (result.outcome, result.dsn_status) == ("temporary", "4.3.5")
    assert [p for p in store.mail_dir.rglob("*") if not p.is_dir()] == []


def test_a_folder_files_into_each_mailbox_folder(
    store: MaildirMailboxes, directory: SQLiteUserDirectory, queued: Path
) -> None:
    # The milter's quarantine and the mail checks name a Maildir++ folder ("Junk").
    courier = courier_for(store, directory)
    envelope = Envelope(queue_id="4XyZ", sender="", created=0.0,
                        recipients=[Recipient("team@corp.example")])
    with content_of(queued) as content:
        [result] = asyncio.run(courier.deliver(envelope, envelope.recipients, content, "Junk"))
    assert result.outcome == "delivered" and "folder Junk" in result.text
    for box in ("boss@corp.example", "alice@corp.example"):
        assert stored(store, box) == []
        junk = store.maildir_for(box) / ".Junk"
        assert [p.read_bytes() for p in (junk / "new").iterdir()] == [FILED]
        assert (junk / "maildirfolder").is_file()
