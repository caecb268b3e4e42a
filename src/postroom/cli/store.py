"""`postroom store`: where the store's schema stands, migrating it, and copying a whole store."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from postroom.cli.common import Context, group

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers

EXIT_NOT_CURRENT = 1  # `store check`: the schema is not this postroom's


def add_store(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    action = group(sub, common, "store", "check, migrate or copy the store",
                   "The store holds users, domains, aliases and mailboxes: in the data "
                   "folder (SQLite and Maildirs) or in PostgreSQL ([store] url).")
    action("check", _check, "say whether the PostgreSQL schema is current (exit 1 if not)"
           ).add_argument("--url", help="the database to check (default: [store] url)")
    action("migrate", _migrate, "bring the PostgreSQL schema up to date"
           ).add_argument("--url", help="the database to migrate (default: [store] url)")
    copy = action("copy", _copy, "copy users, aliases, mailboxes and the queue to another store",
                  description="Copy a whole store: domains, users (with their password "
                  "hashes), aliases, APOP secrets, the relay queue and every mailbox byte for "
                  "byte with its UIDLs, so POP3 clients that leave mail on the server do "
                  "not download it again. Stop the servers first. A store is a data "
                  "folder (its SQLite file, Maildirs and queue) or a postgresql:// URL.")
    copy.add_argument("--from", dest="source", required=True, metavar="DATA|URL")
    copy.add_argument("--to", dest="target", required=True, metavar="DATA|URL")


def _url(args: argparse.Namespace, ctx: Context) -> str:
    url = args.url or ctx.config.store.url
    if not url:
        raise ValueError("the store is in the data folder (no [store] url): it has no "
                         "schema to check; name a database with --url postgresql://...")
    return str(url)


def _check(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.store.pgconnect import connect, describe
    from postroom.store.pgschema import state

    url = _url(args, ctx)
    with connect(url) as conn:
        found = state(conn)
    ctx.say(f"{describe(url)}: {found.describe()}")
    return 0 if found.up_to_date else EXIT_NOT_CURRENT


def _migrate(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.store.pgconnect import connect, describe
    from postroom.store.pgschema import state
    from postroom.store.pgstore import prepare

    url = _url(args, ctx)
    prepare(url)
    with connect(url) as conn:
        ctx.say(f"{describe(url)}: {state(conn).describe()}")
    return 0


def _copy(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.storecopy import copy_store

    for line in copy_store(args.source, args.target):
        ctx.say(line)
    return 0
