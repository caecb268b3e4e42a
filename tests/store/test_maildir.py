"""Maildir delivery: unique names, exact S= sizes, atomic and durable commits, readers agree."""

from __future__ import annotations

import errno
import mailbox
import multiprocessing
import os
import re
import stat
import time
from pathlib import Path

import pytest

from durable_order import assert_durable, install_recorder
from postroom.store.commit import MessageWriter, commit
from postroom.store.mailboxes import MaildirMailboxes
from postroom.store.maildir import (
    ensure_maildir,
    escape_hostname,
    list_messages,
    unique_name,
)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Boss <boss@corp.example>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b"\r\n"
    b".. a line that was dot-stuffed on the wire\r\n"
    b"Last line without trailing text\r\n"
)

NAME_RE = re.compile(
    r"(?P<secs>\d+)\.M(?P<usec>\d+)P(?P<pid>\d+)Q(?P<q>\d+)R(?P<r>[0-9a-f]+)"
    r"\.(?P<host>[^,:/]+),S=(?P<s>\d+),W=(?P<w>\d+)"
)


@pytest.fixture
def store(tmp_path: Path) -> MaildirMailboxes:
    return MaildirMailboxes(tmp_path / "mail", hostname="mx.corp.example")


def spool(store: MaildirMailboxes) -> MessageWriter:
    return MessageWriter(store.spool_dir, store.hostname)


def file(writer: MessageWriter, maildirs: list[Path]) -> list[Path]:
    """A batch of one, as the group commit files it: the copies, or the error raised."""
    delivery = writer.delivery(maildirs)
    commit([delivery], "mx.corp.example")
    if delivery.error is not None:
        raise delivery.error
    return delivery.paths()


def deliver(store: MaildirMailboxes, data: bytes, *addresses: str) -> list[Path]:
    writer = spool(store)
    try:
        for i in range(0, len(data), 7):  # several writes, as the server makes them
            writer.write(data[i : i + 7])
        assert writer.size == len(data)
        return file(writer, [store.maildir_for(a) for a in addresses])
    finally:
        writer.abort()


# -- names -----------------------------------------------------------------------


def test_unique_name_format_and_hostname_escaping() -> None:
    name = unique_name("odd/host:name,x", size=123)
    m = NAME_RE.fullmatch(name)
    assert m, name
    assert m["host"] == r"odd\057host\072name\054x"
    assert m["pid"] == str(os.getpid())
    assert m["s"] == m["w"] == "123"
    assert abs(int(m["secs"]) - time.time()) < 60
    assert escape_hostname("a/b:c") == r"a\057b\072c"


def test_unique_name_w_is_the_size_as_sent_when_given() -> None:
    assert unique_name("h", size=10).endswith(",S=10,W=10")
    assert unique_name("h", size=10, sent=12).endswith(",S=10,W=12")


def test_unique_names_within_a_process() -> None:
    names = [unique_name("h") for _ in range(5000)]
    assert len(set(names)) == len(names)


def _names_in_child(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([unique_name("h") for _ in range(200)])


def test_unique_names_across_processes() -> None:
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_names_in_child, args=(queue,)) for _ in range(3)]
    for p in procs:
        p.start()
    names = [name for _ in procs for name in queue.get(timeout=30)]
    for p in procs:
        p.join(timeout=30)
    names += [unique_name("h") for _ in range(200)]
    assert len(set(names)) == len(names) == 800


def test_list_messages_reads_the_names(tmp_path: Path) -> None:
    """Sizes, UIDL basis and order come from the name: postroom's, with flags, and another
    MDA's (no S=/W=: stat(2))."""
    box = tmp_path / "box"
    ensure_maildir(box)
    ours = box / "cur" / r"1700000000.M12345P99Q3Rab12.mx\072x,S=1234,W=1260:2,RS"
    earlier = box / "cur" / "1700000000.M345P9.h,S=4:2,"
    foreign = box / "new" / "1234.5678_1.host"
    for path in (ours, earlier, foreign):
        path.write_bytes(b"x: y")
    listed = list_messages(box)
    assert [e.path for e in listed] == [foreign, earlier, ours]
    assert (listed[2].size, listed[2].exact, listed[2].crlf) == (1260, True, False)
    assert listed[2].uid_base_name == r"1700000000.M12345P99Q3Rab12.mx\072x"
    assert (listed[1].size, listed[1].exact) == (4, False)
    assert (listed[0].size, listed[0].exact, listed[0].uid_base_name) == (4, False, foreign.name)


# -- locations and path tricks -------------------------------------------------------


def test_maildir_location(store: MaildirMailboxes) -> None:
    assert store.maildir_for("boss@corp.example") == store.mail_dir / "corp.example" / "boss"
    assert store.maildir_for("Boss.Man@corp.example").name == "Boss.Man"


@pytest.mark.parametrize(
    "address",
    [
        "../evil@corp.example",
        "a/b@corp.example",
        "..@corp.example",
        ".hidden@corp.example",
        "a\\b@corp.example",
        "a\0b@corp.example",
        "@corp.example",
        "boss@Corp.Example",
        "boss@corp.example.",
        "boss@../../etc",
        "boss@corp/example",
        "boss@[127.0.0.1]",
        "no-at-sign",
    ],
)
def test_path_tricks_refused(store: MaildirMailboxes, address: str) -> None:
    with pytest.raises(ValueError):
        store.maildir_for(address)


def test_ensure_maildir_makes_private_folders(tmp_path: Path) -> None:
    box = tmp_path / "mail" / "corp.example" / "boss"
    assert ensure_maildir(box) is True
    for sub in ("cur", "new", "tmp"):
        assert stat.S_IMODE((box / sub).stat().st_mode) == 0o700
    assert stat.S_IMODE(box.stat().st_mode) == 0o700
    assert ensure_maildir(box) is False


# -- delivery --------------------------------------------------------------------


def test_commit_stores_exact_bytes_and_size(store: MaildirMailboxes) -> None:
    (path,) = deliver(store, MESSAGE, "boss@corp.example")
    assert path.parent == store.mail_dir / "corp.example" / "boss" / "new"
    assert path.read_bytes() == MESSAGE
    m = NAME_RE.fullmatch(path.name)
    assert m, path.name
    assert int(m["s"]) == len(MESSAGE) == path.stat().st_size
    assert m["host"] == "mx.corp.example"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(store.spool_dir.iterdir()) == []


def test_python_mailbox_reads_message_back(store: MaildirMailboxes) -> None:
    deliver(store, MESSAGE, "boss@corp.example")
    box = mailbox.Maildir(store.maildir_for("boss@corp.example"), factory=None, create=False)
    keys = box.keys()
    assert len(keys) == 1
    assert box.get_bytes(keys[0]) == MESSAGE
    msg = box[keys[0]]
    assert msg["Subject"] == "quarterly numbers"
    assert msg.get_subdir() == "new"


def test_new_never_sees_a_partial_file(
    store: MaildirMailboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.maildir_for("boss@corp.example")
    recorder = install_recorder(monkeypatch)
    writer = spool(store)
    writer.write(MESSAGE[:20])
    assert not (box / "new").exists() or list((box / "new").iterdir()) == []
    writer.write(MESSAGE[20:])
    (path,) = file(writer, [box])
    # The file is synced before it is linked, and new/ after: only then may 250 be sent.
    assert_durable(recorder.log, recorder.note("committed"), published=[path])
    assert path.read_bytes() == MESSAGE


def test_several_recipients_share_one_inode(store: MaildirMailboxes) -> None:
    paths = deliver(store, MESSAGE, "a@corp.example", "b@corp.example", "c@other.example")
    assert len({p.parent for p in paths}) == 3
    inodes = {p.stat().st_ino for p in paths}
    assert len(inodes) == 1
    assert paths[0].stat().st_nlink == 3  # the spool file is gone; three names remain
    assert all(p.read_bytes() == MESSAGE for p in paths)


def test_same_maildir_twice_gets_one_copy(store: MaildirMailboxes) -> None:
    paths = deliver(store, MESSAGE, "a@corp.example", "a@corp.example")
    assert paths[0] == paths[1]
    assert len(list(paths[0].parent.iterdir())) == 1


@pytest.mark.parametrize("error", [errno.EXDEV, errno.EMLINK, errno.EPERM])
def test_copy_fallback_when_links_fail(
    store: MaildirMailboxes, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    recorder = install_recorder(monkeypatch)
    recorder.fail("link", lambda call: OSError(error, os.strerror(error)))
    paths = deliver(store, MESSAGE, "a@corp.example", "b@corp.example")
    assert_durable(recorder.log, recorder.note("committed"), published=paths)
    for p in paths:
        assert p.parent.name == "new"
        assert p.read_bytes() == MESSAGE
        assert list((p.parent.parent / "tmp").iterdir()) == []
    assert paths[0].stat().st_ino != paths[1].stat().st_ino
    assert list(store.spool_dir.iterdir()) == []


def test_failed_commit_removes_partial_deliveries(
    store: MaildirMailboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = install_recorder(monkeypatch)
    links = []

    def second_link_fails(call: object) -> OSError | None:
        links.append(call)
        return OSError(errno.ENOSPC, "No space left on device") if len(links) == 2 else None

    recorder.fail("link", second_link_fails)
    writer = spool(store)
    writer.write(MESSAGE)
    boxes = [store.maildir_for("a@corp.example"), store.maildir_for("b@corp.example")]
    with pytest.raises(OSError):
        file(writer, boxes)
    assert list((boxes[0] / "new").iterdir()) == []  # all or nothing: no duplicate on retry
    paths = file(writer, boxes)  # the retry delivers once to each
    assert [len(list((b / "new").iterdir())) for b in boxes] == [1, 1]
    assert all(p.read_bytes() == MESSAGE for p in paths)
    writer.abort()
    assert list(store.spool_dir.iterdir()) == []


def test_abort_cleans_up_and_is_idempotent(store: MaildirMailboxes) -> None:
    writer = spool(store)
    writer.write(MESSAGE)
    spool_file = writer.path
    assert spool_file.exists() and spool_file.parent.parent == store.mail_dir  # link(2) works
    writer.abort()
    writer.abort()
    assert not spool_file.exists()
    with pytest.raises(ValueError):
        writer.write(b"more")
    with pytest.raises(ValueError):
        writer.delivery([store.maildir_for("a@corp.example")])


def test_abort_after_commit_keeps_the_message(store: MaildirMailboxes) -> None:
    writer = spool(store)
    writer.write(MESSAGE)
    (path,) = file(writer, [store.maildir_for("a@corp.example")])
    writer.abort()
    assert path.read_bytes() == MESSAGE


def test_clean_removes_only_stale_spool_files(store: MaildirMailboxes) -> None:
    store.spool_dir.mkdir(parents=True)
    old = store.spool_dir / "old"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 40 * 3600,) * 2)
    fresh = store.spool_dir / "fresh"
    fresh.write_bytes(b"x")
    assert store.clean() == 1
    assert not old.exists() and fresh.exists()


def test_clean_removes_stale_tmp_files_of_every_mailbox(store: MaildirMailboxes) -> None:
    # A delivery killed between tmp/ and new/ leaves its file; after 36 hours it is
    # abandoned (as Dovecot takes it), and a younger one may still be in progress.
    boxes = [store.maildir_for(a) for a in ("boss@corp.example", "jörg@isp.example")]
    stale = []
    for box in boxes:
        ensure_maildir(box)
        old = box / "tmp" / "1700000000.M1P1Q1.host,S=5,W=5"
        old.write_bytes(b"half ")
        os.utime(old, (time.time() - 37 * 3600,) * 2)
        stale.append(old)
        (box / "tmp" / "fresh").write_bytes(b"in progress")
        (box / "new" / "old-but-delivered").write_bytes(b"mail")
        os.utime(box / "new" / "old-but-delivered", (time.time() - 40 * 3600,) * 2)
    store.spool_dir.mkdir()
    assert store.clean() == 2
    assert not any(p.exists() for p in stale)
    assert all((b / "tmp" / "fresh").exists() and (b / "new" / "old-but-delivered").exists()
               for b in boxes)
    assert store.clean() == 0


# -- listing for POP3 --------------------------------------------------------------


def test_list_messages(store: MaildirMailboxes) -> None:
    box = store.maildir_for("boss@corp.example")
    first = deliver(store, b"A: 1\r\n\r\none\r\n", "boss@corp.example")[0]
    second = deliver(store, b"A: 2\r\n\r\ntwo two\r\n", "boss@corp.example")[0]
    # A message another program moved to cur/ with flags, and one with a foreign name.
    seen = box / "cur" / (second.name + ":2,S")
    second.rename(seen)
    foreign = box / "new" / "1.foreign.host"
    foreign.write_bytes(b"X: y\r\n\r\n")
    (box / "new" / ".hidden").write_bytes(b"not a message")

    entries = list_messages(box)
    assert [e.path for e in entries] == [foreign, first, seen]
    sizes = {e.path: e.size for e in entries}
    assert sizes[first] == first.stat().st_size
    assert sizes[seen] == seen.stat().st_size
    assert sizes[foreign] == 8
    by_path = {e.path: e for e in entries}
    assert by_path[seen].uid_base_name == second.name.split(",")[0]
    assert list_messages(store.maildir_for("nobody@corp.example")) == []
    # postroom's own names say "no bare LF" (W= equals S=); a foreign name says nothing.
    assert by_path[first].crlf and by_path[seen].crlf and not by_path[foreign].crlf


def test_list_messages_sizes_are_what_pop3_sends(tmp_path: Path) -> None:
    """A file stored with LF line ends (as Dovecot's LDA stores) names both sizes:
    S= on disk, W= with CRLF. POP3 sends CRLF, so W= is its size (RFC 1939 11)."""
    box = tmp_path / "box"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    lf = b"Subject: lf\n\nbody\n"
    (box / "new" / f"1.M1P1.host,S={len(lf)},W={len(lf) + 3}").write_bytes(lf)
    (box / "new" / "2.M2P2.host,S=5").write_bytes(b"a\r\nb\n")
    lf_entry, s_only = list_messages(box)
    assert (lf_entry.size, lf_entry.crlf) == (len(lf) + 3, False)
    assert (s_only.size, s_only.crlf) == (5, False)


def test_a_failed_spool_write_is_never_filed(
    store: MaildirMailboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part of the buffer may be on disk: the message must not be committed later."""
    recorder = install_recorder(monkeypatch)
    recorder.fail("write", lambda call: OSError(errno.ENOSPC, "No space left on device"))
    writer = spool(store)
    writer.write(MESSAGE)
    with pytest.raises(OSError):
        writer.flush()
    recorder.fail("write", lambda call: None)
    with pytest.raises(OSError):
        file(writer, [store.maildir_for("a@corp.example")])
    assert not (store.maildir_for("a@corp.example") / "new").exists()
    writer.abort()
    assert list(store.spool_dir.iterdir()) == []
