"""Opens the store the settings name: the embedded one, Maildir + SQLite in the data folder."""

from __future__ import annotations

from postroom.store.api import PasswordGate, Store, StoreSettings
from postroom.store.cache import CachedDirectory
from postroom.store.mailboxes import MaildirMailboxes
from postroom.store.users import SQLiteUserDirectory


def open_store(settings: StoreSettings, *, password_gate: PasswordGate | None = None) -> Store:
    """The store of `settings`. Nothing is read or made until it is used.

    `password_gate` bounds the server's password checks (server.passwords).
    """
    users = SQLiteUserDirectory(settings.users_db, settings.domains,
                                postmaster=settings.postmaster,
                                config_source=settings.config_source)
    return Store(users, CachedDirectory(users, password_gate),
                 MaildirMailboxes(settings.mail_dir, settings.hostname))
