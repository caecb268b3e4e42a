"""`postroom store copy`: a whole store from a data folder to PostgreSQL, or back, byte for byte.

Copied: domains, users with their argon2id hashes, aliases in their order,
APOP secrets, and every mailbox's messages with their UIDLs (RFC 1939 7), so
a POP3 client that leaves mail on the server downloads nothing again, and
whether each was read. The target must be empty: a copy never merges into
(and so never duplicates) mail already there. Each mailbox is copied in one
transaction (PostgreSQL) or file by file with atomic renames (Maildir).
The relay queue goes too, each message with its envelope and every recipient's
state; copied into PostgreSQL, its messages are free for any node to take.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import psycopg

from postroom.queue.pgqueue import PGQueueStore
from postroom.queue.store import QueueStore
from postroom.store import durable
from postroom.store.dropindex import CRLF, READ_CHUNK
from postroom.store.mailboxes import MaildirMailboxes
from postroom.store.maildir import LineEnds, ensure_maildir
from postroom.store.maildrop import Maildrop
from postroom.store.pgconnect import describe, faults, is_postgres_url
from postroom.store.pgmailboxes import CHUNK
from postroom.store.pgstore import prepare
from postroom.store.users import SQLiteUserDirectory

USERS_DB = "users.sqlite3"  # in a data folder, as Config.users_db
MAIL_DIR = "mail"  # in a data folder, as Config.mail_dir
QUEUE_DIR = "queue"  # in a data folder, as Config.queue_dir
SPOOL_DIR = "store-spool"  # in a data folder, as Config.store's spool_dir

# The directory's tables and columns, the same in both backends.
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("domains", ("name", "created")),
    ("users", ("address", "domain", "password", "created")),
    ("aliases", ("source", "position", "target")),
    ("apop_secrets", ("address", "secret")),
)


@dataclass
class Message:
    uid: str
    stored: int
    sent: int
    crlf: bool
    seen: bool
    chunks: Iterator[bytes]


class CopyRefused(ValueError):
    """The copy cannot start (the target holds something, or a side is missing)."""


def copy_store(source: str, target: str) -> Iterator[str]:
    """Copy store `source` to `target` (each a data folder or a postgresql:// URL);
    yields one line per step for the command line."""
    if is_postgres_url(source) == is_postgres_url(target):
        raise CopyRefused("copy from a data folder to a postgresql:// URL, or back")
    if is_postgres_url(target):
        yield from _to_postgres(Path(source), target)
    else:
        yield from _to_folder(source, Path(target))


# -- data folder -> PostgreSQL -------------------------------------------------------


def _to_postgres(data: Path, url: str) -> Iterator[str]:
    users_db = data / USERS_DB
    if not users_db.is_file():
        raise CopyRefused(f"{data}: no {USERS_DB} here: not a postroom data folder")
    prepare(url)
    with psycopg.connect(url) as pg, contextlib.closing(sqlite3.connect(users_db)) as lite, \
            faults(url):
        _require_empty(pg, url)
        with pg.transaction():
            for table, columns in TABLES:
                rows = lite.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
                with pg.cursor() as cur:
                    cur.executemany(_insert(table, columns, "%s"), rows)
                yield f"{table}: {len(rows)} copied"
            pg.execute(b"NOTIFY postroom_directory")
        boxes = messages = 0
        for address, maildir in _maildirs(data / MAIL_DIR):
            with pg.transaction():
                count = 0
                for message in _read_maildir(maildir):
                    _insert_message(pg, address, message)
                    count += 1
            boxes += 1
            messages += count
        yield f"mailboxes: {boxes} copied, {messages} messages, UIDLs kept"
    queued = _copy_queue(QueueStore(data / QUEUE_DIR, create=False),
                         PGQueueStore(url, None, data / SPOOL_DIR))
    yield f"queue: {queued} messages copied"
    yield f"done: {data} -> {describe(url)}"


def _insert(table: str, columns: tuple[str, ...], mark: str) -> bytes:
    return (f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join([mark] * len(columns))})").encode()


def _require_empty(pg: psycopg.Connection, url: str) -> None:
    row = pg.execute(b"SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM domains)"
                     b" + (SELECT count(*) FROM messages) + (SELECT count(*) FROM queue)"
                     ).fetchone()
    if row and row[0]:
        raise CopyRefused(f"{describe(url)} already holds users, domains, mail or queued "
                          "mail: copy into an empty database")


def _maildirs(mail: Path) -> Iterator[tuple[str, Path]]:
    """(address, maildir) of every mailbox under a mail folder (DATA/mail/DOMAIN/LOCAL)."""
    for domain in sorted(_folders(mail)):
        for local in sorted(_folders(domain)):
            yield f"{local.name}@{domain.name}", local


def _folders(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    return [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _read_maildir(maildir: Path) -> Iterator[Message]:
    """The maildir's messages in delivery order, under its POP3 lock."""
    drop = Maildrop.open(maildir)
    try:
        listing = drop.listing
        for i, name in enumerate(listing.names):
            path = maildir / name
            info = name.partition(":2,")[2]
            yield Message(listing.uids[i], path.stat().st_size, listing.sizes[i],
                          bool(listing.flags[i] & CRLF), name.startswith("cur/") and "S" in info,
                          _file_chunks(path))
    finally:
        drop.close()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as file:
        while data := file.read(READ_CHUNK):
            yield data


def _insert_message(pg: psycopg.Connection, mailbox: str, message: Message) -> None:
    row = pg.execute(b"INSERT INTO contents (size) VALUES (%s) RETURNING id",
                     (message.stored,)).fetchone()
    assert row is not None
    content = row[0]
    for seq, data in enumerate(message.chunks):
        pg.execute(b"INSERT INTO chunks (content, seq, data) VALUES (%s, %s, %s)",
                   (content, seq, data))
    pg.execute(b"INSERT INTO messages (mailbox, uid, content, size, crlf, seen) "
               b"VALUES (%s, %s, %s, %s, %s, %s)",
               (mailbox, message.uid, content, message.sent, message.crlf, message.seen))


# -- PostgreSQL -> data folder -------------------------------------------------------


def _to_folder(url: str, data: Path) -> Iterator[str]:
    users_db = data / USERS_DB
    if users_db.exists() or any(_folders(data / MAIL_DIR)) or QueueStore(
            data / QUEUE_DIR, create=False).ids():
        raise CopyRefused(f"{data} already holds a user database, mailboxes or queued "
                          "mail: copy into an empty data folder")
    prepare(url)
    data.mkdir(parents=True, exist_ok=True)
    SQLiteUserDirectory(users_db)._connect()  # the file (0600) and its schema
    with psycopg.connect(url) as pg, contextlib.closing(sqlite3.connect(users_db)) as lite, \
            faults(url):
        with lite:
            for table, columns in TABLES:
                rows = pg.execute(f"SELECT {', '.join(columns)} FROM {table}".encode()
                                  ).fetchall()
                lite.executemany(_insert(table, columns, "?").decode(), rows)
                yield f"{table}: {len(rows)} copied"
        mailboxes = [r[0] for r in pg.execute(
            b"SELECT DISTINCT mailbox FROM messages ORDER BY mailbox").fetchall()]
        messages = 0
        folders = MaildirMailboxes(data / MAIL_DIR, "copy")
        for mailbox in mailboxes:
            maildir = folders.maildir_for(mailbox)  # ValueError for what no folder can be
            messages += _write_maildir(pg, mailbox, maildir)
        yield f"mailboxes: {len(mailboxes)} copied, {messages} messages, UIDLs kept"
    queued = _copy_queue(PGQueueStore(url, None, data / SPOOL_DIR),
                         QueueStore(data / QUEUE_DIR))
    yield f"queue: {queued} messages copied"
    yield f"done: {describe(url)} -> {data}"


def _copy_queue(source: QueueStore, target: QueueStore) -> int:
    """Every queued message, envelope and octets, from one queue store to the other."""
    envelopes = source.list()
    for envelope in envelopes:
        with source.open_content(envelope.queue_id) as content, content.reader() as reader:
            target.add(envelope, _pieces(reader))
    return len(envelopes)


def _pieces(reader: BinaryIO) -> Iterator[bytes]:
    while data := reader.read(CHUNK):
        yield data


def _write_maildir(pg: psycopg.Connection, mailbox: str, maildir: Path) -> int:
    ensure_maildir(maildir)
    rows = pg.execute(b"SELECT uid, content, seen FROM messages WHERE mailbox = %s "
                      b"AND folder = '' ORDER BY id", (mailbox,)).fetchall()
    for uid, content, seen in rows:
        _write_message(pg, maildir, uid, content, seen)
    durable.sync_folders([maildir / "new", maildir / "cur"])
    return len(rows)


def _write_message(pg: psycopg.Connection, maildir: Path, uid: str, content: int,
                   seen: bool) -> None:
    """One message as a Maildir file whose base name is its UIDL (maildir.scan_name and
    dropindex.uid_for read it back as such), with S= and W= for its sizes."""
    tmp = maildir / "tmp" / uid
    fd = durable.OS.create(tmp, durable.FILE_MODE)
    ends = LineEnds()
    try:
        with pg.cursor(name=f"c{content}") as cur:  # server-side: a chunk at a time
            cur.execute(b"SELECT data FROM chunks WHERE content = %s ORDER BY seq",
                        (content,))
            for (data,) in _batches(cur):
                piece = bytes(data)
                ends.feed(piece)
                durable.OS.write(fd, tmp, [piece])
        durable.OS.datasync(fd, tmp)
    finally:
        os.close(fd)
    name = f"{uid},S={ends.size},W={ends.sent}"
    target = maildir / ("cur" if seen else "new") / (name + (":2,S" if seen else ""))
    durable.OS.rename(tmp, target)


def _batches(cur: Any) -> Iterator[tuple[Any, ...]]:
    while rows := cur.fetchmany(max(1, (4 * 1024 * 1024) // CHUNK)):
        yield from rows
