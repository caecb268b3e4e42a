"""Group commit (MaildirMailboxes.commit): every message lands whole in each maildir's new/."""

from __future__ import annotations

import asyncio
import mailbox
import os
from pathlib import Path

import pytest

from postroom.store.commit import Delivery
from postroom.store.mailboxes import MaildirMailboxes


def test_one_message_to_several_maildirs_is_linked_once_each(tmp_path: Path) -> None:
    boxes = [tmp_path / "a", tmp_path / "b", tmp_path / "a"]

    async def scenario() -> list[Path]:
        committer = MaildirMailboxes(tmp_path / "mail", "mx.example")
        try:
            return await committer.commit(Delivery(boxes, [b"Subject: x\r\n", b"\r\nbody\r\n"]))
        finally:
            committer.close()

    paths = asyncio.run(scenario())
    assert paths[0] == paths[2] and paths[0] != paths[1]
    for path in paths:
        assert path.parent.name == "new"
        assert path.read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
        assert f",S={len(path.read_bytes())}" in path.name
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino  # hard links, one copy
    assert list((tmp_path / "a" / "tmp").iterdir()) == []
    assert [m["Subject"] for m in mailbox.Maildir(tmp_path / "b")] == ["x"]


def test_a_batch_of_concurrent_messages_all_land(tmp_path: Path) -> None:
    async def scenario() -> list[list[Path]]:
        committer = MaildirMailboxes(tmp_path / "mail", "mx.example")
        try:
            return await asyncio.gather(*(
                committer.commit(
                    Delivery([tmp_path / "box"], [b"Subject: %d\r\n\r\n" % n, b"x" * n]))
                for n in range(200)
            ))
        finally:
            committer.close()

    results = asyncio.run(scenario())
    names = {paths[0].name for paths in results}
    assert len(names) == 200
    for paths in results:
        data = paths[0].read_bytes()
        assert f",S={len(data)}," in paths[0].name
        n = int(data.split(b"\r\n")[0].split()[1])
        assert data.endswith(b"x" * n)


def test_a_failing_message_does_not_spoil_its_batch(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a maildir should be")

    async def scenario() -> tuple[BaseException | list[Path], ...]:
        committer = MaildirMailboxes(tmp_path / "mail", "mx.example")
        try:
            return tuple(await asyncio.gather(
                committer.commit(Delivery([tmp_path / "ok"], [b"good\r\n"])),
                committer.commit(Delivery([tmp_path / "ok2", blocked], [b"bad\r\n"])),
                return_exceptions=True,
            ))
        finally:
            committer.close()

    good, bad = asyncio.run(scenario())
    assert isinstance(good, list) and good[0].read_bytes() == b"good\r\n"
    assert isinstance(bad, OSError)
    # All or nothing: the copy already linked for the first maildir is gone again.
    assert list((tmp_path / "ok2" / "new").iterdir()) == []
    assert list((tmp_path / "ok2" / "tmp").iterdir()) == []


@pytest.mark.parametrize("pieces", [1, 3, 1000, 5000])
def test_many_pieces_are_written_completely(tmp_path: Path, pieces: int) -> None:
    """5000 pieces are more than one writev(2) takes (IOV_MAX, 1024 on Linux): a
    message under 512 KiB whose lines each came in a read of their own."""
    chunks = [bytes([65 + i % 26]) * 97 for i in range(pieces)]

    async def scenario() -> list[Path]:
        committer = MaildirMailboxes(tmp_path / "mail", "mx.example")
        try:
            return await committer.commit(Delivery([tmp_path / "box"], chunks))
        finally:
            committer.close()

    (path,) = asyncio.run(scenario())
    assert path.read_bytes() == b"".join(chunks)
