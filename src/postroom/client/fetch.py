"""`postroom fetch`: POP3 mail into a Maildir or mbox, deleted on the server only once safe.

`fetch` runs one POP3 session, the client core (`protocol.pop3_client`) on a
channel (`net.channel`): STLS (RFC 2595) or implicit TLS (RFC 8314), CAPA
(RFC 2449), a login with SASL PLAIN (RFC 5034) when offered, else USER/PASS,
or APOP when asked (RFC 1939 7); STAT, LIST and UIDL say what is there. The
messages go into a sink (`client.sinks`: a Maildir or an mbox file), which
keeps the UIDLs downloaded. Each new message is streamed into a local file
(never whole in memory) and made durable before anything else happens to it:

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

Failures are `ClientError`s a person can read; `fetch` raises them as a
`FetchError` that carries what was done before.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from postroom.client.connect import EX_OK, ClientError, ServerOptions, read_password, report
from postroom.client.sinks import STATE_NAME, MaildirSink, MboxSink, SeenUIDLs, Sink
from postroom.net.channel import Channel, ConnectionFailure, CoreSession, open_channel
from postroom.protocol.pop3_client import (
    APOP,
    AUTH,
    AUTH_RESPONSE,
    CAPA,
    GREETING,
    MAX_COMMAND_LINE,
    PASS,
    QUIT,
    Challenge,
    ConnectionClosed,
    LocalProtocolError,
    MessageData,
    MessageEnd,
    POP3Client,
    Response,
    sizes_of,
    stat_of,
    uids_of,
)
from postroom.protocol.sasl import PLAIN, ClientExchange, SASLError

AUTH_MODES = ("auto", "plain", "user", "apop")
# A progress line is worth showing from this many messages or octets on.
PROGRESS_MIN_MESSAGES = 20
PROGRESS_MIN_OCTETS = 1 << 20
PROGRESS_INTERVAL = 0.25  # seconds between updates of the line


@dataclass(frozen=True, kw_only=True)
class FetchOptions(ServerOptions):
    """What `fetch` downloads from where, and how it stores it."""

    # STLS (RFC 2595; the server must offer it) on 110, implicit TLS on 995
    # (RFC 8314 7); 2995 is postroom's loopback default.
    ports = {"stls": 110, "tls": 995}
    implicit_tls_ports = frozenset({995, 2995})

    dest: Path  # a Maildir (made when missing), or with `mbox` an mbox file
    keep: bool = False  # leave the messages on the server, fetch only new ones next time
    auth: str = "auto"  # SASL PLAIN when offered, else USER/PASS; or "plain", "user", "apop"
    state_file: Path | None = None  # the UIDLs already downloaded; default beside `dest`
    progress: bool = False  # a progress line when there are many or large messages
    progress_stream: TextIO | None = None  # where it goes; default stderr
    mbox: bool = False
    crlf: bool = False  # store CRLF line ends as sent (default: LF)

    def __post_init__(self) -> None:
        super().__post_init__()
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
        """Show the line: when `force`d, else on a terminal every PROGRESS_INTERVAL."""
        now = time.monotonic()
        due = force or (self.tty and now - self._last >= PROGRESS_INTERVAL)
        if not self.on or self.stream is None or not due:
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


# What the trace adds to a positive answer: the state the session enters (RFC 1939 3).
_STATE_NOTES = {GREETING: "Authorization state", PASS: "Transaction state",
                APOP: "Transaction state", AUTH: "Transaction state",
                AUTH_RESPONSE: "Transaction state", QUIT: "Update state: {deleted} deleted"}


class _Session(CoreSession[POP3Client]):
    """One POP3 session's I/O: the core's commands and answers over the channel, in the trace."""

    closed_event = ConnectionClosed

    def __init__(self, channel: Channel, options: FetchOptions, result: FetchResult) -> None:
        super().__init__(channel, POP3Client(), options.trace)
        self.where = options.where
        self.timeout = options.timeout
        self.result = result  # its count of deletions goes into QUIT's note

    async def event(self) -> Response | Challenge | MessageData | MessageEnd:
        """The next event; a -ERR on the server's own ends the session (ClientError)."""
        event = await self.next_event(self.timeout)
        assert isinstance(event, Response | Challenge | MessageData | MessageEnd)
        if isinstance(event, Response) and not event.command:
            self.trace(f"S: {event}")
            self.close(abort=True)
            raise ClientError(f"{self.where} ended the session: {event}", kind="lost",
                              temporary=True)
        return event

    def show(self, response: Response) -> None:
        """Put an answer into the trace: its listing in short, the state it enters."""
        shown = str(response)
        count = len(response.lines)
        if count and response.command != CAPA:
            shown += f" ({count} line{'s' if count != 1 else ''})"
        elif count:
            shown += f" ({', '.join(response.lines)})"
        note = _STATE_NOTES.get(response.command) if response.ok else None
        if note is not None:
            shown += f" [{note.format(deleted=self.result.deleted)}]"
        self.trace(f"S: {shown}")

    async def command(self, shown: str) -> Response | Challenge:
        """Send what the core holds and return the status line answering it."""
        self.trace(f"C: {shown}")
        await self.flush(self.timeout)
        event = await self.event()
        assert isinstance(event, Response | Challenge)
        if isinstance(event, Challenge):
            self.trace(f"S: + {event.text}".rstrip())
        else:
            self.show(event)
        return event

    async def response(self, shown: str) -> Response:
        event = await self.command(shown)
        assert isinstance(event, Response)  # the core takes a continuation only for AUTH
        return event

    async def needed(self, shown: str) -> Response:
        """The answer to a command the fetch cannot do without: a -ERR raises."""
        response = await self.response(shown)
        if not response.ok:
            raise ClientError(f"{self.where} refused {shown}: {response}", kind="refused",
                              temporary=True)
        return response

    async def quit(self) -> Response | None:
        """QUIT (when the session is fit for it), then close; the answer, or None."""
        try:
            self.core.quit()
            answer = await self.response("QUIT")
        except (ClientError, ConnectionFailure, LocalProtocolError):
            answer = None
        self.close()
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


async def _login(session: _Session, user: str, password: str, auth: str) -> None:
    core = session.core
    if auth == "auto":
        auth = "plain" if PLAIN in core.capabilities.sasl else "user"
    if auth == "apop":
        if core.timestamp is None:
            raise ClientError(f"{session.where} does not offer APOP (its greeting has no "
                              "timestamp)", kind="auth")
        core.apop(user, password)
        response = await session.response(f"APOP {user} (digest)")
    elif auth == "user":
        core.user(user)
        response = await session.response(f"USER {user}")
        if response.ok:
            core.pass_(password)
            response = await session.response("PASS (hidden)")
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
    event = await session.command("AUTH PLAIN (credentials hidden)")
    while isinstance(event, Challenge):
        try:
            core.auth_response(exchange.respond(event.text))
        except SASLError:
            core.auth_response("*")  # RFC 5034 4: cancel
            await session.command("*")
            raise ClientError(f"{session.where} sent an unusable SASL challenge",
                              kind="protocol") from None
        event = await session.command("(credentials hidden)")
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
        try:
            for number in sorted(sizes):
                if await self._one(number, uids.get(number), progress):
                    self.result.deleted += 1  # once QUIT confirms it; zeroed on a failure
        finally:
            progress.finish()

    async def _listing(self) -> tuple[dict[int, int], dict[int, str]] | None:
        """(size, UIDL) of each message by number; None when the maildrop is empty."""
        session, core = self.session, self.session.core
        core.stat()
        count, _octets = stat_of(await session.needed("STAT"))
        if count == 0:
            self.state.keep_only(set())
            return None
        core.list()
        listing = await session.needed("LIST")
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


async def _open(session: _Session, options: FetchOptions, context: ssl.SSLContext) -> None:
    """TLS, the greeting and CAPA: the session ready for the login."""
    name = options.host.strip("[]")
    if options.security == "tls":
        await session.start_tls(context, name, options.timeout)
    greeting = await session.event()
    assert isinstance(greeting, Response) and greeting.command == GREETING
    session.show(greeting)
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
    await session.start_tls(context, name, options.timeout)
    session.core.tls_started()
    session.core.capa()  # RFC 2595 4: what was learnt before TLS is void
    await session.response("CAPA")


async def _quit(session: _Session, result: FetchResult) -> None:
    """QUIT, which makes the server delete what was marked (RFC 1939 6): confirmed or not."""
    bye = await session.quit()
    if bye is None and result.deleted:
        raise ClientError(f"lost the connection with {session.where} before QUIT was "
                          "answered; nothing was deleted yet (the next fetch finishes)",
                          kind="lost", temporary=True)
    if bye is not None and not bye.ok:
        raise ClientError(f"{session.where} could not delete the messages: {bye} "
                          "(they are kept; the next fetch will not store them again)",
                          kind="refused", temporary=True)


# --- The fetch -------------------------------------------------------------------------


class FetchError(ClientError):
    """The fetch failed; `result` says what was done before (messages already safe)."""

    result: FetchResult | None = None

    @classmethod
    def of(cls, exc: ClientError | ConnectionFailure | OSError, options: FetchOptions,
           result: FetchResult) -> FetchError:
        """`exc` in words, carrying `result`; an OSError is one of writing the local copy
        (a full disk, a lost folder)."""
        if isinstance(exc, ConnectionFailure):
            exc = options.error(exc, ClientError, answer="answer")
        elif isinstance(exc, OSError):
            where = f": {exc.filename}" if exc.filename else ""
            exc = ClientError(f"cannot store the messages: {exc.strerror or exc}{where}",
                              kind="local", temporary=True)
        error = cls(exc.text, kind=exc.kind, temporary=exc.temporary)
        error.result = result
        return error


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


async def fetch(options: FetchOptions) -> FetchResult:
    """Download every new message as `options` say; see the module docstring.

    Raises FetchError, carrying the partial result (nothing in it counts as deleted).
    """
    dest = Path(options.dest)
    state_file = options.state_file
    if state_file is None:  # beside the mbox file, inside the Maildir
        state_file = dest.parent / f".{dest.name}{STATE_NAME}" if options.mbox else (
            dest / STATE_NAME)
    result = FetchResult()
    store: Sink | None = None
    session = None
    try:
        state = SeenUIDLs(Path(state_file), f"pop3://{options.user}@{options.host}")
        state.load()
        store = (MboxSink if options.mbox else MaildirSink)(dest, crlf=options.crlf)
        context = options.tls_context()
        store.open()
        channel = await open_channel(options.host, options.port, options.timeout)
        session = _Session(channel, options, result)
        session.trace(channel.connected_line(options.host, options.port))
        await _open(session, options, context)
        await _login(session, options.user, options.password, options.auth)
        download = _Download(session, store, state, options.keep, result)
        await download.run((options.progress_stream or sys.stderr) if options.progress else None)
        await _quit(session, result)
        if download.marked:
            state.keep_only(set(state.uids) - download.marked)  # gone from the server
    except (ClientError, ConnectionFailure, OSError) as exc:
        result.deleted = 0
        raise FetchError.of(exc, options, result) from None
    finally:
        if session is not None:
            session.close(abort=True)  # a no-op after QUIT
        if store is not None:
            store.close()
    return result


# --- The command line -----------------------------------------------------------------------


def command(args: argparse.Namespace, *, stdout: TextIO, stderr: TextIO) -> int:
    """`postroom fetch` with the arguments cli.add_fetch defines; returns the exit status."""
    try:
        server = FetchOptions.from_args(args, stderr)
        password = read_password(args.user, args.password_file)
        options = FetchOptions(
            **server, user=args.user, password=password, dest=Path(args.dest), keep=args.keep,
            auth=args.auth, state_file=Path(args.state_file) if args.state_file else None,
            progress=args.progress or stderr.isatty(), progress_stream=stderr,
            mbox=args.mbox, crlf=args.crlf)
        result = asyncio.run(fetch(options))
    except (ClientError, OSError, ValueError) as exc:
        partial = getattr(exc, "result", None)
        if partial is not None and (partial.downloaded or partial.skipped):
            print(f"postroom fetch: {summary(partial, keep=args.keep)} before:", file=stderr)
        return report("postroom fetch", exc, stderr)
    print(summary(result, keep=args.keep), file=stdout)
    return EX_OK
