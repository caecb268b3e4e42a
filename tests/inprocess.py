"""Servers run in the test's own event loop: a free loopback port, and `host`, a postroom
started from a config text with its users and aliases (server.main.start); the two
hosts of the seed's path (the provider isp.example relaying to corp.example), a
submission as smith@isp.example, and waiting for a Maildir to fill.

For the subprocess `postroom serve` see tests/server/serving.py; for real peers,
tests/interop/mailharness.py.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store

STOP_GRACE = 2.0  # seconds the sessions get when the host stops
WAIT = 30.0  # seconds `wait_for` waits
POLL = 0.05  # seconds between two looks at what `wait_for` waits for


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


def provider_config(corp_port: int) -> str:
    """isp.example's host: submission, and corp.example routed to `corp_port`."""
    return (
        'hostname = "mail.isp.example"\ndomains = ["isp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\nsubmission = "127.0.0.1:0"\n'
        f'[routes]\n"corp.example" = "127.0.0.1:{corp_port}"\n'
        '[queue]\nretry_after = ["1s"]\ngive_up_after = "1h"\n'
    )


def corp_config(port: int) -> str:
    """corp.example's MX on `port`."""
    return ('hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
            f'[listen]\nsmtp = "127.0.0.1:{port}"\n')


def submit(server: Running, rcpts: list[str], message: bytes) -> None:
    """smith@isp.example (password smith-secret) submits `message` with STARTTLS."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    address, port = server.address("submission")
    with smtplib.SMTP(address, port, timeout=WAIT) as client:
        client.starttls(context=context)
        client.login("smith@isp.example", "smith-secret")
        client.sendmail("smith@isp.example", rcpts, message)


def inbox(root: Path, domain: str, user: str) -> list[bytes]:
    """The messages in new/ of a user's Maildir under the data folder `root`."""
    folder = root / "mail" / domain / user / "new"
    return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


async def wait_for(predicate: Callable[[], object], timeout: float = WAIT) -> None:
    """Until `predicate()` is true (the servers run in this loop meanwhile)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(POLL)
