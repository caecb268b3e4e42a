"""`postroom store copy`: a data folder to PostgreSQL and back, users and mail with their UIDLs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from postroom.cli import main
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.pgqueue import PGQueueStore
from postroom.queue.store import QueueStore
from postroom.store.api import Store, StoreSettings
from postroom.store.factory import open_store
from postroom.store.users import SQLiteUserDirectory

BOX = "boss@corp.example"
MESSAGES = [
    b"Subject: one\r\n\r\nCRLF body\r\n",
    b"Subject: two\n\nbare LF body\nno final line end",
    b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1500,  # 1.5 MB: several chunks
]


QUEUED = Envelope("QID1", BOX, [Recipient("far@remote.example", state="deferred",
                                          attempts=2, last_error="451 try later")], 1.0e9)
QUEUED_MESSAGE = b"Subject: queued\r\n\r\n" + b"y" * 600_000 + b"\r\n"


def queued(store: QueueStore) -> list[tuple[bytes, bytes]]:
    """(envelope JSON, octets) of each queued message."""
    found = []
    for envelope in store.list():
        with store.open_content(envelope.queue_id) as content, content.reader() as reader:
            found.append((envelope.to_json(), reader.read()))
    return found


def settings(data: Path, url: str | None = None) -> StoreSettings:
    return StoreSettings(data / "users.sqlite3", data / "mail", "mx.corp.example", url=url,
                         spool_dir=data / "spool")


async def mailbox_state(store: Store) -> list[tuple[str, int, bytes]]:
    """(UIDL, LIST size, RETR octets) of each of BOX's messages."""
    drop = await store.mailboxes.open_maildrop(BOX)
    try:
        found = []
        for n in range(1, len(drop.sizes) + 1):
            chunks = await drop.read(n, seen=n == 1)  # the first one is read
            assert chunks is not None
            found.append((drop.uids[n - 1], drop.sizes[n - 1], b"".join(chunks)))
        await drop.update([])
    finally:
        drop.close()
    await asyncio.sleep(0.05)
    return found


def fill(data: Path) -> list[tuple[str, int, bytes]]:
    users = SQLiteUserDirectory(data / "users.sqlite3")
    users.add_domain("corp.example")
    users.add_user(BOX, "secret")
    users.add_user("it@corp.example", "other")
    users.add_alias("team@corp.example", [BOX, "it@corp.example"])
    users.set_apop_secret(BOX, "apop-secret")
    QueueStore(data / "queue").add(QUEUED, [QUEUED_MESSAGE])

    async def go() -> list[tuple[str, int, bytes]]:
        store = open_store(settings(data))
        for message in MESSAGES:
            incoming = store.mailboxes.receive(b"")
            incoming.write(message)
            await incoming.deliver([BOX])
            incoming.abort()
        state = await mailbox_state(store)
        store.close()
        return state
    return asyncio.run(go())


def state_of(settings: StoreSettings) -> list[tuple[str, int, bytes]]:
    async def go() -> list[tuple[str, int, bytes]]:
        store = open_store(settings)
        store.start()
        try:
            return await mailbox_state(store)
        finally:
            await store.stop()
            store.close()
    return asyncio.run(go())


def test_copy_to_postgresql_and_back(pg_url: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    source, back = tmp_path / "source", tmp_path / "back"
    before = fill(source)
    assert main(["--data", str(tmp_path), "store", "copy", "--from", str(source),
                 "--to", pg_url]) == 0
    out = capsys.readouterr().out
    assert "users: 2 copied" in out and "mailboxes: 1 copied, 3 messages" in out
    assert "queue: 1 messages copied" in out
    in_pg = state_of(settings(tmp_path / "node", pg_url))
    assert in_pg == before  # UIDLs, sizes and octets
    with psycopg.connect(pg_url) as conn:
        seen = conn.execute("SELECT seen FROM messages ORDER BY id").fetchall()
        hashes = conn.execute("SELECT password FROM users ORDER BY address").fetchall()
    assert seen == [(True,), (False,), (False,)]
    expected_queue = [(QUEUED.to_json(), QUEUED_MESSAGE)]
    assert queued(PGQueueStore(pg_url, None, tmp_path / "spool")) == expected_queue
    lite = SQLiteUserDirectory(source / "users.sqlite3")
    original = [r[0] for r in lite._connect().execute(
        "SELECT password FROM users ORDER BY address")]
    assert [h[0] for h in hashes] == original  # the same argon2id hashes
    assert main(["--data", str(tmp_path), "store", "copy", "--from", pg_url,
                 "--to", str(back)]) == 0
    assert state_of(settings(back)) == before
    copied = SQLiteUserDirectory(back / "users.sqlite3")
    assert copied.verify_password(BOX, "secret")
    assert copied.list_aliases() == {"team@corp.example": [BOX, "it@corp.example"]}
    assert copied.apop_secret(BOX) == "apop-secret"
    assert queued(QueueStore(back / "queue")) == expected_queue


def test_copy_refuses_a_target_that_holds_something(pg_url: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "source"
    fill(source)
    args = ["--data", str(tmp_path), "store", "copy", "--from", str(source), "--to", pg_url]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "store", "copy", "--from", pg_url,
                 "--to", str(source)]) == 2
    assert "already holds" in capsys.readouterr().err
