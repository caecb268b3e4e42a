"""Maildir mailboxes: where each local mailbox lives, its file names, and listing it.

A mailbox is the Maildir DATA/mail/<domain>/<localpart>/ with its cur/ new/
tmp/ folders (postroom.store.mailboxes), the layout Dovecot, mutt and Python's
`mailbox.Maildir` read. Messages are filed into it by postroom.store.commit.

File names follow the Maildir convention (time.unique.host) in Dovecot's
spelling, ``<secs>.M<usecs>P<pid>Q<count>R<random>.<host>,S=<size>,W=<size>``,
where S= is the exact octet count of the stored file, so a POP3 server can
answer LIST and STAT (RFC 1939 5) without opening a single message.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from postroom.store import durable

DIR_MODE = 0o700
MAILDIRFOLDER = "maildirfolder"  # Maildir++: the empty file that marks a folder

_counter_lock = threading.Lock()
_counter = 0
# This process's pid and random part of every name, drawn again in a forked child:
# two system calls fewer per message than asking each time.
_pid = os.getpid()
_nonce = secrets.token_hex(8)


def _new_process() -> None:
    # A forked child has a new pid; restarting Q keeps names short and still unique.
    global _counter, _pid, _nonce
    _counter = 0
    _pid = os.getpid()
    _nonce = secrets.token_hex(8)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_process)


def escape_hostname(hostname: str) -> str:
    r"""Hostname as it may appear in a Maildir file name.

    "/" would split the path and ":" starts the info part, so they become
    "\057" and "\072" (Dovecot's spelling); "," starts the S=/W= fields and
    becomes "\054" by the same rule.
    """
    return hostname.replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")


def unique_name(hostname: str, size: int | None = None, sent: int | None = None) -> str:
    """A new Maildir base name, unique across processes and restarts.

    Time with microseconds, the pid and a per-process counter make it unique on
    this host; the random part, drawn when the process starts, guards against a
    pid reused by a later process (containers restarting) and clock steps
    backwards, where the counter starts again from 1.
    """
    global _counter
    now = time.time_ns()
    secs, usecs = divmod(now // 1000, 1_000_000)
    with _counter_lock:
        _counter += 1
        count = _counter
    name = f"{secs}.M{usecs}P{_pid}Q{count}R{_nonce}.{escape_hostname(hostname)}"
    if size is not None:
        # S= is the size stored; W= the size with CRLF line ends (a POP3 server's
        # size), which is S= for the CRLF text SMTP DATA delivers. `sent` is given
        # where the two can differ (BDAT content is taken as it comes).
        name += f",S={size},W={size if sent is None else sent}"
    return name


class LineEnds:
    """Counts what a file's bytes become as POP3 sends them (RFC 1939 11): CRLF line
    ends (a bare LF or a bare CR is a line end, as protocol.lines.DotStuffer sends
    it), and one added after a last line that lacks it. Fed chunk by chunk, in
    order (`chunks` first); a CRLF split between two chunks is one line end."""

    __slots__ = ("size", "bare_lf", "bare_cr", "_ends_cr", "_last")

    def __init__(self, chunks: Iterable[bytes] = ()) -> None:
        self.size = 0  # octets fed
        self.bare_lf = 0  # LFs without a CR before them
        self.bare_cr = 0  # CRs without an LF after them
        self._ends_cr = False
        self._last = -1  # the last octet fed, -1 before any
        for chunk in chunks:
            self.feed(chunk)

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        pairs = chunk.count(b"\r\n")
        self.bare_lf += chunk.count(b"\n") - pairs
        self.bare_cr += chunk.count(b"\r") - pairs
        if self._ends_cr and chunk[0] == 0x0A:
            self.bare_lf -= 1
            self.bare_cr -= 1
        self._ends_cr = chunk[-1] == 0x0D
        self._last = chunk[-1]

    @property
    def sent(self) -> int:
        """The octets as sent, before byte-stuffing."""
        extra = 0 if self._last in (-1, 0x0A, 0x0D) else 2
        return self.size + self.bare_lf + self.bare_cr + extra


_FIELD = re.compile(r",([A-Za-z])=([0-9]+)")  # S=, W= (and others) before the ":"
_TIME = re.compile(r"([0-9]+)\.(?:M([0-9]+))?")  # the delivery time, then M<usecs>


@dataclass(frozen=True)
class MaildirEntry:
    """One message of a maildir as a POP3 server sees it."""

    path: Path
    size: int  # octets as sent, with CRLF line ends: W=, else S=, else stat(2)
    uid_base_name: str  # the part before the first "," or ":": stable, a basis for UIDL
    # The name says the file has no bare CR or LF: W= (the size with CRLF line ends)
    # equals S= (the size stored), as in postroom's own names. Readers may then skip
    # converting line ends; without this they must convert.
    crlf: bool = False
    # `size` came from W=, the size as sent. Without it (other MDAs' names) the
    # size is the stored one, which differs for a file with LF line ends.
    exact: bool = False


SortKey = tuple[int, int, str]  # (delivery second, microsecond, file name): oldest first


def list_messages(maildir: Path) -> list[MaildirEntry]:
    """The messages in new/ and cur/, oldest delivery first (other MDAs' names too).

    Sizes are what a POP3 client receives (RFC 1939 11: CRLF line ends): the W=
    field, which Dovecot's deliveries carry for files stored with LF line ends,
    else S=, else stat(2) for names without either (`exact` tells which: see
    store.maildrop for the exact size of those). A file that vanishes while
    listing (another reader moved or deleted it) is skipped.
    """
    found: list[tuple[SortKey, MaildirEntry]] = []
    for sub in ("new", "cur"):
        folder = maildir / sub
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            scanned = scan_name(folder, name)
            if scanned is not None:
                found.append(scanned)
    found.sort(key=lambda item: item[0])
    return [entry for _, entry in found]


def scan_name(folder: Path, name: str) -> tuple[SortKey, MaildirEntry] | None:
    """One file of `folder` (new/ or cur/) as `list_messages` sees it, with its place
    in delivery order; None for a dot file or a file that vanished meanwhile."""
    if name.startswith("."):
        return None  # RFC-less but universal: dot files are not messages
    fields = {k.upper(): int(v) for k, v in _FIELD.findall(name.partition(":")[0])}
    vsize = fields.get("W")
    size = fields.get("S") if vsize is None else vsize
    started = _TIME.match(name)
    when = int(started.group(1)) if started else None
    path = folder / name
    if size is None or when is None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        size = st.st_size if size is None else size
        when = int(st.st_mtime) if when is None else when
    entry = MaildirEntry(path, size, re.split(r"[,:]", name, maxsplit=1)[0],
                         crlf=vsize is not None and vsize == fields.get("S"),
                         exact=vsize is not None)
    usecs = int(started.group(2) or 0) if started else 0
    return (when, usecs, name), entry


def ensure_maildir(maildir: Path) -> bool:
    """Create `maildir` with cur/ new/ tmp/ (mode 0700) unless present; True if made.

    Every directory made is fsynced into its parent, so a message linked into
    a fresh maildir survives a crash along with the folders that hold it.
    """
    if (maildir / "new").is_dir() and (maildir / "cur").is_dir() and (maildir / "tmp").is_dir():
        return False
    subfolder = maildir.name.startswith(".")  # a Maildir++ folder of the mailbox above
    if subfolder:
        ensure_maildir(maildir.parent)
    created: list[Path] = []
    missing = []
    p = maildir
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in [*reversed(missing), *(maildir / sub for sub in ("tmp", "new", "cur"))]:
        with contextlib.suppress(FileExistsError):
            durable.OS.mkdir(d, DIR_MODE)
            created.append(d)
    if subfolder:
        # Maildir++: the marker that says this is a folder, not a mailbox of its own
        # (Courier's and Dovecot's deliveries create it too).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(maildir / MAILDIRFOLDER, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o600))
            created.append(maildir / MAILDIRFOLDER)
    for d in dict.fromkeys(c.parent for c in created):
        durable.sync_dir(d)
    return bool(created)
