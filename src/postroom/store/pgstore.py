"""Builds the PostgreSQL store: checks the server answers, migrates its schema, wires the parts."""

from __future__ import annotations

from pathlib import Path

from argon2 import PasswordHasher

from postroom.store.api import PasswordGate, Store, StoreSettings
from postroom.store.pgconnect import StoreUnavailable, connect, describe, faults
from postroom.store.pgdirectory import PGDirectory
from postroom.store.pgmailboxes import PGMailboxes
from postroom.store.pgschema import SchemaTooNew, migrate
from postroom.store.pgusers import PGUserDirectory


def prepare(url: str) -> None:
    """Reach the server and bring its schema up to date; StoreUnavailable (one line)
    when it cannot be reached or was migrated by a newer postroom."""
    with connect(url) as conn, faults(url):
        try:
            migrate(conn)
        except SchemaTooNew as exc:
            raise StoreUnavailable(f"PostgreSQL at {describe(url)}: {exc}") from None


def open_pg_store(settings: StoreSettings, *, password_gate: PasswordGate | None = None,
                  hasher: PasswordHasher | None = None) -> Store:
    assert settings.url is not None
    url = settings.url
    prepare(url)
    users = PGUserDirectory(url, settings.domains, hasher=hasher,
                            postmaster=settings.postmaster,
                            config_source=settings.config_source)
    directory = PGDirectory(users, password_gate)
    directory.load_domains()
    spool = settings.spool_dir or Path(settings.mail_dir).parent / "store-spool"
    mailboxes = PGMailboxes(url, settings.hostname, spool)
    return Store(users, directory, mailboxes, background=(directory, mailboxes))
