"""Servers run in the test's own event loop: a free loopback port, and `host`, a postroom
started from a config text with its users and aliases (server.main.start).

For the subprocess `postroom serve` see tests/server/serving.py; for real peers,
tests/interop/mailharness.py.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store

STOP_GRACE = 2.0  # seconds the sessions get when the host stops


def free_port() -> int:
    """A loopback TCP port no one listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def host(root: Path, text: str, users: dict[str, str],
               aliases: dict[str, list[str]] | None = None) -> AsyncIterator[Running]:
    """A server on the data folder `root` (made if missing) with `text` as its config
    file, `users` by address with their passwords, and `aliases`."""
    root.mkdir(exist_ok=True)
    (root / "postroom.toml").write_text(text)
    config = load_config(root)
    directory = open_store(config.store).users
    for address, password in users.items():
        directory.add_user(address, password)
    for source, targets in (aliases or {}).items():
        directory.add_alias(source, targets)
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=STOP_GRACE)
