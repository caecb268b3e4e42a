"""The POP3 session of `postroom fetch`: TLS, login, the listing, each new message, QUIT.

The POP3 client core (`protocol.pop3_client`) on a channel (`net.channel`):
STLS (RFC 2595) or implicit TLS (RFC 8314), CAPA (RFC 2449), a login with
SASL PLAIN (RFC 5034) when offered, else USER/PASS, or APOP when asked
(RFC 1939 7). STAT, LIST and UIDL say what is there. Each new message is
RETR'd into the sink, committed (durable), its UIDL recorded, and only then,
without --keep, marked with DELE; QUIT makes the server delete what was
marked (RFC 1939 6). Failures are `ClientError`s a person can read.
"""

from __future__ import annotations

import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from postroom.client.connect import (
    ClientError,
    Trace,
    connect_error,
    tls_error,
    tls_expected,
    waiting_for,
)
from postroom.client.sinks import Sink
from postroom.client.uidl_state import SeenUIDLs
from postroom.net.channel import Channel, ConnectFailed, TLSFailed, host_port, open_channel
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

SECURITIES = ("stls", "tls")
AUTH_MODES = ("auto", "plain", "user", "apop")
DEFAULT_TIMEOUT = 120.0  # seconds for the connection and each answer
# A progress line is worth showing from this many messages or octets on.
PROGRESS_MIN_MESSAGES = 20
PROGRESS_MIN_OCTETS = 1 << 20
PROGRESS_INTERVAL = 0.25  # seconds between updates of the line


@dataclass(frozen=True)
class FetchOptions:
    """What `fetch` downloads from where, and how it stores it."""

    host: str
    port: int
    security: str  # "stls" (RFC 2595; the server must offer it) or "tls" (RFC 8314)
    user: str
    password: str = field(repr=False)
    dest: Path  # a Maildir (made when missing), or with `mbox` an mbox file
    keep: bool = False  # leave the messages on the server, fetch only new ones next time
    verify_cert: bool = True
    cafile: str | None = None  # CA certificates trusted besides the system's
    auth: str = "auto"  # SASL PLAIN when offered, else USER/PASS; or "plain", "user", "apop"
    state_file: Path | None = None  # the UIDLs already downloaded; default beside `dest`
    progress: bool = False  # a progress line when there are many or large messages
    progress_stream: TextIO | None = None  # where it goes; default stderr
    trace: Trace | None = None  # told every line of the conversation, passwords hidden
    mbox: bool = False
    crlf: bool = False  # store CRLF line ends as sent (default: LF)
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.security not in SECURITIES:
            raise ClientError(f"security must be one of {', '.join(SECURITIES)}, "
                              f"not {self.security!r}", kind="usage")
        if self.auth not in AUTH_MODES:
            raise ClientError(f"auth must be one of {', '.join(AUTH_MODES)}, not {self.auth!r}",
                              kind="usage")


@dataclass
class FetchResult:
    """What a fetch did."""

    downloaded: int = 0  # messages stored locally in this run
    deleted: int = 0  # messages deleted on the server (QUIT confirmed it)
    skipped: int = 0  # messages already downloaded before (recognised by UIDL)
    octets: int = 0  # octets downloaded, as the server counts them (CRLF)
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


Note = Callable[[Response], str]


class _Session:
    """One POP3 session's I/O: the core's commands and answers over the channel, in the trace."""

    def __init__(self, channel: Channel, where: str, timeout: float, trace: Trace | None):
        self.channel = channel
        self.core = POP3Client()
        self.where = where
        self.timeout = timeout
        self._trace = trace

    def trace(self, line: str) -> None:
        if self._trace is not None:
            self._trace(line)

    def lost(self, text: str, kind: str = "lost") -> ClientError:
        """The error for a session that cannot go on; the connection is dropped."""
        self.channel.abort()
        return ClientError(text, kind=kind, temporary=True)

    async def start_tls(self, context: ssl.SSLContext, host: str) -> None:
        try:
            await self.channel.start_tls(context, host.strip("[]"), self.timeout)
        except TLSFailed as failure:
            raise tls_error(failure, self.where, ClientError) from None
        self.trace(f"TLS: {self.channel.tls_description()}")

    async def flush(self) -> None:
        data = self.core.data_to_send()
        if not data:
            return
        try:
            self.channel.write(data)
            await self.channel.drain(self.timeout)
        except TimeoutError:
            raise self.lost(f"{self.where} stopped reading for {self.timeout:g}s") from None
        except OSError as exc:
            raise self.lost(f"lost the connection with {self.where}: {exc}") from None

    async def event(self) -> Response | Challenge | MessageData | MessageEnd:
        """The next event; EOF, timeout or a protocol error raises ClientError."""
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

    async def command(self, shown: str, note: Note | None = None) -> Response | Challenge:
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

    async def response(self, shown: str, note: Note | None = None) -> Response:
        event = await self.command(shown, note)
        if not isinstance(event, Response):
            raise self.lost(f"{self.where} sent a continuation outside AUTH", "protocol")
        return event

    async def quit(self, note: Note | None = None) -> Response | None:
        """QUIT (when the session is fit for it), then close; the answer, or None."""
        try:
            self.core.quit()
            answer = await self.response("QUIT", note)
        except (ClientError, LocalProtocolError):
            answer = None
        self.channel.close()
        return answer


# --- Logging on -----------------------------------------------------------------------


def _login_failure(session: _Session, user: str, response: Response) -> ClientError:
    code = response.code or ""
    if code == "IN-USE":  # RFC 2449 8.1.1
        return ClientError(f"the mailbox of {user} at {session.where} is in use (another "
                           f"POP3 session?): {response}", kind="auth", temporary=True)
    if code.startswith("SYS/TEMP") or code == "LOGIN-DELAY":  # RFC 3206 4, RFC 2449 8.1.2
        return ClientError(f"{session.where} cannot log {user} on now: {response}",
                           kind="auth", temporary=True)
    return ClientError(f"authentication failed for {user} at {session.where}: {response}",
                       kind="auth")


def _transaction_note(response: Response) -> str:
    return " [Transaction state]" if response.ok else ""


async def _login(session: _Session, user: str, password: str, auth: str) -> None:
    core = session.core
    mode = auth
    if mode == "auto":
        mode = "plain" if PLAIN in core.capabilities.sasl else "user"
    if mode == "apop":
        if core.timestamp is None:
            raise ClientError(f"{session.where} does not offer APOP (its greeting has no "
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
        response = await _sasl_plain(session, user, password)
    if not response.ok:
        raise _login_failure(session, user, response)


async def _sasl_plain(session: _Session, user: str, password: str) -> Response:
    """AUTH PLAIN (RFC 5034), its initial response on the command line when it fits."""
    core = session.core
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
            raise ClientError(f"{session.where} sent an unusable SASL challenge",
                              kind="protocol") from None
        event = await session.command("(credentials hidden)", _transaction_note)
    return event


# --- Downloading ----------------------------------------------------------------------


class _Download:
    """STAT, LIST, UIDL, then each message: stored, recorded, and (without keep) DELE'd."""

    def __init__(self, session: _Session, store: Sink, state: SeenUIDLs, keep: bool,
                 result: FetchResult) -> None:
        self.session = session
        self.store = store
        self.state = state
        self.keep = keep
        self.result = result
        self.marked: set[str] = set()  # UIDLs of the messages marked for deletion

    async def run(self, progress_stream: TextIO | None) -> None:
        listing = await self._listing()
        if listing is None:
            return
        sizes, uids = listing
        new = [n for n in sorted(sizes) if uids.get(n) not in self.state]
        progress = _Progress(progress_stream, len(new), sum(sizes[n] for n in new))
        deleting = 0
        try:
            for number in sorted(sizes):
                if await self._one(number, uids.get(number), progress):
                    deleting += 1
        finally:
            progress.finish()
        self.result.deleted = deleting  # confirmed (or zeroed) by QUIT

    async def _listing(self) -> tuple[dict[int, int], dict[int, str]] | None:
        """(size, UIDL) of each message by number; None when the maildrop is empty."""
        session, core = self.session, self.session.core
        core.stat()
        stat = await session.response("STAT")
        if not stat.ok:
            raise ClientError(f"{session.where} refused STAT: {stat}", kind="refused",
                              temporary=True)
        count, _octets = stat_of(stat)
        if count == 0:
            self.state.keep_only(set())
            return None
        core.list()
        listing = await session.response("LIST")
        if not listing.ok:
            raise ClientError(f"{session.where} refused LIST: {listing}", kind="refused",
                              temporary=True)
        core.uidl()
        uidl = await session.response("UIDL")
        if not uidl.ok and self.keep:
            raise ClientError(f"{session.where} does not support UIDL, which --keep needs "
                              "to tell new messages from old ones", kind="refused")
        uids = uids_of(uidl) if uidl.ok else {}
        if uidl.ok:
            self.state.keep_only(set(uids.values()))  # the rest is gone from the server
        return sizes_of(listing), uids

    async def _one(self, number: int, uid: str | None, progress: _Progress) -> bool:
        """One message: stored unless seen before, then DELE unless kept; whether marked."""
        result = self.result
        if uid is not None and uid in self.state:
            result.skipped += 1
        else:
            got = await self._retrieve(number, progress)
            if got is None:
                result.failed += 1
                return False  # never deleted: it was not stored
            path, octets = got
            result.paths.append(path)
            result.downloaded += 1
            result.octets += octets
            if uid is not None:
                self.state.add(uid)  # only now: the copy is on disk
            progress.update(result.downloaded, result.octets, force=not progress.tty)
        if self.keep:
            return False
        self.session.core.dele(number)
        dele = await self.session.response(f"DELE {number}")
        if not dele.ok:
            self.session.trace(f"note: message {number} stays on the server")
            return False
        if uid is not None:
            self.marked.add(uid)
        return True

    async def _retrieve(self, number: int, progress: _Progress) -> tuple[Path, int] | None:
        """RETR `number` into the store, durably: (its path, its octets); None if refused."""
        session, store, result = self.session, self.store, self.result
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
                    progress.update(result.downloaded, result.octets + octets)
                elif isinstance(event, MessageEnd):
                    break
            return store.commit(event.octets), event.octets
        except BaseException:
            store.abort()
            raise


# --- The session ----------------------------------------------------------------------


async def run(options: FetchOptions, context: ssl.SSLContext, store: Sink, state: SeenUIDLs,
              result: FetchResult) -> None:
    """One session as `options` say, into `store`; `result` counts what was done."""
    where = host_port(options.host, options.port)
    try:
        channel = await open_channel(options.host, options.port, options.timeout)
    except ConnectFailed as failure:
        raise connect_error(failure, where, ClientError) from None
    session = _Session(channel, where, options.timeout, options.trace)
    session.trace(channel.connected_line(options.host, options.port))
    try:
        await _open(session, options, context)
        await _login(session, options.user, options.password, options.auth)
        download = _Download(session, store, state, options.keep, result)
        stream = (options.progress_stream or sys.stderr) if options.progress else None
        await download.run(stream)
        await _quit(session, result)
        if download.marked:
            state.keep_only(set(state.uids) - download.marked)  # gone from the server
    except BaseException:
        channel.abort()
        raise


async def _open(session: _Session, options: FetchOptions, context: ssl.SSLContext) -> None:
    """TLS, the greeting and CAPA: the session ready for the login."""
    if options.security == "tls":
        await session.start_tls(context, options.host)
    try:
        greeting = await session.event()
    except ClientError as exc:
        if options.security != "stls" or exc.kind != "lost":
            raise
        raise tls_expected(exc) from None
    assert isinstance(greeting, Response) and greeting.command == GREETING
    session.trace(f"S: {greeting}" + (" [Authorization state]" if greeting.ok else ""))
    if not greeting.ok:
        raise ClientError(f"{session.where} refused the session: {greeting}",
                          kind="refused", temporary=True)
    session.core.capa()
    capa = await session.response("CAPA")
    if options.security != "stls":
        return
    if capa.ok and not session.core.capabilities.stls:
        await session.quit()
        raise ClientError(f"{session.where} does not offer STLS; not sending the "
                          "password without TLS (try --security tls?)", kind="tls")
    session.core.stls()
    answer = await session.response("STLS")
    if not answer.ok:
        await session.quit()
        raise ClientError(f"{session.where} refused STLS: {answer}", kind="tls")
    leftover = session.channel.take()
    if leftover:
        session.core.receive_data(leftover)
        await session.event()  # raises: data behind the +OK (RFC 2595 4)
    await session.start_tls(context, options.host)
    session.core.tls_started()
    session.core.capa()  # RFC 2595 4: what was learnt before TLS is void
    await session.response("CAPA")


async def _quit(session: _Session, result: FetchResult) -> None:
    """QUIT, which makes the server delete what was marked (RFC 1939 6): confirmed or not."""

    def update_note(response: Response) -> str:
        return f" [Update state: {result.deleted} deleted]" if response.ok else ""

    bye = await session.quit(update_note)
    if bye is None and result.deleted:
        result.deleted = 0
        raise ClientError(f"lost the connection with {session.where} before QUIT was "
                          "answered; nothing was deleted yet (the next fetch finishes)",
                          kind="lost", temporary=True)
    if bye is not None and not bye.ok:
        result.deleted = 0
        raise ClientError(f"{session.where} could not delete the messages: {bye} "
                          "(they are kept; the next fetch will not store them again)",
                          kind="refused", temporary=True)
