"""Where `postroom fetch` keeps what it downloads: the messages, durable first, and their UIDLs.

A sink (a Maildir or an mbox file) takes a message's content as the POP3
core hands it out (CRLF line ends, dot-stuffing undone) in pieces: `begin`,
`write`..., then `commit`, which returns only once the message is on disk
(data synced; in a Maildir renamed from tmp/ into new/ and the folder synced,
postroom.store.durable), or `abort`, which leaves no trace of it. Lines end
in LF unless `crlf`.

`SeenUIDLs` records the UIDL (RFC 1939 7) of each message once it is
durable: with --keep, a recorded message is not stored again; without it,
it is deleted now (its earlier DELE was lost with its session).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from pathlib import Path

from postroom.client.connect import ClientError
from postroom.store import durable
from postroom.store.atomic import atomic_write
from postroom.store.maildir import ensure_maildir, unique_name

# An unfinished line held back between chunks (for "From " quoting and CRLF)
# is at most this long; a longer one is written as it comes.
_HOLD_LIMIT = 1024
# A message's pieces are gathered up to this size before a write(2).
WRITE_BUFFER = 64 * 1024
# The From_ line of an mbox message names its Return-Path, read from the
# header; a header that has not ended within this many octets goes without.
_HEAD_LIMIT = 64 * 1024

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)  # mboxrd: quote with one more ">"


class LineEnds:
    """Content with CRLF line ends to local form, chunk by chunk.

    CRLF becomes LF unless `crlf`; for mbox, lines starting with ">*From " get
    one more ">" (mboxrd). An unfinished line is held back (when short) so
    that neither a "From " nor a CRLF is missed at a chunk boundary.
    """

    def __init__(self, *, crlf: bool, quote_from: bool) -> None:
        self._crlf = crlf
        self._quote = quote_from
        self._held = b""
        self._line_start = True  # the next octet out begins a line

    def feed(self, data: bytes) -> bytes:
        data = self._held + data
        self._held = b""
        cut = data.rfind(b"\n") + 1
        out = self._convert(data[:cut]) if cut else b""
        partial = data[cut:]
        if len(partial) < _HOLD_LIMIT:
            self._held = partial
        else:
            keep = 1 if partial.endswith(b"\r") else 0  # may be half of a CRLF
            self._held = partial[len(partial) - keep :]
            out += self._convert(partial[: len(partial) - keep])
        return out

    def end(self) -> bytes:
        """The rest, ending with a line end (RFC 5322 2.1 messages end with CRLF)."""
        out = self._convert(self._held)
        self._held = b""
        if not self._line_start:
            out += b"\r\n" if self._crlf else b"\n"
            self._line_start = True
        return out

    def _convert(self, segment: bytes) -> bytes:
        if not segment:
            return b""
        if not self._crlf:
            segment = segment.replace(b"\r\n", b"\n")
        if self._quote:
            if self._line_start:
                segment = _FROM_LINE.sub(rb">\1", segment)
            else:
                nl = segment.find(b"\n") + 1  # the first piece continues a line
                if nl:
                    segment = segment[:nl] + _FROM_LINE.sub(rb">\1", segment[nl:])
        self._line_start = segment.endswith(b"\n")
        return segment


class _Sink:
    """A file a message is written to: its lines converted (LineEnds), the pieces
    gathered into WRITE_BUFFER-sized writes, the octets written counted."""

    quote_from = False  # mboxrd's quoting of "From " lines

    def __init__(self, *, crlf: bool) -> None:
        self.crlf = crlf
        self._fd: int | None = None
        self._file_path: Path | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._lines = LineEnds(crlf=crlf, quote_from=self.quote_from)
        self._size = 0  # of this message, as written

    def _new_message(self) -> None:
        self._lines = LineEnds(crlf=self.crlf, quote_from=self.quote_from)
        self._size = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self._pending.append(data)
            self._pending_size += len(data)
            self._size += len(data)
            if self._pending_size >= WRITE_BUFFER:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            assert self._fd is not None and self._file_path is not None
            pending, self._pending, self._pending_size = self._pending, [], 0
            durable.OS.write(self._fd, self._file_path, pending)

    def _drop_pending(self) -> None:
        self._pending, self._pending_size = [], 0


class MaildirSink(_Sink):
    """Messages into a Maildir: tmp/ first, synced, then renamed into new/ (synced)."""

    def __init__(self, folder: Path, *, crlf: bool) -> None:
        super().__init__(crlf=crlf)
        self.folder = folder
        self.hostname = socket.gethostname() or "localhost"

    def open(self) -> None:
        try:
            ensure_maildir(self.folder)
        except OSError as exc:
            raise ClientError(f"cannot make the Maildir {self.folder}: {exc.strerror or exc}",
                              kind="usage") from None

    def close(self) -> None:
        self.abort()

    def begin(self) -> None:
        tmp = self.folder / "tmp" / unique_name(self.hostname)
        self._fd = durable.OS.create(tmp)
        self._file_path = tmp
        self._new_message()

    def write(self, data: bytes) -> None:
        self._emit(self._lines.feed(data))

    def commit(self, wire_octets: int) -> Path:
        """Make the message durable in new/; returns its path."""
        assert self._fd is not None and self._file_path is not None
        self._emit(self._lines.end())
        self._flush()
        tmp, fd = self._file_path, self._fd
        self._fd = None
        durable.sync_and_close(fd, tmp)
        # Dovecot's S= (octets on disk) and W= (octets with CRLF) spare readers a stat.
        final = self.folder / "new" / f"{tmp.name},S={self._size},W={wire_octets}"
        durable.OS.rename(tmp, final)
        self._file_path = None
        durable.sync_dir(final.parent)
        return final

    def abort(self) -> None:
        self._drop_pending()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._file_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file_path)
            self._file_path = None


_RETURN_PATH = re.compile(rb"^Return-Path:[ \t]*<([^<>\s]*)>", re.IGNORECASE | re.MULTILINE)


class MboxSink(_Sink):
    """Messages appended to an mbox file (mboxrd), locked, synced after each one.

    Each message starts with a From_ line naming its Return-Path (or
    MAILER-DAEMON) and the time, and ends with a blank line. A message cut
    off midway is truncated away again, so the file never holds half of one.
    A file made here has its folder synced before the first message counts
    as stored.
    """

    quote_from = True

    def __init__(self, path: Path, *, crlf: bool) -> None:
        super().__init__(crlf=crlf)
        self.path = path
        self._start = 0
        # The start of the message, held until its From_ line is written (None after).
        self._head: bytes | None = b""
        self._separator = b""  # what the file lacks before the next From_ line

    def open(self) -> None:
        try:
            fd, made = durable.OS.open_append(self.path)
        except OSError as exc:
            raise ClientError(f"cannot open the mbox {self.path}: {exc.strerror or exc}",
                              kind="usage") from None
        try:
            # The lock mutt and Dovecot take too (fcntl), so no reader sees half a message.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ClientError(f"the mbox {self.path} is locked by another program",
                              kind="usage", temporary=True) from None
        self._fd, self._file_path = fd, self.path
        if made:
            try:
                durable.sync_dir(self.path.parent)  # the new file's name
            except OSError as exc:
                self.close()
                raise ClientError(f"cannot make the mbox {self.path}: {exc.strerror or exc}",
                                  kind="local", temporary=True) from None

    def close(self) -> None:
        self._drop_pending()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def begin(self) -> None:
        assert self._fd is not None
        self._start = os.fstat(self._fd).st_size
        self._separator = b""
        if self._start:
            # A From_ line must follow a blank line; a file another program
            # left without one gets it now.
            tail = os.pread(self._fd, 2, max(0, self._start - 2))
            wanted = b"\n\n" if self._start >= 2 else b"\n"
            while not tail.endswith(wanted):
                wanted = wanted[1:]
                self._separator += b"\n"
        self._head = b""
        self._new_message()

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        if self._head is not None:
            self._head += data
            if b"\r\n\r\n" not in self._head and len(self._head) < _HEAD_LIMIT:
                return  # the From_ line wants the Return-Path from the header
            data, self._head = self._head, None
            self._emit(self._from_line(data))
        self._emit(self._lines.feed(data))

    def _from_line(self, head: bytes) -> bytes:
        header = head.split(b"\r\n\r\n", 1)[0]
        m = _RETURN_PATH.search(header)
        sender = m.group(1).decode("ascii", "replace") if m and m.group(1) else "MAILER-DAEMON"
        sender = "".join(c for c in sender if c.isprintable() and c != " ") or "MAILER-DAEMON"
        line = f"From {sender} {time.asctime()}"
        ending = "\r\n" if self.crlf else "\n"
        return self._separator + (line + ending).encode("ascii", "replace")

    def commit(self, wire_octets: int) -> Path:
        assert self._fd is not None
        if self._head is not None:
            head, self._head = self._head, None
            self._emit(self._from_line(head) + self._lines.feed(head))
        newline = b"\r\n" if self.crlf else b"\n"
        self._emit(self._lines.end() + newline)  # the blank line between messages
        self._flush()
        durable.OS.datasync(self._fd, self.path)
        return self.path

    def abort(self) -> None:
        self._drop_pending()
        if self._fd is not None:
            durable.OS.truncate(self._fd, self.path, self._start)
            durable.OS.datasync(self._fd, self.path)
        self._head = b""


Sink = MaildirSink | MboxSink


# --- What was downloaded -----------------------------------------------------------

STATE_NAME = ".postroom-fetch-uidls"
STATE_HEADER = "# postroom fetch: messages already downloaded, one per line: UIDL ACCOUNT\n"


class SeenUIDLs:
    """UIDLs of messages already downloaded, per account, in a file rewritten atomically.

    One line per message: the UIDL (RFC 1939 7: no spaces in it), a space,
    the account ("pop3://user@host"), so that one state file may serve
    several accounts.
    """

    def __init__(self, path: Path, account: str) -> None:
        self.path = path
        self.account = account
        self._others: list[str] = []  # lines of other accounts, kept as they are
        self.uids: dict[str, None] = {}  # this account's, in order

    def load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientError(f"cannot read the state file {self.path}: {exc}",
                              kind="usage") from None
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            uid, _, account = line.partition(" ")
            if account == self.account:
                self.uids[uid] = None
            else:
                self._others.append(line)

    def __contains__(self, uid: object) -> bool:
        return uid in self.uids

    def add(self, uid: str) -> None:
        self.uids[uid] = None
        self.save()

    def keep_only(self, uids: set[str]) -> None:
        """Forget UIDLs not in `uids` (gone from the server); saves when something changed."""
        gone = [u for u in self.uids if u not in uids]
        for uid in gone:
            del self.uids[uid]
        if gone:
            self.save()

    def save(self) -> None:
        lines = [*self._others, *(f"{uid} {self.account}" for uid in self.uids)]
        data = (STATE_HEADER + "".join(f"{line}\n" for line in lines)).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, data, mode=0o600)
        except OSError as exc:
            raise ClientError(f"cannot write the state file {self.path}: {exc}",
                              kind="usage") from None
