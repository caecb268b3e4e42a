"""Filing into a Maildir++ folder (Junk), and header lines inserted after a message spilled."""

from __future__ import annotations

import asyncio
import mailbox
from pathlib import Path

import pytest

from postroom.store.api import check_folder
from postroom.store.mailboxes import SPILL_AT, MaildirMailboxes

HEAD = b"Return-Path: <a@example.org>\r\n"
RECEIVED = b"Received: from x by mx.corp.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
BODY = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def store(tmp_path: Path) -> MaildirMailboxes:
    s = MaildirMailboxes(tmp_path / "mail", hostname="mx.corp.example")
    yield s
    s.close()


def file(store: MaildirMailboxes, body: bytes, late: bytes = b"", folder: str | None = None,
         boxes: tuple[str, ...] = ("boss@corp.example",)) -> list[str]:
    async def go() -> list[str]:
        message = store.receive(HEAD)
        message.write(RECEIVED)
        for i in range(0, len(body), 65536):
            message.write(body[i : i + 65536])
        if late:
            assert message.insert_head(late)
        assert b"".join(message.chunks()) == RECEIVED + late + body
        try:
            return await message.deliver(boxes, folder)
        finally:
            message.abort()
    return asyncio.run(go())


def test_junk_folder_is_maildirplus_and_dovecot_layout(store: MaildirMailboxes) -> None:
    names = file(store, BODY, folder="Junk", boxes=("boss@corp.example", "ceo@corp.example"))
    for box in ("boss", "ceo"):
        top = store.mail_dir / "corp.example" / box
        junk = top / ".Junk"
        assert (junk / "new" / names[0]).read_bytes() == HEAD + RECEIVED + BODY
        assert (junk / "maildirfolder").is_file()
        for sub in ("new", "cur", "tmp"):
            assert (top / sub).is_dir()  # the mailbox itself exists too
        assert list((top / "new").iterdir()) == []  # the inbox got nothing
        # Python's Maildir (Maildir++ aware) sees the folder and the message in it.
        md = mailbox.Maildir(top, create=False)
        assert md.list_folders() == ["Junk"]
        assert len(md.get_folder("Junk")) == 1


@pytest.mark.parametrize("name", ["", ".", "..", "a..b", ".Junk", "Junk.", "a/b", "x\ny", "\\x"])
def test_folder_names_that_could_escape_are_refused(store: MaildirMailboxes, name: str) -> None:
    with pytest.raises(ValueError):
        check_folder(name)
    with pytest.raises(ValueError):
        file(store, BODY, folder=name)
    assert not (store.mail_dir / "corp.example").exists()  # nothing filed anywhere


def test_nested_folder_name_is_kept() -> None:
    assert check_folder("Archive.2026") == "Archive.2026"


@pytest.mark.parametrize("size", [100, SPILL_AT + 300_000], ids=["in memory", "spilled"])
def test_header_inserted_late_lands_after_the_first_piece(store: MaildirMailboxes,
                                                          size: int) -> None:
    body = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * (size // 80 + 1)
    late = b"Authentication-Results: mx.corp.example; spf=pass\r\n"
    names = file(store, body, late=late)
    path = store.mail_dir / "corp.example" / "boss" / "new" / names[0]
    assert path.read_bytes() == HEAD + RECEIVED + late + body
    assert ",S=" in names[0] and int(names[0].split(",S=")[1].split(",")[0]) == path.stat().st_size
    spooled = list(store.spool_dir.iterdir()) if store.spool_dir.exists() else []
    assert spooled == []  # no spool file left behind
