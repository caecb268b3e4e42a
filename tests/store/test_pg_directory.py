"""The server's directory on PostgreSQL: cached answers, dropped when any node changes it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import psycopg
from argon2 import PasswordHasher

from postroom.store.api import StoreSettings
from postroom.store.pgdirectory import PGDirectory
from postroom.store.pgstore import open_pg_store
from postroom.store.pgusers import PGUserDirectory

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
SEEN_WITHIN = 1.0  # seconds: the bound for a change made on another node


async def until(condition: Callable[[], object], limit: float = 10.0) -> None:
    """Wait until `condition()` holds (polled), failing after `limit` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def settings(url: str) -> StoreSettings:
    return StoreSettings(Path("unused.sqlite3"), Path("unused-mail"), "mx.corp.example",
                         url=url)


async def changes_seen(url: str) -> None:
    node = open_pg_store(settings(url), hasher=CHEAP)  # a server node
    cli = PGUserDirectory(url, hasher=CHEAP)  # another node's command line
    directory = node.directory
    assert isinstance(directory, PGDirectory)
    node.start()
    try:
        await until(lambda: directory._listening)
        assert not directory.is_local_domain("corp.example")
        loop = asyncio.get_running_loop()

        async def change(action: Callable[[], None]) -> None:
            before = directory.changes
            started = loop.time()
            await asyncio.to_thread(action)
            await until(lambda: directory.changes > before)
            assert loop.time() - started < SEEN_WITHIN

        await change(lambda: cli.add_domain("corp.example"))
        assert directory.is_local_domain("corp.example")
        assert await directory.expand("boss@corp.example") is None  # cached now
        await change(lambda: cli.add_user("boss@corp.example", "one"))
        found = await directory.expand("boss@corp.example")
        assert found is not None and found.mailboxes == ("boss@corp.example",)
        assert await directory.verify_password("boss@corp.example", "one")
        await change(lambda: cli.set_password("boss@corp.example", "two"))
        assert await directory.verify_password("boss@corp.example", "two")
        await change(lambda: cli.add_user("it@corp.example", "x"))
        await change(lambda: cli.add_alias("sales@corp.example", ["boss@corp.example",
                                                                  "it@corp.example"]))
        found = await directory.expand("sales@corp.example")
        assert found is not None and found.mailboxes == ("boss@corp.example",
                                                         "it@corp.example")
        await change(lambda: cli.remove_alias("sales@corp.example", ["it@corp.example"]))
        found = await directory.expand("sales@corp.example")
        assert found is not None and found.mailboxes == ("boss@corp.example",)
        await change(lambda: cli.remove_user("it@corp.example"))
        assert await directory.expand("it@corp.example") is None
    finally:
        await node.stop()
        node.close()
        cli.close()


def test_a_change_on_one_node_is_seen_by_another_within_a_second(pg_url: str) -> None:
    asyncio.run(changes_seen(pg_url))


async def answers_without_notices(url: str) -> None:
    node = open_pg_store(settings(url), hasher=CHEAP)
    cli = PGUserDirectory(url, hasher=CHEAP)
    directory = node.directory
    assert isinstance(directory, PGDirectory)
    # Not started: no notices arrive, so nothing may be cached.
    cli.add_domain("corp.example")
    assert await directory.expand("boss@corp.example") is None
    cli.add_user("boss@corp.example", "pw")
    assert await directory.expand("boss@corp.example") is not None
    node.close()
    cli.close()


def test_without_notices_nothing_is_cached(pg_url: str) -> None:
    asyncio.run(answers_without_notices(pg_url))


def test_the_same_hashes_as_the_embedded_store(pg_url: str) -> None:
    open_pg_store(settings(pg_url)).close()
    cli = PGUserDirectory(pg_url)  # the real default parameters
    cli.add_domain("corp.example")
    cli.add_user("boss@corp.example", "pw")
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT password FROM users").fetchone()
    assert row is not None and str(row[0]).startswith("$argon2id$v=19$")
    cli.close()
