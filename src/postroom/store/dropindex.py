"""The POP3 maildrop index: each message's name, size as RETR sends it and UIDL, beside the Maildir.

A login reads the index file (INDEX_NAME, in the Maildir's top folder) and then
only what changed: a folder (new/, cur/) whose modification time and inode are
those the index recorded is not listed at all; a changed one is listed, and
only names the index does not know are parsed (and, without W=, measured).
A name the index knows under another folder or flags (a reader moved it from
new/ to cur/ or changed its flags: the part before ":" is the message's
identity, and its octets never change) keeps its size and UIDL.

The files always win: a folder that changed is listed in full, so a message
gone from it leaves the snapshot; an index that is missing, unreadable, of
another format or inconsistent is ignored and rebuilt from the files; an index
written while a folder was still changing records that folder as unknown.
The index is only ever replaced whole, by rename(2) after a data sync
(postroom.store.durable), so a reader sees the old file or the new one.

The snapshot comes out as parallel sequences (`Listing`), not an object per
message, and its names and UIDLs each as one string with the offsets where each
ends (`Packed`): a session on a maildrop of hundreds of thousands holds a few
large blocks, which go back to the system when it ends, not hundreds of
thousands of small strings, whose freed slots would keep the interpreter's
small-object arenas (and so the process's memory) partly used for good.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import re
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

from postroom.store import durable
from postroom.store.maildir import LineEnds, SortKey, scan_name

INDEX_NAME = "postroom-uidlist"  # Dovecot keeps "dovecot-uidlist" in the same folder
INDEX_TEMP = "postroom-uidlist.new"  # written, synced, then renamed over INDEX_NAME
FORMAT = "postroom-uidlist 1"  # the first line's first two words: another format is ignored
# A folder whose modification time is this close to now may change again within
# the same timestamp (file times come from a coarse clock, whole seconds on some
# filesystems) and its time would not show it: it is recorded as unknown and
# listed at the next login, as Dovecot treats a maildir synced within the last
# second as dirty.
CHANGING_SECS = 2
MAX_UID = 70  # RFC 1939 7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E
READ_CHUNK = 256 * 1024  # octets asked of read(2) at a time
# The index's UIDL line (space-separated unique-ids) and its name lines: checked
# whole, each in one pass.
_UIDS = re.compile(r"(?:[\x21-\x7e]{1,70}(?: [\x21-\x7e]{1,70})*)?")
_NAMES = re.compile(r"(?:(?:new|cur)/[^\n]+\n)*")
SUBFOLDERS = ("new", "cur")
CRLF = 1  # Listing.flags: the stored octets have no bare CR or LF

# Sizes as sent of files whose names do not carry them (no W=, as other MDAs
# name files), read once and kept: (unique name, size stored) -> (size as sent,
# no bare LF). Maildir files never change once delivered.
_sent_sizes: dict[tuple[str, int], tuple[int, bool]] = {}
SENT_SIZES_KEPT = 100_000


def uid_for(base_name: str) -> str:
    """The UIDL of a Maildir message: its base name when that fits RFC 1939 7, or a
    digest of it (long host names make long Maildir names)."""
    # ASCII, printable (0x20-0x7E) and no space: every character in 0x21-0x7E. An
    # empty base name (a file named ":2,S") gets a digest too: RFC 1939 7 asks for
    # at least one character.
    if (0 < len(base_name) <= MAX_UID and base_name.isascii() and base_name.isprintable()
            and " " not in base_name):
        return base_name
    return hashlib.sha256(base_name.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def file_sent_size(path: Path) -> tuple[int, bool]:
    """The octets RETR sends for the file before byte-stuffing (maildir.LineEnds),
    and whether the file has no bare CR or LF. BLOCKING: reads the whole file."""
    with open(path, "rb") as file:
        counter = LineEnds(iter(functools.partial(file.read, READ_CHUNK), b""))
    return counter.sent, counter.bare_lf == 0 and counter.bare_cr == 0


def _cached_sent_size(path: Path, unique: str, stored: int) -> tuple[int, bool]:
    key = (unique, stored)
    known = _sent_sizes.get(key)
    if known is None:
        if len(_sent_sizes) >= SENT_SIZES_KEPT:
            _sent_sizes.clear()
        known = _sent_sizes[key] = file_sent_size(path)
    return known


class Packed(Sequence[str]):
    """Strings, read only, held as one string and an array of where each ends.

    Item i is a slice made when asked for; what is held is two blocks however
    many strings there are (see the module docstring for why that matters).
    """

    __slots__ = ("_blob", "_ends")

    def __init__(self, items: Iterable[str] = ()) -> None:
        strings = items if isinstance(items, list) else list(items)
        self._blob = "".join(strings)
        self._ends = array("I" if len(self._blob) < 1 << 32 else "Q",
                           itertools.accumulate(map(len, strings)))

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self._ends)))]
        ends = self._ends
        end = ends[index]  # IndexError, and negative numbers, as for a list
        if index < 0:
            index += len(ends)
        return self._blob[ends[index - 1] if index else 0:end]

    def __iter__(self) -> Iterator[str]:
        blob, start = self._blob, 0
        for end in self._ends:
            yield blob[start:end]
            start = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Packed):
            return self._blob == other._blob and self._ends.tolist() == other._ends.tolist()
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(map(str.__eq__, self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to a list, as mutable as one is not

    def __repr__(self) -> str:
        return f"Packed({list(self)!r})"


@dataclass(slots=True)
class Listing:
    """A maildrop's messages in delivery order (maildir.list_messages's), message N
    at index N - 1 of each sequence."""

    names: Packed = field(default_factory=Packed)  # "new/NAME" or "cur/NAME"
    sizes: array[int] = field(default_factory=lambda: array("q"))  # octets as RETR sends
    uids: Packed = field(default_factory=Packed)  # UIDL (RFC 1939 7), as `uid_for` makes
    flags: bytearray = field(default_factory=bytearray)  # CRLF


@dataclass(slots=True)
class _Index:
    """The index file's content: parallel columns in delivery order. Lists of
    strings while it is read and brought up to date; `listing` packs them."""

    stamps: dict[str, str]  # folder -> "mtime_ns.inode" when recorded, "-" if unknown
    whens: array[int] = field(default_factory=lambda: array("q"))  # delivery second
    usecs: array[int] = field(default_factory=lambda: array("q"))  # its microsecond
    names: list[str] = field(default_factory=list)  # as Listing's
    sizes: array[int] = field(default_factory=lambda: array("q"))
    uids: list[str] = field(default_factory=list)
    flags: bytearray = field(default_factory=bytearray)

    def listing(self) -> Listing:
        return Listing(Packed(self.names), self.sizes, Packed(self.uids), self.flags)

    def select(self, rows: list[int]) -> _Index:
        """The entries numbered `rows` (from 0), in that order."""
        return _Index({}, array("q", [self.whens[i] for i in rows]),
                      array("q", [self.usecs[i] for i in rows]), [self.names[i] for i in rows],
                      array("q", [self.sizes[i] for i in rows]), [self.uids[i] for i in rows],
                      bytearray([self.flags[i] for i in rows]))

    def append(self, key: SortKey, name: str, size: int, uid: str, flags: int) -> None:
        self.whens.append(key[0])
        self.usecs.append(key[1])
        self.names.append(name)
        self.sizes.append(size)
        self.uids.append(uid)
        self.flags.append(flags)


class CorruptIndex(ValueError):
    """The index file cannot be read as FORMAT: it is rebuilt from the files."""


def load(root: Path) -> Listing:
    """The snapshot of the Maildir `root`, from the index and what changed since it
    was written; the index is rewritten when anything did. BLOCKING.

    OSError when a folder cannot be listed; a fault reading or writing the
    index only costs a full listing.
    """
    now_ns = time.time_ns()
    stamps = {sub: _stamp(root / sub, now_ns) for sub in SUBFOLDERS}
    try:
        old = read_index(root / INDEX_NAME)
    except (OSError, CorruptIndex, UnicodeDecodeError):
        old = None
    if old is not None and all(
        stamps[sub] != "-" and old.stamps.get(sub) == stamps[sub] for sub in SUBFOLDERS
    ):
        return old.listing()
    new = _update(root, old or _Index({}), {
        sub for sub in SUBFOLDERS
        if old is None or stamps[sub] == "-" or old.stamps.get(sub) != stamps[sub]
    })
    new.stamps = stamps
    with contextlib.suppress(OSError):
        write_index(root, new)
    return new.listing()


def _stamp(folder: Path, now_ns: int) -> str:
    """What tells whether `folder` changed: "mtime_ns.inode", or "-" when it may
    still be changing unseen (CHANGING_SECS) or is missing."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return "-"
    if st.st_mtime_ns >= now_ns - CHANGING_SECS * 1_000_000_000:
        return "-"
    return f"{st.st_mtime_ns}.{st.st_ino}"


def _update(root: Path, old: _Index, changed: set[str]) -> _Index:
    """`old` brought up to date: the folders in `changed` listed, the others kept."""
    listed = [name[:3] in changed for name in old.names]  # in a folder listed again
    # Entries of a listed folder, by name and by unique name: a file another reader
    # moved (new/ -> cur/) or whose flags it changed is still the same message.
    position = {name: i for i, name in enumerate(old.names) if listed[i]}
    moved = {name[4:].partition(":")[0]: i for name, i in position.items()}
    keep = bytearray(not again for again in listed)  # 1: entry i is still there as named
    added: list[tuple[SortKey, str, int, str, int]] = []  # key, name, size, uid, flags
    for sub in SUBFOLDERS:
        if sub not in changed:
            continue
        folder = root / sub
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            known = position.get(f"{sub}/{name}")
            if known is not None:
                keep[known] = 1
                continue
            if name.startswith("."):
                continue
            was = moved.get(name.partition(":")[0])
            if was is not None:
                added.append(((old.whens[was], old.usecs[was], name), f"{sub}/{name}",
                               old.sizes[was], old.uids[was], old.flags[was]))
                continue
            scanned = scan_name(folder, name)
            if scanned is None:
                continue
            key, entry = scanned
            size, crlf = entry.size, entry.crlf
            if not entry.exact:
                try:
                    size, crlf = _cached_sent_size(entry.path, entry.uid_base_name, entry.size)
                except FileNotFoundError:
                    continue  # gone while listing: not part of the snapshot
            added.append((key, f"{sub}/{name}", size, uid_for(entry.uid_base_name),
                          CRLF if crlf else 0))
    kept = [i for i in range(len(old.names)) if keep[i]]
    added.sort(key=lambda item: item[0])
    if added and kept and added[0][0] < _key(old, kept[-1]):  # not all later: merge
        rows = [(_key(old, i), old.names[i], old.sizes[i], old.uids[i], old.flags[i])
                for i in kept]
        rows.extend(added)
        rows.sort(key=lambda item: item[0])
        new = _Index({})
        for row in rows:
            new.append(*row)
        return new
    new = old.select(kept)
    for row in added:
        new.append(*row)
    return new


def _key(index: _Index, i: int) -> SortKey:
    """Entry i's place in delivery order (maildir.list_messages's key)."""
    return index.whens[i], index.usecs[i], index.names[i].partition("/")[2]


def read_index(path: Path) -> _Index:
    """The index file at `path`. OSError, CorruptIndex when it is not one of FORMAT.

    Column by column, so that reading it makes no object per message beyond
    the strings kept: the line "FORMAT COUNT new=STAMP cur=STAMP", then a line
    each of delivery seconds, microseconds, sizes (space-separated decimals),
    the flags (one digit a message), the UIDLs (space-separated), then one line
    per message with its name, "new/..." or "cur/...", where "=" after the
    folder stands for the UIDL the name starts with (most names do).
    """
    with open(path, "rb") as file:
        text = file.read().decode("utf-8", "surrogateescape")
    parts = text.split("\n", 6)
    if len(parts) != 7 or not parts[6].endswith("\n") and parts[6]:
        raise CorruptIndex("not a postroom-uidlist")
    head, whens, usecs, sizes, flags, uids, rest = parts
    words = head.split(" ")
    if " ".join(words[:2]) != FORMAT:
        raise CorruptIndex("not a postroom-uidlist of this format")
    try:
        count = int(words[2])
        stamps = dict(word.split("=", 1) for word in words[3:])
        index = _Index(stamps, array("q", map(int, whens.split())),
                       array("q", map(int, usecs.split())), [],
                       array("q", map(int, sizes.split())), uids.split(),
                       bytearray(flags.encode("ascii").translate(_DIGITS)))
    except (ValueError, IndexError, UnicodeEncodeError) as exc:
        raise CorruptIndex(f"bad header or column: {exc}") from None
    short = rest.split("\n")[:-1]
    if not count == len(index.whens) == len(index.usecs) == len(index.sizes) == len(
            index.flags) == len(index.uids) == len(short):
        raise CorruptIndex(f"columns of different lengths for {count} messages")
    if max(index.flags, default=0) > CRLF or min(index.sizes, default=0) < 0:
        raise CorruptIndex("bad flags or sizes")
    if _UIDS.fullmatch(uids) is None:
        raise CorruptIndex("a UIDL that is not one of RFC 1939 7")
    if _NAMES.fullmatch(rest) is None:
        raise CorruptIndex("a name outside new/ and cur/")
    index.names = [n[:4] + u + n[5:] if n[4:5] == "=" else n
                   for n, u in zip(short, index.uids, strict=True)]
    return index


_DIGITS = bytes.maketrans(b"0123456789", bytes(range(10)))


def write_index(root: Path, index: _Index) -> None:
    """Replace the index in `root` (write, data sync, rename: durable's steps 1-3;
    an index lost to a crash only costs a full listing). BLOCKING."""
    stamps = dict(index.stamps)
    rows: list[int] = []
    names: list[str] = []
    for i, (name, uid) in enumerate(zip(index.names, index.uids, strict=True)):
        if name.startswith(uid, 4):
            name = name[:4] + "=" + name[4 + len(uid):]
        elif name[4:5] == "=" or "\n" in name:
            stamps[name[:3]] = "-"  # a name the format cannot hold: listed at each login
            continue
        rows.append(i)
        names.append(name)
    if len(rows) != len(index.names):
        index = index.select(rows)
    words = " ".join(f"{sub}={stamps.get(sub, '-')}" for sub in SUBFOLDERS)
    lines = [
        f"{FORMAT} {len(rows)} {words}",
        " ".join(map(str, index.whens)),
        " ".join(map(str, index.usecs)),
        " ".join(map(str, index.sizes)),
        "".join(map(str, index.flags)),
        " ".join(index.uids),
        *names,
        "",
    ]
    data = "\n".join(lines).encode("utf-8", "surrogateescape")
    temp = root / INDEX_TEMP
    with contextlib.suppress(FileNotFoundError):
        durable.OS.unlink(temp)  # left by a crash: the maildrop lock says no one writes it
    fd = durable.write_new(temp, [data])
    try:
        durable.sync_and_close(fd, temp)
        durable.OS.rename(temp, root / INDEX_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            durable.OS.unlink(temp)
        raise
