"""The POP3 maildrop index (store.dropindex): used when the folders are unchanged, updated
with only what changed, rebuilt when missing, corrupt or stale, and never trusted over
the files; and the UIDLs and sizes are those of a full listing, message for message."""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from durable_order import install_recorder
from postroom.store import dropindex, maildir
from postroom.store.dropindex import INDEX_NAME, file_sent_size, uid_for
from postroom.store.maildir import list_messages
from postroom.store.maildrop import Maildrop

LONG_HOST = "mx." + "very-long-label." * 6 + "example"  # names past RFC 1939's 70 characters


def crlf_message(n: int) -> bytes:
    return f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A Maildir with new/ and cur/ files, flags, bare-LF files under other MDAs'
    names (no W=, or nothing), and long host names (UIDLs that are digests)."""
    box = tmp_path / "box"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    for n in range(1, 7):
        data = crlf_message(n)
        host = LONG_HOST if n % 3 == 0 else "mx.corp.example"
        sub, flags = ("cur", ":2,S") if n % 2 else ("new", "")
        (box / sub / f"{1000 + n}.M{n}P1Q{n}.{host},S={len(data)},W={len(data)}{flags}"
         ).write_bytes(data)
    lf = b"Subject: lf\n\nbare LF body\n"
    (box / "new" / f"1010.M1P9.other,S={len(lf)}").write_bytes(lf)
    (box / "cur" / "1011.M2P9.other:2,RS").write_bytes(lf)
    (box / "new" / f"1012.M3P9.{LONG_HOST}").write_bytes(lf + b"no end of line")
    settle(box)
    return box


_settled = iter(range(10**6))


def settle(box: Path) -> None:
    """Date new/ and cur/ a minute back, each time to another second: a maildrop
    last changed a while ago (dropindex lists a folder changed just now anyway)."""
    when = time.time() - 600 + next(_settled)
    for sub in ("new", "cur"):
        os.utime(box / sub, (when, when))


def reference(box: Path) -> list[tuple[int, str]]:
    """(size, UIDL) of each message as postroom computed them before the index:
    a full listing, the file read for names without W=."""
    found = []
    for entry in list_messages(box):
        size = entry.size if entry.exact else file_sent_size(entry.path)[0]
        found.append((size, uid_for(entry.uid_base_name)))
    return found


def snapshot(box: Path) -> list[tuple[int, str]]:
    drop = Maildrop.open(box)
    try:
        return list(zip(drop.sizes, drop.uids, strict=True))
    finally:
        drop.close()


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The file names dropindex parses (maildir.scan_name), in order."""
    names: list[str] = []
    real = maildir.scan_name

    def counting(folder: Path, name: str) -> object:
        names.append(name)
        return real(folder, name)

    monkeypatch.setattr("postroom.store.dropindex.scan_name", counting)
    yield names


def test_uidls_and_sizes_are_the_same_with_and_without_the_index(box: Path) -> None:
    expected = reference(box)
    assert any(len(uid) == 40 and "." not in uid for _size, uid in expected)  # digests
    assert not (box / INDEX_NAME).exists()
    assert snapshot(box) == expected  # no index: built from the files
    assert (box / INDEX_NAME).is_file()
    assert snapshot(box) == expected  # from the index
    settle(box)
    assert snapshot(box) == expected  # folders changed: listed again, nothing parsed


def test_a_login_on_unchanged_folders_reads_only_the_index(
    box: Path, parsed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = snapshot(box)
    assert len(parsed) == 9
    parsed.clear()

    def no_listing(path: object) -> list[str]:
        raise AssertionError(f"listed {path}")

    monkeypatch.setattr(os, "listdir", no_listing)
    assert snapshot(box) == expected
    assert parsed == []


def test_only_new_names_are_parsed_and_moved_ones_keep_their_uidl(
    box: Path, parsed: list[str]
) -> None:
    snapshot(box)
    parsed.clear()
    data = crlf_message(99)
    new_name = f"2000.M9P1Q99.mx.corp.example,S={len(data)},W={len(data)}"
    (box / "new" / new_name).write_bytes(data)
    # Another reader (mutt, Dovecot) files a bare-LF message in cur/ with flags:
    # its size is not in its name, and it is not read again.
    moved = box / "new" / next(n for n in os.listdir(box / "new") if n.startswith("1010."))
    moved.rename(box / "cur" / f"{moved.name}:2,S")
    settle(box)
    assert snapshot(box) == reference(box)
    assert parsed == [new_name]
    parsed.clear()
    assert snapshot(box) == reference(box) and parsed == []


def test_files_gone_behind_the_index_leave_the_snapshot(box: Path) -> None:
    snapshot(box)
    gone = next((box / "cur").iterdir())
    gone.unlink()
    settle(box)
    listed = snapshot(box)
    assert listed == reference(box) and len(listed) == 8


def test_a_folder_changing_now_is_listed_at_the_next_login(box: Path) -> None:
    """A folder's time may not change for a delivery within the same clock tick:
    one changed within CHANGING_SECS is recorded as unknown, never trusted."""
    snapshot(box)
    data = crlf_message(50)
    (box / "new" / f"3000.M1P1Q50.mx.corp.example,S={len(data)},W={len(data)}"
     ).write_bytes(data)
    before = snapshot(box)  # new/ changed just now: listed, and recorded as unknown
    assert "new=-" in (box / INDEX_NAME).read_text().splitlines()[0]
    # A delivery that leaves the folder's time as it was is still found.
    stat = os.stat(box / "new")
    (box / "new" / f"3001.M1P1Q51.mx.corp.example,S={len(data)},W={len(data)}"
     ).write_bytes(data)
    os.utime(box / "new", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = snapshot(box)
    assert len(after) == len(before) + 1 and after == reference(box)


@pytest.mark.parametrize("damage", [
    "missing", "empty", "garbage", "truncated", "bad uid", "bad size", "other format",
    "count", "outside the maildir",
])
def test_a_missing_or_corrupt_index_is_rebuilt_from_the_files(box: Path, damage: str) -> None:
    expected = snapshot(box)
    index = box / INDEX_NAME
    text = index.read_text()
    lines = text.split("\n")  # head, seconds, microseconds, sizes, flags, UIDLs, names
    if damage == "missing":
        index.unlink()
    elif damage == "empty":
        index.write_text("")
    elif damage == "garbage":
        index.write_bytes(os.urandom(300))
    elif damage == "truncated":
        index.write_text(text[: len(text) - 10])
    elif damage == "bad uid":
        lines[5] = lines[5].replace(" ", " bad\x01uid ", 1).replace(" ", "", 1)
        index.write_text("\n".join(lines))
    elif damage == "bad size":
        lines[3] = "-5" + lines[3][lines[3].index(" "):]
        index.write_text("\n".join(lines))
    elif damage == "other format":
        index.write_text(text.replace("postroom-uidlist 1", "postroom-uidlist 2", 1))
    elif damage == "count":
        index.write_text("\n".join([*lines[:6], *lines[7:]]))  # a name fewer than UIDLs
    elif damage == "outside the maildir":
        lines[6] = "../../etc/passwd"
        index.write_text("\n".join(lines))
    assert snapshot(box) == expected
    assert dropindex.read_index(index).uids == [uid for _size, uid in expected]


def test_an_index_of_other_files_never_wins_over_the_files(box: Path, tmp_path: Path) -> None:
    """An index copied from another maildrop (a restored backup, say): its folders'
    times and inodes are not these, so the folders are listed and the files decide."""
    other = tmp_path / "other"
    for sub in ("new", "cur", "tmp"):
        (other / sub).mkdir(parents=True)
    ghost = crlf_message(7)
    (other / "new" / f"1.M1P1Q1.mx.ghost.example,S={len(ghost)},W={len(ghost)}"
     ).write_bytes(ghost)
    settle(other)
    snapshot(other)
    (box / INDEX_NAME).write_bytes((other / INDEX_NAME).read_bytes())
    assert snapshot(box) == reference(box)
    assert "ghost" not in (box / INDEX_NAME).read_text()


def test_retr_of_a_file_gone_behind_the_index_says_it_was_removed(box: Path) -> None:
    snapshot(box)
    drop = Maildrop.open(box)  # from the index: nothing listed
    try:
        drop.path(1).unlink()
        assert drop.read_chunks(1) is None  # answered "-ERR [SYS/PERM] ... removed"
        assert b"".join(drop.read_chunks(2) or []) == drop.path(2).read_bytes()
    finally:
        drop.close()


def test_quit_moves_are_followed_without_parsing(box: Path, parsed: list[str]) -> None:
    """RETR files a message in cur/ at QUIT (a rename): the next login finds it
    there with the same UIDL and size, parsing no name."""
    expected = snapshot(box)
    parsed.clear()
    drop = Maildrop.open(box)
    try:
        for number in range(1, len(drop.sizes) + 1):
            drop.read_chunks(number)
        assert drop._apply([]) == 0
    finally:
        drop.close()
    assert os.listdir(box / "new") == []
    settle(box)
    assert snapshot(box) == expected and parsed == []


def test_close_lets_go_of_the_snapshot(box: Path) -> None:
    drop = Maildrop.open(box)
    assert len(drop.sizes) == 9
    drop.close()
    assert len(drop.sizes) == 0 and len(drop.uids) == 0


def test_the_index_is_replaced_whole_after_a_data_sync(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader sees the old index or the new one, never half of one: written to a
    temporary name, its data synced, then renamed over the old."""
    recorder = install_recorder(monkeypatch)
    snapshot(box)
    calls = [(c.name, c.path.name if c.path else None, c.dst.name if c.dst else None)
             for c in recorder.log]
    temp = dropindex.INDEX_TEMP
    assert calls[-4:] == [("create", temp, None), ("write", temp, None),
                          ("datasync", temp, None), ("rename", temp, INDEX_NAME)]
    assert calls[:-4] in ([], [("unlink", temp, None)])  # what a crash may have left
    assert not (box / temp).exists()


@pytest.mark.parametrize("base", [
    "1.M2P3.host", "x" * 70, "x" * 71, "with space", "tab\there", "del\x7f", "caf\u00e9",
    "bad\udcff", "!~", "",
])
def test_a_uidl_is_the_base_name_exactly_when_rfc_1939_allows_it(base: str) -> None:
    allowed = 1 <= len(base) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in base)
    uid = uid_for(base)
    if allowed:
        assert uid == base
    else:
        assert len(uid) == 40 and int(uid, 16) >= 0  # a digest of the name


def test_a_file_with_an_empty_base_name_still_gets_a_uidl(tmp_path: Path) -> None:
    """A file named only by its flags (":2,S") left a login with an empty unique-id,
    which RFC 1939 7 forbids and the POP3 core refused."""
    from postroom.protocol.pop3_snapshot import Snapshot

    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "cur" / ":2,S").write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    drop = Maildrop.open(tmp_path)
    try:
        assert Snapshot(drop.sizes, drop.uids).uids == [uid_for(":2,S".partition(":")[0])]
        assert len(drop.uids[0]) == 40
    finally:
        drop.close()


def test_a_session_holds_a_few_blocks_not_one_per_message(tmp_path: Path) -> None:
    """The snapshot's names and UIDLs are each one string and an array of offsets:
    freed small strings would leave the interpreter's arenas, and so the process's
    memory, partly used after the session (BENCHMARKS.md, POP3 login on a big
    maildrop). Counted for a first login (no index) and a second (the index)."""
    count = 20_000
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    data = crlf_message(1)
    for n in range(count):
        sub = ("new", "cur")[n % 2]
        name = f"{1000 + n}.M{n}P1Q{n}.mx.corp.example,S={len(data)},W={len(data)}"
        if n % 100 == 0:
            name = f"{1000 + n}.M{n}P1Q{n}.{LONG_HOST},S={len(data)},W={len(data)}"
        os.close(os.open(tmp_path / sub / (name + (":2,S" if sub == "cur" else "")),
                         os.O_WRONLY | os.O_CREAT, 0o600))
    settle(tmp_path)
    expected = reference(tmp_path)
    for login in ("first", "second"):
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            drop = Maildrop.open(tmp_path)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        try:
            held = sum(diff.count_diff for diff in after.compare_to(before, "filename")
                       if "postroom" in diff.traceback[0].filename)
            assert held < 100, f"{login} login: {held} blocks held for {count} messages"
            assert isinstance(drop.listing.names, dropindex.Packed)
            assert isinstance(drop.listing.uids, dropindex.Packed)
            assert list(zip(drop.sizes, drop.uids, strict=True)) == expected
            assert drop.path(count).name.startswith(f"{1000 + count - 1}.")
        finally:
            drop.close()
    assert (tmp_path / INDEX_NAME).is_file()


def test_packed_strings_read_as_a_list_of_them() -> None:
    items = ["new/1.a", "", "cur/caf\u00e9:2,S", "bad\udcff", "x" * 300]
    packed = dropindex.Packed(items)
    assert len(packed) == 5 and list(packed) == items and packed == items
    assert [packed[i] for i in range(-5, 5)] == items + items
    assert packed[1:4] == items[1:4] and packed[::-2] == items[::-2]
    assert packed == dropindex.Packed(iter(items)) and packed != items[:4]
    assert dropindex.Packed(["ab", "c"]) != dropindex.Packed(["a", "bc"])  # same blob
    assert "" in packed and packed.index("bad\udcff") == 3
    for bad in (5, -6):
        with pytest.raises(IndexError):
            packed[bad]
    empty = dropindex.Packed()
    assert len(empty) == 0 and list(empty) == [] and empty == []
