"""The server's directory: cached answers that see changes made by another process at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

from argon2 import PasswordHasher

from postroom.store.api import Directory
from postroom.store.cache import MAX_AGE, RECHECK_AFTER, CachedDirectory
from postroom.store.users import SQLiteUserDirectory

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_answers_and_notices_changes_from_another_connection(tmp_path: Path) -> None:
    db = tmp_path / "users.sqlite3"
    clock = Clock()
    lookups: Directory = CachedDirectory(SQLiteUserDirectory(db), clock=clock)
    assert not lookups.is_local_domain("corp.example")
    assert asyncio.run(lookups.expand("boss@corp.example")) is None

    cli_side = SQLiteUserDirectory(db)  # as `postroom domain add` would, separately
    cli_side.add_domain("corp.example")
    cli_side.add_user("boss@corp.example", "pw")
    assert not lookups.is_local_domain("corp.example")  # files not looked at again yet
    clock.now += 2 * RECHECK_AFTER  # past the interval between looks, within MAX_AGE
    assert lookups.is_local_domain("corp.example")
    expansion = asyncio.run(lookups.expand("boss@corp.example"))
    assert expansion is not None and expansion.mailboxes == ("boss@corp.example",)

    cli_side.remove_user("boss@corp.example")
    clock.now += 2 * RECHECK_AFTER  # past the interval between looks, within MAX_AGE
    assert asyncio.run(lookups.expand("boss@corp.example")) is None


def test_answers_expire_even_when_the_files_look_unchanged(tmp_path: Path) -> None:
    users = SQLiteUserDirectory(tmp_path / "users.sqlite3")
    clock = Clock()
    lookups = CachedDirectory(users, clock=clock)
    assert not lookups.is_local_domain("corp.example")
    users.add_domain("corp.example")
    # A commit the files do not show (a clock tick too coarse, a WAL reused at its size):
    stamp = lookups._stamp = tuple(lookups._stat(name) for name in lookups._files)
    clock.now += 2 * RECHECK_AFTER  # past the interval between looks, within MAX_AGE
    assert not lookups.is_local_domain("corp.example")  # same stamp: the old answer
    clock.now += MAX_AGE
    assert lookups.is_local_domain("corp.example")
    assert lookups._stamp == stamp


def test_the_config_domains_are_local_without_the_database(tmp_path: Path) -> None:
    users = SQLiteUserDirectory(tmp_path / "users.sqlite3", static_domains=["Static.Example"])
    users.add_domain("db.example")
    lookups = CachedDirectory(users)
    assert lookups.is_local_domain("static.example")
    assert lookups.is_local_domain("db.example")
    assert not lookups.is_local_domain("other.example")


def test_password_checks_go_through_the_gate(tmp_path: Path) -> None:
    users = SQLiteUserDirectory(tmp_path / "users.sqlite3", ["corp.example"], hasher=CHEAP)
    users.add_user("boss@corp.example", "right")
    asked: list[tuple[str, str]] = []

    async def gate(verify: Callable[[str, str], bool], address: str, password: str) -> bool:
        asked.append((address, password))
        return await asyncio.to_thread(verify, address, password)

    lookups = CachedDirectory(users, password_gate=gate)

    async def scenario() -> list[bool]:
        return [await lookups.verify_password("boss@corp.example", "right"),
                await lookups.verify_password("boss@corp.example", "wrong")]

    assert asyncio.run(scenario()) == [True, False]
    assert asked == [("boss@corp.example", "right"), ("boss@corp.example", "wrong")]


def test_without_a_gate_a_check_leaves_the_event_loop(tmp_path: Path) -> None:
    users = SQLiteUserDirectory(tmp_path / "users.sqlite3", ["corp.example"], hasher=CHEAP)
    users.add_user("boss@corp.example", "right")
    threads: list[threading.Thread] = []
    verify = users.verify_password

    def recording(address: str, password: str) -> bool:
        threads.append(threading.current_thread())
        return verify(address, password)

    users.verify_password = recording  # type: ignore[method-assign]
    assert asyncio.run(CachedDirectory(users).verify_password("boss@corp.example", "right"))
    assert threads and threads[0] is not threading.main_thread()
