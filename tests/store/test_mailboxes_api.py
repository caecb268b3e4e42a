"""api.Mailboxes on both backends (Maildir, PostgreSQL): filing, POP3 snapshots, the Update state.

What POP3 clients rely on: LIST sizes equal the octets RETR sends, UIDLs that
stay the same across sessions, one session at a time (-ERR [IN-USE]), and
deletions only at QUIT. Large messages go through in pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import psycopg
import pytest

from postroom.store.api import MaildropBusy, Store, StoreSettings
from postroom.store.factory import open_store

BOX = "boss@corp.example"
OTHER = "it@corp.example"
HEAD = b"Return-Path: <a@x.example>\r\n"


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


@pytest.fixture(params=["maildir", "postgresql"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return StoreSettings(tmp_path / "users.sqlite3", tmp_path / "mail", "mx.corp.example",
                         url=url, spool_dir=tmp_path / "spool")


@contextlib.asynccontextmanager
async def opened(settings: StoreSettings) -> AsyncIterator[Store]:
    store = open_store(settings)
    store.start()
    try:
        yield store
    finally:
        await store.stop()
        store.close()


async def file(store: Store, parts: list[bytes], *boxes: str) -> list[str]:
    incoming = store.mailboxes.receive(HEAD)
    for part in parts:
        incoming.write(part)
    try:
        return await incoming.deliver(list(boxes))
    finally:
        incoming.abort()


async def retr(drop: Any, number: int) -> bytes:
    chunks = await drop.read(number)
    assert chunks is not None
    return b"".join(chunks)


def sent_form(data: bytes) -> bytes:
    """What RETR sends for stored octets (before byte-stuffing): CRLF line ends."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    out = b"\r\n".join(lines)
    return out if out.endswith(b"\r\n") or not out else out + b"\r\n"


def test_filed_mail_is_listed_with_the_sizes_retr_sends(store_settings: StoreSettings) -> None:
    async def go() -> None:
        async with opened(store_settings) as store:
            plain = b"Subject: one\r\n\r\nbody\r\n"
            bare = b"Subject: two\n\nbare LF body\nno end"
            assert len(await file(store, [plain], BOX, OTHER, BOX)) == 3
            await file(store, [bare], BOX)
            drop = await store.mailboxes.open_maildrop(BOX)
            try:
                assert len(drop.sizes) == 2
                first, second = await retr(drop, 1), await retr(drop, 2)
                assert first == HEAD + plain and drop.crlf(1)
                assert drop.sizes[0] == len(sent_form(first))
                assert second == HEAD + bare and not drop.crlf(2)
                assert drop.sizes[1] == len(sent_form(second))
                uids = list(drop.uids)
                assert len(set(uids)) == 2
                assert all(0 < len(u) <= 70 and u.isprintable() and " " not in u for u in uids)
            finally:
                drop.close()
            await asyncio.sleep(0)
            again = await store.mailboxes.open_maildrop(BOX)
            try:
                assert list(again.uids) == uids  # RFC 1939 7: the same in every session
            finally:
                again.close()
    run(go)


def test_one_session_at_a_time_and_deletions_only_at_quit(
    store_settings: StoreSettings,
) -> None:
    async def go() -> None:
        async with opened(store_settings) as store:
            for n in range(3):
                await file(store, [f"Subject: {n}\r\n\r\nx\r\n".encode()], BOX, OTHER)
            drop = await store.mailboxes.open_maildrop(BOX)
            with pytest.raises(MaildropBusy):
                await store.mailboxes.open_maildrop(BOX)
            other = await store.mailboxes.open_maildrop(OTHER)  # another mailbox is free
            other.close()
            uids = list(drop.uids)
            await retr(drop, 1)
            drop.close()  # a dropped session: nothing deleted
            await until_free(store, BOX)
            drop = await store.mailboxes.open_maildrop(BOX)
            assert list(drop.uids) == uids
            assert await drop.update([1, 3]) == 0
            drop.close()
            await until_free(store, BOX)
            drop = await store.mailboxes.open_maildrop(BOX)
            assert list(drop.uids) == [uids[1]]
            assert b"Subject: 1" in await retr(drop, 1)
            drop.close()
            await until_free(store, OTHER)
            other = await store.mailboxes.open_maildrop(OTHER)  # its copies are all there
            assert len(other.sizes) == 3
            assert b"Subject: 2" in await retr(other, 3)
            other.close()
    run(go)


async def until_free(store: Store, box: str, limit: float = 10.0) -> None:
    """Wait until the lock `box`'s last session gave back is free (PostgreSQL gives it
    back in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        try:
            drop = await store.mailboxes.open_maildrop(box)
        except MaildropBusy:
            assert loop.time() < deadline, f"{box} stayed locked"
            await asyncio.sleep(0.01)
            continue
        drop.close()
        await asyncio.sleep(0.05)
        return


def test_a_large_message_goes_through_in_pieces(store_settings: StoreSettings) -> None:
    async def go() -> None:
        async with opened(store_settings) as store:
            line = b"0123456789" * 7 + b"\r\n"
            piece = line * 1000  # 72 KB
            parts = [b"Subject: big\r\n\r\n", *[piece] * 40]  # ~2.9 MB
            await file(store, parts, BOX)
            drop = await store.mailboxes.open_maildrop(BOX)
            try:
                chunks = await drop.read(1)
                assert chunks is not None
                assert len(chunks) > 1  # read back in pieces, not one buffer
                assert b"".join(chunks) == HEAD + b"".join(parts)
                assert drop.sizes[0] == len(HEAD) + sum(map(len, parts))
            finally:
                drop.close()
    run(go)


def test_a_relayed_copy_lacks_the_head(store_settings: StoreSettings) -> None:
    async def go() -> None:
        async with opened(store_settings) as store:
            for parts in ([b"Subject: s\r\n\r\nsmall\r\n"],
                          [b"Subject: l\r\n\r\n", b"x" * 700_000, b"\r\n"]):
                incoming = store.mailboxes.receive(HEAD)
                for part in parts:
                    incoming.write(part)
                assert b"".join(incoming.chunks()) == b"".join(parts)
                await incoming.deliver([BOX])
                original = incoming.original()
                data = original if isinstance(original, bytes) else original.read_bytes()
                assert data == HEAD + b"".join(parts)
                incoming.abort()
    run(go)


def test_a_bad_mailbox_name_files_nothing(store_settings: StoreSettings) -> None:
    async def go() -> None:
        async with opened(store_settings) as store:
            with pytest.raises(ValueError):
                await file(store, [b"x\r\n"], BOX, "a@NOT.CANONICAL")
            drop = await store.mailboxes.open_maildrop(BOX)
            assert len(drop.sizes) == 0
            drop.close()
    run(go)


def test_concurrent_deliveries_share_commits(pg_url: str, tmp_path: Path) -> None:
    from postroom.store.pgmailboxes import PGMailboxes

    settings = StoreSettings(tmp_path / "u", tmp_path / "m", "mx.corp.example", url=pg_url,
                             spool_dir=tmp_path / "spool")
    batches: list[int] = []

    async def go() -> None:
        async with opened(settings) as store:
            mailboxes = store.mailboxes
            assert isinstance(mailboxes, PGMailboxes)
            commit = mailboxes._commit

            async def counted(batch: Any) -> None:
                batches.append(len(batch))
                await commit(batch)

            mailboxes._commit = counted  # type: ignore[method-assign]
            await asyncio.gather(*(file(store, [f"Subject: {n}\r\n\r\n".encode()], BOX)
                                   for n in range(20)))
            drop = await mailboxes.open_maildrop(BOX)
            assert len(drop.sizes) == 20
            drop.close()
    run(go)
    assert sum(batches) == 20 and len(batches) < 20


def test_reading_in_order_fetches_the_next_messages_along(pg_url: str, tmp_path: Path) -> None:
    from postroom.store.api import LATER

    settings = StoreSettings(tmp_path / "u", tmp_path / "m", "mx.corp.example", url=pg_url,
                             spool_dir=tmp_path / "spool")

    async def go() -> None:
        async with opened(settings) as store:
            for n in range(5):
                await file(store, [f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()], BOX)
            drop = await store.mailboxes.open_maildrop(BOX)
            try:
                assert drop.read_now(1) is LATER  # nothing fetched yet
                assert b"Subject: 0" in await retr(drop, 1)
                for n in range(2, 6):  # came with the first, without waiting
                    chunks = drop.read_now(n, seen=n != 3)
                    assert isinstance(chunks, list)
                    assert f"Subject: {n - 1}".encode() in b"".join(chunks)
                assert drop.read_now(2) is LATER  # handed out once; read() fetches again
                assert b"Subject: 1" in await retr(drop, 2)
                await drop.update([])
            finally:
                drop.close()
        with psycopg.connect(pg_url) as conn:
            seen = conn.execute("SELECT seen FROM messages ORDER BY id").fetchall()
        assert seen == [(True,), (True,), (False,), (True,), (True,)]  # 3 only by TOP
    run(go)
