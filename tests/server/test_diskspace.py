"""Free space at MAIL FROM: 452 4.3.1 before a message that cannot fit is sent.

The rule is checked with an injected statvfs; the server's behaviour on a disk
that really is nearly full, with a small tmpfs of the test's own (which needs
root: skipped otherwise, a failure in CI).
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postroom.config import load_config
from postroom.server.diskspace import INSUFFICIENT_STORAGE, FreeSpace
from postroom.server.main import start
from postroom.store.factory import open_store

MiB = 1024 * 1024


def fake_statvfs(free: dict[str, int]) -> Callable[[str], os.statvfs_result]:
    def statvfs(path: str) -> os.statvfs_result:
        if path not in free:
            raise FileNotFoundError(path)
        # (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax)
        return os.statvfs_result((4096, 1, 0, 0, free[path], 0, 0, 0, 0, 255))

    return statvfs


def test_declared_size_plus_reserve_must_fit_on_every_filesystem(tmp_path: Path) -> None:
    mail, queue = tmp_path / "mail", tmp_path / "queue"
    space = FreeSpace((mail, queue), reserve=10 * MiB,
                      statvfs=fake_statvfs({str(mail): 50 * MiB, str(queue): 30 * MiB}))
    assert space.free() == 30 * MiB  # the fuller filesystem decides
    assert space.check(None) is None
    assert space.check(20 * MiB) is None
    assert space.check(20 * MiB + 1) == INSUFFICIENT_STORAGE
    assert str(INSUFFICIENT_STORAGE) == "452 4.3.1 Insufficient system storage"


def test_without_size_the_reserve_alone_decides(tmp_path: Path) -> None:
    space = FreeSpace((tmp_path,), reserve=10 * MiB,
                      statvfs=fake_statvfs({str(tmp_path): 10 * MiB - 1}))
    assert space.check(None) == INSUFFICIENT_STORAGE
    assert FreeSpace((tmp_path,), reserve=0,
                     statvfs=fake_statvfs({str(tmp_path): 0})).check(None) is None


def test_a_folder_not_made_yet_is_measured_on_its_parents_filesystem(tmp_path: Path) -> None:
    space = FreeSpace((tmp_path / "mail" / "not-yet",), reserve=1,
                      statvfs=fake_statvfs({str(tmp_path): 5}))
    assert space.free() == 5


# --- a real, nearly full filesystem --------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path, peer_missing: Callable[[str], None]) -> Iterator[Path]:
    """A 6 MiB tmpfs mounted for this test alone."""
    if os.geteuid() != 0:
        peer_missing("mounting a small tmpfs to fill needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        peer_missing(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        # Lazily: the stopped server's user directory may still hold its SQLite file
        # open until the connection is collected; the mount goes away with it.
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Write a file that leaves `leave` octets (rounded to blocks) free on `disk`."""
    st = os.statvfs(disk)
    with open(disk / f"filler{len(list(disk.glob('filler*')))}", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))
        f.flush()
        os.fsync(f.fileno())


def test_nearly_full_disk_refuses_at_mail_from(small_disk: Path) -> None:
    data = small_disk / "data"
    data.mkdir()
    (data / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\n[smtp]\nmin_free_space = "1M"\n')
    config = load_config(data)
    directory = open_store(config.store).users
    directory.add_user("boss@corp.example", "boss-secret")
    directory.close()
    big = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * (MiB // 80)  # about 1 MiB
    small = b"Subject: small\r\n\r\nfits\r\n"

    async def scenario() -> None:
        running = await start(config)
        try:
            host, port = running.address("smtp")

            def talk() -> None:
                with smtplib.SMTP(host, port, timeout=10) as client:
                    # smtplib declares SIZE= itself: 1 MiB does not fit beside the
                    # 1 MiB reserve in 1.5 MiB, and is refused before it is sent.
                    with pytest.raises(smtplib.SMTPSenderRefused) as info:
                        client.sendmail("a@b.example", ["boss@corp.example"], big)
                    assert (info.value.smtp_code, info.value.smtp_error) == (
                        452, b"4.3.1 Insufficient system storage")
                    client.sendmail("a@b.example", ["boss@corp.example"], small)
                    # Below the reserve, MAIL without SIZE is refused too.
                    fill(small_disk, leave=512 * 1024)
                    code, text = client.mail("a@b.example")
                    assert (code, text) == (452, b"4.3.1 Insufficient system storage")

            fill(small_disk, leave=3 * MiB // 2)
            await asyncio.to_thread(talk)
        finally:
            await running.stop(grace=2)

    asyncio.run(scenario())
    filed = list((data / "mail" / "corp.example" / "boss" / "new").iterdir())
    assert [p.read_bytes().endswith(small) for p in filed] == [True]
