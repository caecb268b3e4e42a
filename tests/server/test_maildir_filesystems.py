"""Maildirs on two filesystems: mail for both is filed, whatever its size (a real tmpfs mount).

An administrator who moves one mailbox to another disk and leaves a symlink
in its place has maildirs on two filesystems, between which link(2) fails
with EXDEV. The message is then copied instead (postroom.store.durable), for
messages held in memory and for spooled ones alike. Needs root to mount a
tmpfs: skipped without it, a failure in CI.
"""

from __future__ import annotations

import asyncio
import mailbox
import os
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postroom.config import load_config
from postroom.server.main import start
from postroom.store.factory import open_store
from postroom.store.mailboxes import SPILL_AT

BOSS, ALICE = "boss@corp.example", "alice@corp.example"


@pytest.fixture
def other_filesystem(tmp_path: Path, peer_missing: Callable[[str], None]) -> Iterator[Path]:
    """A tmpfs mounted for this test: a filesystem of its own."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        peer_missing("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        peer_missing(f"cannot mount a tmpfs: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def message(size: int) -> bytes:
    line = b"0123456789" * 7 + b"\r\n"
    return b"From: smith@isp.example\r\nSubject: two disks\r\n\r\n" + line * (size // len(line))


@pytest.mark.parametrize("size", [10_000, SPILL_AT + 100_000], ids=["in memory", "spooled"])
@pytest.mark.parametrize("recipients", [[BOSS, ALICE], [ALICE, BOSS]],
                         ids=["disk first", "tmpfs first"])
def test_one_message_to_maildirs_on_two_filesystems(
    tmp_path: Path, other_filesystem: Path, size: int, recipients: list[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\n')
    config = load_config(data)
    directory = open_store(config.store).users
    directory.add_user(BOSS, "boss-secret")
    directory.add_user(ALICE, "alice-secret")
    # alice's mailbox was moved to the other disk; a symlink stands in its place.
    (other_filesystem / "alice").mkdir()
    domain = config.mail_dir / "corp.example"
    domain.mkdir(parents=True)
    (domain / "alice").symlink_to(other_filesystem / "alice")
    assert os.stat(other_filesystem).st_dev != os.stat(data).st_dev
    sent = message(size)

    async def scenario() -> tuple[int, bytes]:
        running = await start(config)
        try:
            def send() -> tuple[int, bytes]:
                with smtplib.SMTP(*running.address("smtp"), timeout=10) as client:
                    client.ehlo("client.example")
                    client.mail("smith@isp.example")
                    for rcpt in recipients:
                        assert client.rcpt(rcpt)[0] == 250
                    return client.data(sent)

            return await asyncio.to_thread(send)
        finally:
            await running.stop(grace=2)

    code, text = asyncio.run(scenario())
    assert code == 250, text
    copies = []
    for user in ("boss", "alice"):
        box = domain / user
        files = list((box / "new").iterdir())
        assert len(files) == 1, files
        assert files[0].read_bytes().endswith(sent)
        assert list((box / "tmp").iterdir()) == []
        assert len(mailbox.Maildir(box, create=False)) == 1
        copies.append(os.stat(files[0]))
    assert copies[0].st_dev != copies[1].st_dev  # one copy on each filesystem
    assert list((config.mail_dir / ".spool").glob("*")) == []
