"""The PostgreSQL store's schema as numbered migrations, applied in order, each exactly once.

`postroom_schema` holds one row per migration applied. Every node (and the
command line) migrates on first contact, under an advisory lock so that nodes
starting together apply each step once; a database that a newer postroom
migrated further is refused rather than misread. `postroom store check` reports
where a database stands.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

# An arbitrary constant naming postroom's migration lock (pg_advisory_xact_lock).
MIGRATION_LOCK = 0x706F7374726F6F6D  # "postroom" in ASCII

# (version, statements). Append new versions; never edit an applied one.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE domains (
    name     text PRIMARY KEY,
    created  double precision NOT NULL   -- seconds since the epoch
);
CREATE TABLE users (
    address  text PRIMARY KEY,
    domain   text NOT NULL,
    password text NOT NULL,          -- argon2id encoded hash ($argon2id$v=19$...)
    created  double precision NOT NULL   -- seconds since the epoch
);
CREATE INDEX users_domain ON users (domain);
CREATE TABLE aliases (
    source   text NOT NULL,
    position integer NOT NULL,       -- keeps targets in the order they were given
    target   text NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE TABLE apop_secrets (
    address  text PRIMARY KEY,
    secret   text NOT NULL           -- readable on purpose: APOP (RFC 1939 7) needs it
);
-- A message's octets, shared by the copies filed in several mailboxes.
CREATE TABLE contents (
    id       bigserial PRIMARY KEY,
    size     bigint NOT NULL         -- octets stored, the sum of its chunks
);
CREATE TABLE chunks (
    content  bigint NOT NULL REFERENCES contents ON DELETE CASCADE,
    seq      integer NOT NULL,
    data     bytea NOT NULL,
    PRIMARY KEY (content, seq)
);
-- Mail is mostly text already sent compressed or not at all: no second compression.
ALTER TABLE chunks ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE messages (
    id       bigserial PRIMARY KEY,  -- the order of the POP3 listing
    mailbox  text NOT NULL,          -- the owner's address (api.local_address form)
    uid      text NOT NULL,          -- the UIDL (RFC 1939 7), never reused in the mailbox
    content  bigint NOT NULL REFERENCES contents,
    size     bigint NOT NULL,        -- octets as RETR sends them (CRLF line ends)
    crlf     boolean NOT NULL,       -- stored with CRLF line ends only: sent as stored
    seen     boolean NOT NULL DEFAULT false,
    received timestamptz NOT NULL DEFAULT now(),
    UNIQUE (mailbox, uid)
);
CREATE INDEX messages_listing ON messages (mailbox, id);
CREATE INDEX messages_content ON messages (content);
-- The POP3 maildrop lock (RFC 1939 8) shared by every node: a lease its holder renews.
CREATE TABLE maildrop_leases (
    mailbox  text PRIMARY KEY,
    holder   text NOT NULL,          -- node/process/session
    expires  timestamptz NOT NULL
);
"""),
    (2, """
-- The relay queue (postroom.queue.pgqueue): one row per message, its envelope as
-- JSON with every recipient's state, owned by the node delivering it while its
-- lease lasts.
CREATE TABLE queue (
    id       text PRIMARY KEY,       -- the queue ID
    envelope text NOT NULL,          -- postroom.queue.envelope as JSON
    size     bigint NOT NULL,        -- octets of the message
    owner    text,                   -- the node delivering it; NULL: any node may take it
    lease    timestamptz,            -- the owner holds it until then, unless renewed
    queued   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queue_owner ON queue (owner);
CREATE TABLE queue_chunks (
    id       text NOT NULL REFERENCES queue ON DELETE CASCADE,
    seq      integer NOT NULL,
    data     bytea NOT NULL,
    PRIMARY KEY (id, seq)
);
ALTER TABLE queue_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
"""),
    (3, """
-- A mailbox's folders (api.check_folder's names: "Junk"), as Maildir++ keeps them
-- beside the inbox; '' is the inbox, the only folder POP3 shows (RFC 1939 has none).
ALTER TABLE messages ADD COLUMN folder text NOT NULL DEFAULT '';
"""),
)

LATEST = MIGRATIONS[-1][0]


class SchemaTooNew(Exception):
    """The database was migrated by a newer postroom than this one."""


@dataclass(frozen=True)
class SchemaState:
    current: int  # the highest migration applied (0: none)
    latest: int = LATEST  # the highest this postroom knows

    @property
    def up_to_date(self) -> bool:
        return self.current == self.latest

    def describe(self) -> str:
        if self.current == self.latest:
            return f"schema is current (version {self.current})"
        if self.current > self.latest:
            return (f"schema version {self.current} was made by a newer postroom "
                    f"(this one knows up to {self.latest}); upgrade postroom")
        if self.current == 0:
            return f"no postroom schema yet (version {self.latest} is made on first use)"
        return (f"schema version {self.current}, this postroom's is {self.latest}: "
                "migrated on the next start (or: postroom store migrate)")


def _current(conn: psycopg.Connection) -> int:
    exists = conn.execute("SELECT to_regclass('postroom_schema') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM postroom_schema").fetchone()
    return int(row[0]) if row else 0


def state(conn: psycopg.Connection) -> SchemaState:
    """Where the database stands (reads only)."""
    with conn.transaction():
        return SchemaState(_current(conn))


def migrate(conn: psycopg.Connection) -> SchemaState:
    """Apply the migrations the database lacks, each in the one transaction that records
    it; SchemaTooNew when a newer postroom got there first."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS postroom_schema ("
                     "version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())")
        current = _current(conn)
        if current > LATEST:
            raise SchemaTooNew(SchemaState(current).describe())
        for version, statements in MIGRATIONS:
            if version > current:
                conn.execute(statements.encode())
                conn.execute("INSERT INTO postroom_schema (version) VALUES (%s)", (version,))
                current = version
    return SchemaState(current)
