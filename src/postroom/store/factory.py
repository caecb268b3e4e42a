"""Opens the store the settings name: Maildir + SQLite in the data folder, or PostgreSQL by URL."""

from __future__ import annotations

from postroom.store.api import PasswordGate, Store, StoreSettings
from postroom.store.cache import CachedDirectory
from postroom.store.mailboxes import MaildirMailboxes
from postroom.store.users import SQLiteUserDirectory


def open_store(settings: StoreSettings, *, password_gate: PasswordGate | None = None) -> Store:
    """The store of `settings`. The embedded one reads or makes nothing until it is
    used; PostgreSQL is reached (and its schema migrated) at once: OSError, one line
    naming the server, when it cannot be.

    `password_gate` bounds the server's password checks (server.passwords).
    """
    if settings.url:
        from postroom.store.pgstore import open_pg_store

        return open_pg_store(settings, password_gate=password_gate)
    users = SQLiteUserDirectory(settings.users_db, settings.domains,
                                postmaster=settings.postmaster,
                                config_source=settings.config_source)
    return Store(users, CachedDirectory(users, password_gate),
                 MaildirMailboxes(settings.mail_dir, settings.hostname))
