"""`postroom fetch`: POP3 mail into a Maildir or mbox, deleted on the server only once safe.

The POP3 client core (`protocol.pop3_client`) on a TLS connection: STLS
(RFC 2595) or implicit TLS (RFC 8314), CAPA (RFC 2449), then a login with SASL
PLAIN (RFC 5034) when offered, else USER/PASS, or APOP when asked (RFC 1939 7).
STAT, LIST and UIDL say what is there; each new message is streamed into a
local file (never whole in memory) and made durable before anything else
happens to it:

1. RETR n, written to DEST/tmp (or appended to the mbox), its data synced,
   renamed into DEST/new and the folder synced (postroom.store.durable);
2. its UIDL recorded in the state file (rewritten atomically);
3. without --keep, DELE n. The server removes marked messages only when QUIT
   ends the session (RFC 1939 6), so a session that drops deletes nothing.

A run that was interrupted therefore loses nothing, and run again duplicates
nothing: a message whose UIDL is recorded is not stored again (with --keep it
is left alone; without it is deleted now, its earlier DELE having been lost).
Once QUIT succeeded, the UIDLs of deleted messages are dropped from the state
file, and with --keep those the server no longer lists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from postroom.client.connect import (
    EX_OK,
    EX_USAGE,
    Channel,
    ClientError,
    Session,
    Trace,
    certificate_hint,
    connect,
    host_port,
    parse_server,
    read_password,
    start_tls,
    tls_context,
    tls_expected,
    waiting_for,
)
from postroom.protocol.pop3_client import (
    CAPA,
    GREETING,
    MAX_COMMAND_LINE,
    NEED_DATA,
    Challenge,
    ConnectionClosed,
    LocalProtocolError,
    MessageData,
    MessageEnd,
    POP3Client,
    RemoteProtocolError,
    Response,
    sizes_of,
    stat_of,
    uids_of,
)
from postroom.protocol.sasl import PLAIN, ClientExchange, SASLError
from postroom.store import durable
from postroom.store.atomic import atomic_write
from postroom.store.maildir import ensure_maildir, unique_name

SECURITIES = ("stls", "tls")
AUTH_MODES = ("auto", "plain", "user", "apop")
DEFAULT_TIMEOUT = 120.0
STATE_NAME = ".postroom-fetch-uidls"
STATE_HEADER = "# postroom fetch: messages already downloaded, one per line: UIDL ACCOUNT\n"
IMPLICIT_TLS_PORTS = frozenset({995, 2995})  # RFC 8314 7: pop3s; postroom's loopback default
# A progress line is worth showing from this many messages or octets on.
PROGRESS_MIN_MESSAGES = 20
PROGRESS_MIN_OCTETS = 1 << 20
PROGRESS_INTERVAL = 0.25  # seconds between updates of the line
# An unfinished line held back between chunks (for "From " quoting and CRLF)
# is at most this long; a longer one is written as it comes.
_HOLD_LIMIT = 1024
# A message's pieces are gathered up to this size before a write(2).
WRITE_BUFFER = 64 * 1024


class FetchError(ClientError):
    """The fetch failed; `result` says what was done before (messages already safe)."""

    def __init__(self, text: str, *, kind: str, temporary: bool = False) -> None:
        super().__init__(text, kind=kind, temporary=temporary)
        self.result: FetchResult | None = None


@dataclass
class FetchResult:
    """What a fetch did."""

    downloaded: int  # messages stored locally in this run
    deleted: int  # messages deleted on the server (QUIT confirmed it)
    skipped: int  # messages already downloaded before (recognised by UIDL)
    octets: int  # octets downloaded, as the server counts them (CRLF)
    paths: list[Path] = field(default_factory=list)  # the local files written
    failed: int = 0  # messages the server would not give (left there)


def human_size(octets: int) -> str:
    if octets < 1024:
        return f"{octets} bytes" if octets != 1 else "1 byte"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if octets >= size:
            value = octets / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def summary(result: FetchResult, *, keep: bool) -> str:
    """One line: "3 messages (14 KiB) downloaded, 3 deleted on the server"."""
    count = result.downloaded
    if count:
        size = human_size(result.octets)
        text = f"{count} message{'s' if count != 1 else ''} ({size}) downloaded"
    else:
        text = "no new messages"
    if result.skipped:
        text += f", {result.skipped} already downloaded before"
    if result.failed:
        text += f", {result.failed} the server would not give"
    if result.deleted:
        text += f", {result.deleted} deleted on the server"
    elif keep and count:
        text += ", kept on the server"
    return text


# --- Local copies -----------------------------------------------------------------------

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)  # mboxrd: quote with one more ">"


class _LineEnds:
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
    """A file a message is written to: pieces gathered into WRITE_BUFFER-sized writes."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._file_path: Path | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size >= WRITE_BUFFER:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            assert self._fd is not None and self._file_path is not None
            pending, self._pending, self._pending_size = self._pending, [], 0
            durable.OS.write(self._fd, self._file_path, pending)

    def _drop_pending(self) -> None:
        self._pending, self._pending_size = [], 0


class _Maildir(_Sink):
    """Messages into a Maildir: tmp/ first, synced, then renamed into new/ (synced)."""

    def __init__(self, folder: Path, *, crlf: bool) -> None:
        super().__init__()
        self.folder = folder
        self.crlf = crlf
        self.hostname = socket.gethostname() or "localhost"
        self._lines = _LineEnds(crlf=crlf, quote_from=False)
        self._size = 0

    def open(self) -> None:
        try:
            ensure_maildir(self.folder)
        except OSError as exc:
            raise FetchError(f"cannot make the Maildir {self.folder}: {exc.strerror or exc}",
                             kind="usage") from None

    def close(self) -> None:
        self.abort()

    def begin(self) -> None:
        tmp = self.folder / "tmp" / unique_name(self.hostname)
        self._fd = durable.OS.create(tmp)
        self._file_path = tmp
        self._lines = _LineEnds(crlf=self.crlf, quote_from=False)
        self._size = 0

    def write(self, data: bytes) -> None:
        out = self._lines.feed(data)
        self._emit(out)
        self._size += len(out)

    def commit(self, wire_octets: int) -> Path:
        """Make the message durable in new/; returns its path."""
        assert self._fd is not None and self._file_path is not None
        out = self._lines.end()
        self._emit(out)
        self._size += len(out)
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


class _Mbox(_Sink):
    """Messages appended to an mbox file (mboxrd), locked, synced after each one.

    Each message starts with a From_ line naming its Return-Path (or
    MAILER-DAEMON) and the time, and ends with a blank line. A message cut
    off midway is truncated away again, so the file never holds half of one.
    A file made here has its folder synced before the first message counts
    as stored.
    """

    def __init__(self, path: Path, *, crlf: bool) -> None:
        super().__init__()
        self.path = path
        self.crlf = crlf
        self._start = 0
        # The start of the message, held until its From_ line is written (None after).
        self._head: bytes | None = b""
        self._separator = b""  # what the file lacks before the next From_ line
        self._lines = _LineEnds(crlf=crlf, quote_from=True)

    def open(self) -> None:
        try:
            fd, made = durable.OS.open_append(self.path)
        except OSError as exc:
            raise FetchError(f"cannot open the mbox {self.path}: {exc.strerror or exc}",
                             kind="usage") from None
        try:
            # The lock mutt and Dovecot take too (fcntl), so no reader sees half a message.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FetchError(f"the mbox {self.path} is locked by another program",
                             kind="usage", temporary=True) from None
        self._fd, self._file_path = fd, self.path
        if made:
            try:
                durable.sync_dir(self.path.parent)  # the new file's name
            except OSError as exc:
                self.close()
                raise FetchError(f"cannot make the mbox {self.path}: {exc.strerror or exc}",
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
        self._lines = _LineEnds(crlf=self.crlf, quote_from=True)

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        if self._head is not None:
            self._head += data
            if b"\r\n\r\n" not in self._head and len(self._head) < 64 * 1024:
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


_Store = _Maildir | _Mbox


# --- The state file ---------------------------------------------------------------------


class _State:
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
            raise FetchError(f"cannot read the state file {self.path}: {exc}",
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
            raise FetchError(f"cannot write the state file {self.path}: {exc}",
                             kind="usage") from None


# --- The POP3 session -------------------------------------------------------------------


class _Progress:
    """A progress line: rewritten in place on a terminal, one line per message elsewhere."""

    def __init__(self, stream: TextIO | None, messages: int, octets: int) -> None:
        self.stream = stream
        self.messages = messages
        self.octets = octets
        self.on = stream is not None and (
            messages >= PROGRESS_MIN_MESSAGES or octets >= PROGRESS_MIN_OCTETS
        )
        self.tty = bool(stream is not None and stream.isatty())
        self._last = 0.0
        self._shown = False

    def update(self, done: int, got: int, *, force: bool = False) -> None:
        if not self.on or self.stream is None:
            return
        now = time.monotonic()
        if not self.tty and not force:
            return
        if not force and now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        line = (f"fetching: {done}/{self.messages} messages, "
                f"{human_size(got)} of {human_size(self.octets)}")
        self.stream.write(f"\r{line}\x1b[K" if self.tty else f"{line}\n")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown and self.tty and self.stream is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class _Session(Session[POP3Client]):
    """One POP3 session: the POP3 core's commands and answers, said in the trace."""

    error = FetchError

    def __init__(self, channel: Channel, where: str, timeout: float, trace: Trace | None):
        super().__init__(channel, POP3Client(), where, timeout, trace)

    async def event(self) -> Response | Challenge | MessageData | MessageEnd:
        """The next event; EOF, timeout or a protocol error raises FetchError."""
        core = self.core
        while True:
            what = waiting_for(core.pending)
            try:
                event = core.next_event()
            except RemoteProtocolError as exc:
                raise self.lost(f"{self.where} broke the protocol: {exc}", "protocol") from None
            if event is NEED_DATA:
                try:
                    data = await self.channel.read(self.timeout)
                except TimeoutError:
                    text = f"no answer from {self.where} within {self.timeout:g}s"
                    raise self.lost(f"{text} ({what})") from None
                core.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                raise self.lost(f"{self.where} closed the connection ({what})")
            if isinstance(event, Response) and not event.command:
                self.trace(f"S: {event}")
                raise self.lost(f"{self.where} ended the session: {event}")
            return event

    async def command(self, shown: str, note: Callable[[Response], str] | None = None
                      ) -> Response | Challenge:
        """Send what the core holds and return the status line answering it."""
        self.trace(f"C: {shown}")
        await self.flush()
        event = await self.event()
        assert isinstance(event, Response | Challenge)
        if isinstance(event, Challenge):
            self.trace(f"S: + {event.text}".rstrip())
            return event
        shown_reply = str(event)
        if event.lines and event.command != CAPA:
            shown_reply += f" ({len(event.lines)} line{'s' if len(event.lines) != 1 else ''})"
        elif event.lines:
            shown_reply += f" ({', '.join(event.lines)})"
        if note is not None:
            shown_reply += note(event)
        self.trace(f"S: {shown_reply}")
        return event

    async def response(self, shown: str, note: Callable[[Response], str] | None = None
                       ) -> Response:
        event = await self.command(shown, note)
        if not isinstance(event, Response):
            raise self.lost(f"{self.where} sent a continuation outside AUTH", "protocol")
        return event

    async def quit(self, note: Callable[[Response], str] | None = None) -> Response | None:
        """QUIT (when the session is fit for it), then close; the answer, or None."""
        try:
            self.core.quit()
            answer = await self.response("QUIT", note)
        except (FetchError, LocalProtocolError):
            answer = None
        self.channel.close()
        return answer


def _login_failure(session: _Session, user: str, response: Response) -> FetchError:
    code = response.code or ""
    if code == "IN-USE":  # RFC 2449 8.1.1
        return FetchError(f"the mailbox of {user} at {session.where} is in use (another "
                          f"POP3 session?): {response}", kind="auth", temporary=True)
    if code.startswith("SYS/TEMP") or code == "LOGIN-DELAY":  # RFC 3206 4, RFC 2449 8.1.2
        return FetchError(f"{session.where} cannot log {user} on now: {response}",
                          kind="auth", temporary=True)
    return FetchError(f"authentication failed for {user} at {session.where}: {response}",
                      kind="auth")


def _transaction_note(response: Response) -> str:
    return " [Transaction state]" if response.ok else ""


async def _login(session: _Session, user: str, password: str, auth: str) -> None:
    core = session.core
    caps = core.capabilities
    mode = auth
    if mode == "auto":
        mode = "plain" if PLAIN in caps.sasl else "user"
    if mode == "apop":
        if core.timestamp is None:
            raise FetchError(f"{session.where} does not offer APOP (its greeting has no "
                             "timestamp)", kind="auth")
        core.apop(user, password)
        response = await session.response(f"APOP {user} (digest)", _transaction_note)
    elif mode == "user":
        core.user(user)
        response = await session.response(f"USER {user}")
        if response.ok:
            core.pass_(password)
            response = await session.response("PASS (hidden)", _transaction_note)
    else:
        exchange = ClientExchange(PLAIN, user, password)
        initial = exchange.initial_response()
        assert initial is not None
        if len(f"AUTH PLAIN {initial}\r\n") > MAX_COMMAND_LINE:
            # RFC 5034 4: too long for the command line; answer the empty challenge.
            core.auth(PLAIN)
            exchange = ClientExchange(PLAIN, user, password)
        else:
            core.auth(PLAIN, initial)
        event = await session.command("AUTH PLAIN (credentials hidden)", _transaction_note)
        while isinstance(event, Challenge):
            try:
                core.auth_response(exchange.respond(event.text))
            except SASLError:
                core.auth_response("*")  # RFC 5034 4: cancel
                await session.command("*")
                raise FetchError(f"{session.where} sent an unusable SASL challenge",
                                 kind="protocol") from None
            event = await session.command("(credentials hidden)", _transaction_note)
        response = event
    if not response.ok:
        raise _login_failure(session, user, response)


async def _retrieve(
    session: _Session, number: int, store: _Store, progress: _Progress, done: int, got: int
) -> tuple[Path, int] | None:
    """RETR `number` into the store, durably: (its path, its octets); None if refused."""
    session.core.retr(number)
    response = await session.response(f"RETR {number}")
    if not response.ok:
        return None  # e.g. removed meanwhile by another reader of the maildrop
    store.begin()
    try:
        octets = 0
        while True:
            event = await session.event()
            if isinstance(event, MessageData):
                store.write(event.data)
                octets += len(event.data)
                progress.update(done, got + octets)
            elif isinstance(event, MessageEnd):
                break
        return store.commit(event.octets), event.octets
    except BaseException:
        store.abort()
        raise


async def _download(
    session: _Session,
    *,
    store: _Store,
    state: _State,
    keep: bool,
    progress_stream: TextIO | None,
    result: FetchResult,
) -> set[str]:
    """STAT/LIST/UIDL and every message; returns the UIDLs marked for deletion."""
    core = session.core
    core.stat()
    stat = await session.response("STAT")
    if not stat.ok:
        raise FetchError(f"{session.where} refused STAT: {stat}", kind="refused",
                         temporary=True)
    count, _octets = stat_of(stat)
    if count == 0:
        state.keep_only(set())
        return set()
    core.list()
    listing = await session.response("LIST")
    if not listing.ok:
        raise FetchError(f"{session.where} refused LIST: {listing}", kind="refused",
                         temporary=True)
    sizes = sizes_of(listing)
    core.uidl()
    uidl = await session.response("UIDL")
    uids = uids_of(uidl) if uidl.ok else {}
    if not uidl.ok and keep:
        raise FetchError(f"{session.where} does not support UIDL, which --keep needs to "
                         "tell new messages from old ones", kind="refused")
    if uidl.ok:
        state.keep_only(set(uids.values()))  # the rest is gone from the server for good
    new = [n for n in sorted(sizes) if uids.get(n) not in state]
    progress = _Progress(progress_stream, len(new), sum(sizes[n] for n in new))
    marked: set[str] = set()
    deleting = 0
    try:
        for number in sorted(sizes):
            uid = uids.get(number)
            if uid is not None and uid in state:
                result.skipped += 1
            else:
                got = await _retrieve(session, number, store, progress,
                                      result.downloaded, result.octets)
                if got is None:
                    result.failed += 1
                    continue  # never deleted: it was not stored
                path, octets = got
                result.paths.append(path)
                result.downloaded += 1
                result.octets += octets
                if uid is not None:
                    state.add(uid)  # only now: the copy is on disk
                progress.update(result.downloaded, result.octets, force=not progress.tty)
            if not keep:
                core.dele(number)
                dele = await session.response(f"DELE {number}")
                if dele.ok:
                    deleting += 1
                    if uid is not None:
                        marked.add(uid)
                else:
                    session.trace(f"note: message {number} stays on the server")
    finally:
        progress.finish()
    result.deleted = deleting  # confirmed (or zeroed) by QUIT
    return marked


async def fetch(
    *,
    host: str,
    port: int,
    security: str,
    user: str,
    password: str,
    dest: Path,
    keep: bool = False,
    verify_cert: bool = True,
    cafile: str | None = None,
    auth: str = "auto",
    state_file: Path | None = None,
    progress: bool = False,
    trace: Trace | None = None,
    mbox: bool = False,
    crlf: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    progress_stream: TextIO | None = None,
) -> FetchResult:
    """Download every new message from host:port into `dest`; see the module docstring.

    `security` is "stls" (RFC 2595; the server must offer it) or "tls"
    (implicit, RFC 8314). `auth` is "auto" (SASL PLAIN when offered, else
    USER/PASS), "plain", "user" or "apop". `dest` is a Maildir (made when
    missing) or, with `mbox`, an mbox file. `progress` shows a progress line
    on `progress_stream` (default stderr) when there are many or large
    messages. Raises FetchError, carrying the partial result.
    """
    if security not in SECURITIES:
        raise FetchError(f"security must be one of {', '.join(SECURITIES)}, not {security!r}",
                         kind="usage")
    if auth not in AUTH_MODES:
        raise FetchError(f"auth must be one of {', '.join(AUTH_MODES)}, not {auth!r}",
                         kind="usage")
    dest = Path(dest)
    if state_file is None:
        state_file = (dest.parent / f".{dest.name}{STATE_NAME}") if mbox else dest / STATE_NAME
    state = _State(Path(state_file), f"pop3://{user}@{host}")
    state.load()
    store: _Store = _Mbox(dest, crlf=crlf) if mbox else _Maildir(dest, crlf=crlf)
    context = tls_context(verify_cert=verify_cert, cafile=cafile)
    result = FetchResult(0, 0, 0, 0, [])
    store.open()
    try:
        await _fetch(host, port, security, user, password, auth, keep, context, timeout,
                     trace, store, state, (progress_stream or sys.stderr) if progress else None,
                     result)
    except ClientError as exc:
        error = exc if isinstance(exc, FetchError) else FetchError(
            exc.text, kind=exc.kind, temporary=exc.temporary)
        result.deleted = 0
        error.result = result
        raise error from None
    except OSError as exc:  # writing the local copy: a full disk, a lost folder
        result.deleted = 0
        text = f"cannot store the messages: {exc.strerror or exc}"
        if exc.filename:
            text += f": {exc.filename}"
        error = FetchError(text, kind="local", temporary=True)
        error.result = result
        raise error from None
    finally:
        store.close()
    return result


async def _fetch(
    host: str,
    port: int,
    security: str,
    user: str,
    password: str,
    auth: str,
    keep: bool,
    context: ssl.SSLContext,
    timeout: float,
    trace: Trace | None,
    store: _Store,
    state: _State,
    progress_stream: TextIO | None,
    result: FetchResult,
) -> None:
    channel = await connect(host, port, timeout=timeout, error=FetchError, trace=trace)
    session = _Session(channel, host_port(host, port), timeout, trace)
    try:
        if security == "tls":
            await start_tls(channel, context, host, port, timeout=timeout, error=FetchError,
                            trace=trace)
        try:
            greeting = await session.event()
        except FetchError as exc:
            if security != "stls" or exc.kind != "lost":
                raise
            raise tls_expected(exc) from None
        assert isinstance(greeting, Response) and greeting.command == GREETING
        session.trace(f"S: {greeting}" + (" [Authorization state]" if greeting.ok else ""))
        if not greeting.ok:
            raise FetchError(f"{session.where} refused the session: {greeting}",
                             kind="refused", temporary=True)
        session.core.capa()
        capa = await session.response("CAPA")
        if security == "stls":
            if capa.ok and not session.core.capabilities.stls:
                await session.quit()
                raise FetchError(f"{session.where} does not offer STLS; not sending the "
                                 "password without TLS (try --security tls?)", kind="tls")
            session.core.stls()
            answer = await session.response("STLS")
            if not answer.ok:
                await session.quit()
                raise FetchError(f"{session.where} refused STLS: {answer}", kind="tls")
            leftover = channel.take()
            if leftover:
                session.core.receive_data(leftover)
                await session.event()  # raises: data behind the +OK (RFC 2595 4)
            await start_tls(channel, context, host, port, timeout=timeout, error=FetchError,
                            trace=trace)
            session.core.tls_started()
            session.core.capa()  # RFC 2595 4: what was learnt before TLS is void
            await session.response("CAPA")
        await _login(session, user, password, auth)
        marked = await _download(session, store=store, state=state, keep=keep,
                                 progress_stream=progress_stream, result=result)

        def update_note(response: Response) -> str:
            if not response.ok:
                return ""
            return f" [Update state: {result.deleted} deleted]"

        bye = await session.quit(update_note)
        if bye is None and result.deleted:
            result.deleted = 0
            raise FetchError(f"lost the connection with {session.where} before QUIT was "
                             "answered; nothing was deleted yet (the next fetch finishes)",
                             kind="lost", temporary=True)
        if bye is not None and not bye.ok:
            result.deleted = 0
            raise FetchError(f"{session.where} could not delete the messages: {bye} "
                             "(they are kept; the next fetch will not store them again)",
                             kind="refused", temporary=True)
        if marked:
            state.keep_only(set(state.uids) - marked)  # gone from the server for good
    except BaseException:
        channel.abort()
        raise


# --- The command line -----------------------------------------------------------------------


def default_security(port: int | None) -> str:
    return "tls" if port in IMPLICIT_TLS_PORTS else "stls"


def command(
    args: argparse.Namespace,
    *,
    stdout: TextIO,
    stderr: TextIO,
    environ: dict[str, str] | None = None,
) -> int:
    """`postroom fetch` with the arguments cli.add_fetch defines; returns the exit status."""
    try:
        host, port = parse_server(args.server)
    except ValueError as exc:
        print(f"postroom fetch: {exc}", file=stderr)
        return EX_USAGE
    security = args.security or default_security(port)
    if port is None:
        port = 995 if security == "tls" else 110
    trace = (lambda line: print(line, file=stderr, flush=True)) if args.verbose else None
    show_progress = args.progress or stderr.isatty()
    try:
        password = read_password(user=args.user, password_file=args.password_file,
                                 stderr=stderr, environ=environ)
        result = asyncio.run(fetch(
            host=host, port=port, security=security, user=args.user, password=password,
            dest=Path(args.dest), keep=args.keep, verify_cert=not args.insecure,
            cafile=args.cafile, auth=args.auth,
            state_file=Path(args.state_file) if args.state_file else None,
            progress=show_progress, trace=trace, mbox=args.mbox, crlf=args.crlf,
            timeout=args.timeout, progress_stream=stderr,
        ))
    except ClientError as exc:
        partial = getattr(exc, "result", None)
        if partial is not None and (partial.downloaded or partial.skipped):
            print(f"postroom fetch: {summary(partial, keep=args.keep)} before:", file=stderr)
        print(f"postroom fetch: {exc.text}{certificate_hint(exc)}", file=stderr)
        return exc.exit_code
    except (OSError, ValueError) as exc:
        where = getattr(exc, "filename", None)
        text = getattr(exc, "strerror", None) or str(exc)
        print(f"postroom fetch: {text}" + (f": {where}" if where else ""), file=stderr)
        return EX_USAGE
    print(summary(result, keep=args.keep), file=stdout)
    return EX_OK
