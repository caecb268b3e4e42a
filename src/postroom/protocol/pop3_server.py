"""The sans-IO POP3 server core: client bytes in, events out; the app's answers in, bytes out.

It speaks RFC 1939 (POP3) with RFC 2449 (CAPA, response codes), RFC 2595 (STLS),
RFC 3206 (AUTH/SYS response codes) and RFC 5034 (SASL AUTH); not RFC 6856 (UTF8),
for the reasons given at `_COMMANDS`.
The server layer owns sockets, TLS, clocks and the maildrop; this core owns the
session: states, parsing, limits, and everything that needs no storage (CAPA,
NOOP, STAT/LIST/UIDL from the snapshot, DELE/RSET bookkeeping, state errors).

Use it like h11:

    core = POP3Server(POP3ServerConfig(stls=True))
    core.greeting("postroom POP3 ready")
    while not core.closing:
        write(core.data_to_send())
        event = core.next_event()
        if event is NEED_DATA:
            core.receive_data(read())          # b"" at EOF
        elif event is PAUSED:
            ...                                # STLS accepted: handshake, then tls_started()
        elif isinstance(event, Pass):
            core.login_succeeded(snapshot)     # or core.err("...", "AUTH")
        elif isinstance(event, Retrieve):
            for chunk in message_file:         # or core.err("...", "SYS/TEMP") before any chunk
                core.send_message_chunk(chunk)
            core.end_message()
        ...
    write(core.data_to_send())

Every event that needs an answer (User, Pass, Apop, AuthStart, AuthResponse,
StartTLS, Retrieve, Top, Update) pauses the core until the app gives it;
AuthCancelled and ConnectionClosed need none. Pipelined commands wait in the
core's buffer meanwhile, so the server layer should stop reading while
next_event() returns PAUSED. Calling an answer that does not
fit the pending event raises LocalProtocolError, the only exception the core
raises; the client can never make it raise.

Message bytes given to send_message_chunk may use LF or CRLF line ends (Maildir
files hold LF); they go out as CRLF, byte-stuffed (RFC 1939 3), and end with
CRLF "." CRLF. For TOP the core cuts the stream itself (headers, the blank
line, then n body lines) so the app sends the message the same way as for
RETR and may stop early once `wants_more` turns False.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from postroom.protocol._core import NEED_DATA, PAUSED, LocalProtocolError, Signal
from postroom.protocol.pop3_events import (
    Apop,
    AuthCancelled,
    AuthResponse,
    AuthStart,
    ConnectionClosed,
    Event,
    Pass,
    Retrieve,
    StartTLS,
    Top,
    Update,
    User,
)

# The events live in pop3_events; they are part of this module's API too.
__all__ = [
    "MAX_COMMAND_LINE",
    "MAX_AUTH_LINE",
    "MAX_RESPONSE_LINE",
    "LocalProtocolError",
    "State",
    "Pop3Reply",
    "MessageInfo",
    "Snapshot",
    "POP3ServerConfig",
    "POP3Server",
    "Signal",
    "NEED_DATA",
    "PAUSED",
    "Event",
    "User",
    "Pass",
    "Apop",
    "AuthStart",
    "AuthResponse",
    "AuthCancelled",
    "StartTLS",
    "Retrieve",
    "Top",
    "Update",
    "ConnectionClosed",
]

# RFC 2449 4: a command line, keyword and arguments with the terminating CRLF, is at
# most 255 octets.
MAX_COMMAND_LINE = 255
# RFC 5034 4: SASL responses are not bound by the 255-octet command limit (tokens such
# as GSSAPI's outgrow it); 8 KiB holds every mechanism postroom offers with room left.
MAX_AUTH_LINE = 8192
# RFC 2449 4: a response line is at most 512 octets including the CRLF.
MAX_RESPONSE_LINE = 512
# RFC 1939 7 (UIDL): a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
_UID = re.compile(r"[\x21-\x7e]{1,70}")
# RFC 2449 8: a response code is one or more atoms separated by "/".
_RESP_CODE = re.compile(r"[A-Za-z0-9-]+(/[A-Za-z0-9-]+)*")
# RFC 1939 7 (APOP): the greeting's timestamp has the syntax of a msg-id, "<...>".
_TIMESTAMP = re.compile(r"<[\x21-\x3d\x3f-\x7e]+>")
# Mechanisms that send the password itself: refused before TLS unless allowed.
_PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})


class State(enum.Enum):
    """Session states: RFC 1939 3's three plus the waits this core needs around them."""

    GREETING = "GREETING"  # connected; the app has not sent the greeting yet
    AUTHORIZATION = "AUTHORIZATION"  # RFC 1939 4
    SASL = "SASL"  # inside an AUTH exchange: each line is a response (RFC 5034 4)
    STARTING_TLS = "STARTING_TLS"  # STLS accepted: input discarded until the handshake
    TRANSACTION = "TRANSACTION"  # RFC 1939 5
    UPDATE = "UPDATE"  # RFC 1939 6: QUIT seen, the app is removing messages
    CLOSED = "CLOSED"


# How the session moves: (state, trigger) -> next state. A trigger names what just
# happened (a reply the core or the app gave, an I/O signal). `_move` is the only
# writer of the state; a pair not in the table raises LocalProtocolError naming both.
_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.GREETING, "greeting"): State.AUTHORIZATION,
    (State.AUTHORIZATION, "challenge"): State.SASL,
    (State.SASL, "challenge"): State.SASL,
    (State.AUTHORIZATION, "auth_end"): State.AUTHORIZATION,
    (State.SASL, "auth_end"): State.AUTHORIZATION,
    (State.AUTHORIZATION, "login"): State.TRANSACTION,
    (State.SASL, "login"): State.TRANSACTION,
    (State.AUTHORIZATION, "stls"): State.STARTING_TLS,
    (State.STARTING_TLS, "tls_started"): State.AUTHORIZATION,
    (State.AUTHORIZATION, "quit"): State.CLOSED,
    (State.TRANSACTION, "quit"): State.UPDATE,
    (State.UPDATE, "update_done"): State.CLOSED,
    # EOF, timeout, too many errors, refusal: any open session may end. RFC 1939 6:
    # only QUIT reaches UPDATE, so none of these ever deletes a message.
    **{(s, "close"): State.CLOSED for s in State if s is not State.CLOSED},
}

# Which commands each state accepts (RFC 1939 9; CAPA RFC 2449 5; STLS RFC 2595 4;
# AUTH RFC 5034 4). A known command elsewhere gets -ERR.
#
# UTF8 (RFC 6856) is neither offered nor understood. Offering it is a promise about
# every session: a client that has not sent UTF8 must never see UTF-8 header fields,
# so each message that has them must be served as a downgraded surrogate (RFC 6857,
# RFC 6858) whose size LIST reports exactly, and the USER, PASS and APOP arguments
# fall under SASLprep. Doing that means opening every message at login to learn
# whether it needs a surrogate, and serving a message other than the one stored.
# Without the extension, a client gets each message as it was filed, as from any
# RFC 1939 server (Dovecot's POP3 offers no UTF8 either), and this is what the
# clients postroom is tested with expect: curl, mpop, fetchmail, getmail and
# Python's poplib never send UTF8 unless told to. A user with a UTF-8 address
# still logs in: AUTH PLAIN carries UTF-8 (RFC 4616 2) and USER and PASS are read
# as UTF-8 (they are matched against the directory's canonical spelling).
_COMMANDS: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset(
        {"USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT"}
    ),
    State.TRANSACTION: frozenset(
        {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "CAPA", "QUIT"}
    ),
}
_KNOWN_COMMANDS = frozenset().union(*_COMMANDS.values())


class _Overlong(enum.Enum):
    """Stands in the line stream for a line past its limit."""

    LINE = "LINE"


_TOO_LONG = _Overlong.LINE


@dataclass(frozen=True, slots=True)
class Pop3Reply:
    """One status line: "+OK text" or "-ERR [CODE] text" (RFC 1939 3, RFC 2449 8)."""

    ok: bool
    text: str = ""
    code: str | None = None

    def __post_init__(self) -> None:
        if "\r" in self.text or "\n" in self.text:
            raise LocalProtocolError(f"reply text must be one line: {self.text!r}")
        if self.code is not None and not _RESP_CODE.fullmatch(self.code):
            raise LocalProtocolError(f"malformed response code: {self.code!r}")

    def to_bytes(self) -> bytes:
        line = "+OK" if self.ok else "-ERR"
        if self.code:
            line += f" [{self.code}]"
        if self.text:
            line += " " + self.text
        data = line.encode("utf-8")
        if len(data) > MAX_RESPONSE_LINE - 2:
            # RFC 2449 4; cut on a character boundary so the line stays valid UTF-8.
            cut = data[: MAX_RESPONSE_LINE - 2].decode("utf-8", "ignore")
            data = cut.encode("utf-8")
        return data + b"\r\n"


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a maildrop snapshot.

    `size` is what LIST reports: the octets as sent, with CRLF line ends and before
    byte-stuffing (RFC 1939 5). `uid` is the UIDL unique-id (RFC 1939 7).
    """

    size: int
    uid: str

    def __post_init__(self) -> None:
        if self.size < 0:
            raise LocalProtocolError(f"negative message size: {self.size}")
        if not _UID.fullmatch(self.uid):
            raise LocalProtocolError(f"unique-id must be 1-70 chars 0x21-0x7E: {self.uid!r}")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The maildrop as it was at login; message N is messages[N - 1] (RFC 1939 5)."""

    messages: tuple[MessageInfo, ...]

    @classmethod
    def of(cls, items: Iterable[tuple[int, str]]) -> Snapshot:
        """Build from (size, uid) pairs in message-number order."""
        return cls(tuple(MessageInfo(size, uid) for size, uid in items))


_LOGIN_EVENTS = (Pass, Apop, AuthStart, AuthResponse)
_MESSAGE_EVENTS = (Retrieve, Top)


@dataclass(frozen=True)
class POP3ServerConfig:
    """What this listener offers; the server layer builds one per connection kind."""

    implementation: str = "postroom"
    stls: bool = False  # STLS offered (until TLS is active)
    tls_active: bool = False  # implicit TLS (pop3s, RFC 8314)
    allow_plaintext_auth: bool = False  # USER/PASS and AUTH PLAIN/LOGIN before TLS
    sasl_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    apop_timestamp: str | None = None  # "<pid.clock@host>" in the greeting turns APOP on
    login_delay: int | None = None  # RFC 2449 6.5, seconds
    expire: str | None = None  # RFC 2449 6.7: "NEVER" or days
    max_errors: int = 10


class _MessageWriter:
    """Turns message bytes into a multi-line body: CRLF line ends, byte-stuffed lines
    (RFC 1939 3), and for TOP only the headers, blank line and n body lines (RFC 1939 7).

    Works chunk by chunk with bytes.replace, never line by line: a CR at a chunk's end
    waits for the next chunk (it may start a CRLF), and `_at_line_start` carries
    whether the next byte begins a line, for stuffing and for finding the blank line.
    """

    __slots__ = ("_pending_cr", "_at_line_start", "_in_headers", "_body_lines", "done")

    def __init__(self, top_lines: int | None) -> None:
        self._pending_cr = False
        self._at_line_start = True
        self._in_headers = top_lines is not None
        self._body_lines = top_lines  # lines of body still wanted; None = all
        self.done = False  # TOP has all it needs: further chunks are dropped

    def feed(self, data: bytes, crlf: bool = False) -> bytes:
        """The multi-line text for this chunk; `crlf`: the caller knows the chunk has
        no bare LF, so the two passes that would turn bare LFs into CRLF (a third of
        the cost of a small RETR) would change nothing and are skipped."""
        if self.done or not data:
            return b""
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data[-1] == 0x0D:
            data = data[:-1]
            self._pending_cr = True
            if not data:
                return b""
        if not crlf:
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n")
            data = data.replace(b"\n", b"\r\n")
        if self._body_lines is not None:
            data = self._cut(data)
            if self.done:
                self._pending_cr = False
            if not data:
                return b""
        stuffed = data.replace(b"\n.", b"\n..")
        if self._at_line_start and data[0] == 0x2E:
            stuffed = b"." + stuffed
        self._at_line_start = data[-1] == 0x0A
        return stuffed

    def _cut(self, data: bytes) -> bytes:
        """Keep what TOP sends of this (CRLF-normalised) chunk."""
        start = 0
        if self._in_headers:
            if self._at_line_start and data.startswith(b"\r\n"):
                start = 2
            else:
                blank = data.find(b"\n\r\n")
                if blank < 0:
                    return data
                start = blank + 3
            self._in_headers = False
        wanted = self._body_lines
        assert wanted is not None
        if wanted == 0:
            self.done = True
            return data[:start]
        found = data.count(b"\n", start)
        if found < wanted:
            self._body_lines = wanted - found
            return data
        end = start
        for _ in range(wanted):  # at most `wanted` steps, and TOP asks for few lines
            end = data.index(b"\n", end) + 1
        self._body_lines = 0
        self.done = True
        return data[:end]

    def finish(self) -> bytes:
        """The rest of the body and the terminating "." line."""
        if self.done:
            return b".\r\n"
        if self._pending_cr or not self._at_line_start:
            # A last line without a line end gets one (a lone final CR becomes CRLF).
            return b"\r\n.\r\n"
        return b".\r\n"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _number(text: str) -> int | None:
    """A decimal argument: ASCII digits only, no sign or spaces (RFC 1939 3)."""
    if text.isascii() and text.isdigit():
        return int(text)
    return None


class POP3Server:
    """One POP3 session seen from the server (see the module docstring for the loop)."""

    def __init__(self, config: POP3ServerConfig | None = None) -> None:
        self._config = config = config or POP3ServerConfig()
        if config.apop_timestamp is not None and not _TIMESTAMP.fullmatch(
            config.apop_timestamp
        ):
            raise LocalProtocolError(f"APOP timestamp must look like <x@y>: "
                                    f"{config.apop_timestamp!r}")
        if "\r" in config.implementation or "\n" in config.implementation:
            raise LocalProtocolError("implementation must be one line")
        if config.max_errors < 1:
            raise LocalProtocolError("max_errors must be at least 1")
        self._state = State.GREETING
        self._tls_active = config.tls_active
        self._buffer = bytearray()
        self._discarding = False  # skipping the rest of an over-long line
        self._eof = False
        self._out: list[bytes] = []
        self._errors = 0
        self._pending: Event | None = None
        self._writer: _MessageWriter | None = None
        self._user: str | None = None  # name accepted by USER, awaiting PASS
        self._closed: ConnectionClosed | None = None
        # The snapshot: sizes and uids by message number - 1, and the deletion marks.
        self._sizes: list[int] = []
        self._uids: list[str] = []
        self._deleted: set[int] = set()
        self._live_count = 0
        self._live_octets = 0

    # ------------------------------------------------------------------ properties

    @property
    def state(self) -> State:
        return self._state

    @property
    def closing(self) -> bool:
        """True once the server should flush data_to_send() and close the connection."""
        return self._state is State.CLOSED

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def wants_more(self) -> bool:
        """False once a TOP answer has all the lines it needs: stop reading the file."""
        return self._writer is None or not self._writer.done

    @property
    def capabilities(self) -> list[str]:
        """The CAPA lines on offer now (RFC 2449 5)."""
        caps = ["TOP", "UIDL"]
        # RFC 2449 5: what AUTHORIZATION offers is announced in both states; USER and
        # SASL follow whether plaintext passwords are allowed on this connection now.
        if self._plaintext_allowed():
            caps.append("USER")
        mechanisms = self._mechanisms()
        if mechanisms:
            caps.append("SASL " + " ".join(mechanisms))
        # RFC 2595 4: STLS only before TLS and only in AUTHORIZATION, so it is left out
        # after login where issuing it could only fail.
        if self._stls_offered() and self._state is not State.TRANSACTION:
            caps.append("STLS")
        caps += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._config.login_delay is not None:
            caps.append(f"LOGIN-DELAY {self._config.login_delay}")
        if self._config.expire is not None:
            caps.append(f"EXPIRE {self._config.expire}")
        caps.append(f"IMPLEMENTATION {self._config.implementation}")
        return caps

    # ------------------------------------------------------------------ I/O side

    @property
    def bytes_buffered(self) -> int:
        """Received octets not yet read as commands (a partial line, or pipelined ones)."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means EOF."""
        if self._state is State.CLOSED:
            return
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if not data:
            self._eof = True
        elif self._state is not State.STARTING_TLS:
            # RFC 2595 4: bytes pipelined after STLS are dropped, never run after TLS.
            self._buffer += data

    def data_to_send(self) -> bytes:
        """The bytes to write to the client now (may be empty)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | Signal:
        if self._closed is not None:
            return self._closed
        if self._pending is not None:
            return PAUSED
        if self._state in (State.GREETING, State.STARTING_TLS):
            if self._eof:
                return self._close("eof")
            return PAUSED
        while True:
            line = self._next_line()
            if line is None:
                if self._eof:
                    return self._close("eof")
                return NEED_DATA
            event = self._handle(line)
            if self._closed is not None:
                return self._closed
            if event is not None:
                if not isinstance(event, AuthCancelled):
                    self._pending = event
                return event

    def greeting(self, text: str = "") -> None:
        """Send the +OK greeting (RFC 1939 4), with the APOP timestamp when configured."""
        parts = [text or f"{self._config.implementation} POP3 server ready"]
        if self._config.apop_timestamp:
            parts.append(self._config.apop_timestamp)
        reply = Pop3Reply(True, " ".join(parts))  # a bad text raises before any change
        self._move("greeting")
        self._out.append(reply.to_bytes())

    def tls_started(self) -> None:
        """The TLS handshake after STLS succeeded: back to a fresh AUTHORIZATION."""
        self._move("tls_started")
        self._tls_active = True
        # RFC 2595 4: forget what the client said before TLS.
        self._user = None
        self._buffer.clear()

    def timeout(self) -> None:
        """The autologout timer fired: close without a reply and without UPDATE
        (RFC 1939 3). A no-op once closed."""
        if self._state is not State.CLOSED:
            self._close("timeout")

    # ------------------------------------------------------------------ app answers

    def ok(self, text: str = "") -> None:
        """Accept a User (ask for PASS) or a StartTLS (then start the handshake)."""
        event = self._expect("ok", (User, StartTLS))
        is_user = isinstance(event, User)
        reply = Pop3Reply(True, text or ("send PASS" if is_user else "Begin TLS negotiation"))
        self._pending = None
        self._out.append(reply.to_bytes())
        if isinstance(event, User):
            self._user = event.name
        else:
            self._move("stls")
            self._buffer.clear()

    def err(self, text: str, code: str | None = None, *, close: bool = False) -> None:
        """Refuse the pending event with "-ERR [code] text" (RFC 3206 codes such as
        "AUTH", "IN-USE", "SYS/TEMP"). Before greeting() this refuses the connection;
        `close` ends the session after the reply. Failed logins count toward
        max_errors. For a message, only before its first chunk."""
        reply = Pop3Reply(False, text, code)
        if self._state is State.GREETING:
            self._out.append(reply.to_bytes())
            self._close("refused")
            return
        event = self._expect("err", (User, StartTLS, *_LOGIN_EVENTS, *_MESSAGE_EVENTS))
        if self._writer is not None:
            raise LocalProtocolError("err() after the message started; close the connection")
        self._pending = None
        if isinstance(event, (User, *_LOGIN_EVENTS)):
            self._user = None
            if isinstance(event, (AuthStart, AuthResponse)):
                self._move("auth_end")
            self._fail_reply(reply)
        else:
            self._out.append(reply.to_bytes())
        if close and self._state is not State.CLOSED:
            self._close("errors")

    def login_succeeded(self, maildrop: Snapshot, text: str | None = None) -> None:
        """Credentials are good and the maildrop is locked: enter TRANSACTION with this
        snapshot (RFC 1939 4)."""
        event = self._expect("login_succeeded", _LOGIN_EVENTS)
        sizes = [m.size for m in maildrop.messages]
        if text is None:
            owner = f"{event.name}'s " if isinstance(event, (Pass, Apop)) else ""
            summary = f"{_plural(len(sizes), 'message')} ({sum(sizes)} octets)"
            text = f"{owner}maildrop has {summary}"
        reply = Pop3Reply(True, text)
        self._pending = None
        self._sizes = sizes
        self._uids = [m.uid for m in maildrop.messages]
        self._deleted = set()
        self._live_count = len(sizes)
        self._live_octets = sum(sizes)
        self._user = None
        self._move("login")
        self._out.append(reply.to_bytes())

    def auth_challenge(self, challenge: bytes = b"") -> None:
        """Send a SASL challenge ("+ " base64, RFC 5034 4); the next line answers it."""
        self._expect("auth_challenge", (AuthStart, AuthResponse))
        self._pending = None
        self._move("challenge")
        self._out.append(b"+ " + base64.b64encode(challenge) + b"\r\n")

    def send_message_chunk(self, data: bytes, *, crlf: bool = False) -> None:
        """Stream part of the message for the pending Retrieve or Top; the first call
        sends the +OK line. `crlf=True` vouches that `data` has no bare LF (every LF
        follows a CR), as a Maildir name whose W= equals its S= says of its file;
        it saves work, and changes nothing in what is sent for such data."""
        event = self._expect("send_message_chunk", _MESSAGE_EVENTS)
        writer = self._writer
        if writer is None:
            writer = self._start_message(event)
        out = writer.feed(data, crlf)
        if out:
            self._out.append(out)

    def end_message(self) -> None:
        """Finish the message: a final line end if missing, then CRLF "." CRLF."""
        event = self._expect("end_message", _MESSAGE_EVENTS)
        writer = self._writer or self._start_message(event)
        self._out.append(writer.finish())
        self._writer = None
        self._pending = None

    def send_message(self, data: bytes, *, crlf: bool = False) -> None:
        """The whole message at once: send_message_chunk(data) then end_message()."""
        self.send_message_chunk(data, crlf=crlf)
        self.end_message()

    def update_done(self, ok: bool = True, text: str | None = None) -> None:
        """The app has removed the messages of the pending Update (RFC 1939 6)."""
        self._expect("update_done", (Update,))
        if text is None:
            if ok:
                left = self._live_count
                rest = "maildrop empty" if left == 0 else _plural(left, "message") + " left"
                text = f"{self._config.implementation} POP3 server signing off ({rest})"
            else:
                text = "some deleted messages not removed"
        reply = Pop3Reply(ok, text)
        self._pending = None
        self._out.append(reply.to_bytes())
        self._move("update_done")
        self._closed = ConnectionClosed("quit")

    # ------------------------------------------------------------------ internals

    def _move(self, trigger: str) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, trigger)]
        except KeyError:
            raise LocalProtocolError(
                f"{trigger!r} is not allowed in state {self._state.value}"
            ) from None

    def _close(self, reason: str) -> ConnectionClosed:
        self._move("close")
        self._pending = None
        self._writer = None
        self._buffer.clear()
        self._closed = ConnectionClosed(reason)
        return self._closed

    def _expect(self, method: str, kinds: tuple[type, ...]) -> Event:
        event = self._pending
        if event is None or not isinstance(event, kinds):
            pending = type(event).__name__ if event is not None else "no event"
            raise LocalProtocolError(
                f"{method}() does not answer {pending} (state {self._state.value})"
            )
        return event

    def _reply(self, ok: bool, text: str = "", code: str | None = None) -> None:
        self._out.append(Pop3Reply(ok, text, code).to_bytes())

    def _fail(self, text: str, code: str | None = None) -> None:
        self._fail_reply(Pop3Reply(False, text, code))

    def _fail_reply(self, reply: Pop3Reply) -> None:
        """An -ERR the client caused: counted, and the last one allowed closes."""
        self._errors += 1
        if self._errors >= self._config.max_errors:
            text = f"{reply.text} (too many errors, closing connection)".lstrip()
            self._out.append(Pop3Reply(False, text, reply.code).to_bytes())
            self._close("errors")
        else:
            self._out.append(reply.to_bytes())

    def _multiline(self, first: str, lines: Iterable[str]) -> None:
        body = "".join(f"{line}\r\n" for line in lines)
        self._out.append(f"+OK {first}\r\n{body}.\r\n".encode())

    def _plaintext_allowed(self) -> bool:
        return self._tls_active or self._config.allow_plaintext_auth

    def _stls_offered(self) -> bool:
        return self._config.stls and not self._tls_active

    def _mechanisms(self) -> list[str]:
        plain_ok = self._plaintext_allowed()
        return [
            m.upper()
            for m in self._config.sasl_mechanisms
            if plain_ok or m.upper() not in _PLAINTEXT_MECHANISMS
        ]

    def _refuse_plaintext(self) -> None:
        hint = " (use STLS)" if self._stls_offered() else ""
        self._fail(f"Plaintext authentication disallowed without TLS{hint}", "AUTH")

    def _drop_summary(self) -> str:
        return f"{_plural(self._live_count, 'message')} ({self._live_octets} octets)"

    def _next_line(self) -> bytes | _Overlong | None:
        """The next complete line without its line end, _TOO_LONG for a line past the
        limit (its rest is then skipped), or None until more bytes come."""
        buf = self._buffer
        if self._discarding and not self._skip_rest_of_line():
            return None
        limit = MAX_AUTH_LINE if self._state is State.SASL else MAX_COMMAND_LINE
        end = buf.find(b"\n", 0, limit)
        if end < 0:
            if len(buf) < limit:
                return None
            # No line end within the limit: reply now and drop the rest of the line.
            self._discarding = True
            self._skip_rest_of_line()
            return _TOO_LONG
        line = bytes(buf[:end])
        del buf[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    def _skip_rest_of_line(self) -> bool:
        """Drop bytes up to the end of an over-long line; True once its end was seen."""
        end = self._buffer.find(b"\n")
        if end < 0:
            self._buffer.clear()
            return False
        del self._buffer[: end + 1]
        self._discarding = False
        return True

    def _handle(self, line: bytes | _Overlong) -> Event | None:
        if self._state is State.SASL:
            return self._sasl_response(line)
        if line is _TOO_LONG:
            self._fail(f"command line too long (at most {MAX_COMMAND_LINE} octets)")
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("command is not valid UTF-8")
            return None
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        if keyword not in _COMMANDS[self._state]:
            if keyword in _KNOWN_COMMANDS:
                where = "after login" if self._state is State.TRANSACTION else "before login"
                self._fail(f"{keyword} is not allowed {where}")
            elif keyword.isascii() and keyword.isalnum() and len(keyword) <= 8:
                self._fail(f"unknown command {keyword}")
            else:
                self._fail("unknown command")
            return None
        handler = _HANDLERS[keyword]
        if keyword not in ("PASS", "USER"):
            rest = rest.strip(" \t")
        return handler(self, rest)

    def _sasl_response(self, line: bytes | _Overlong) -> Event | None:
        if line is _TOO_LONG:
            self._move("auth_end")
            self._fail(f"authentication line too long (at most {MAX_AUTH_LINE} octets)")
            return AuthCancelled()
        line = line.strip(b" \t")
        if line == b"*":
            # RFC 5034 4: a "*" line cancels and the server MUST answer -ERR.
            self._move("auth_end")
            self._reply(False, "authentication cancelled")
            return AuthCancelled()
        try:
            data = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._move("auth_end")
            self._fail("authentication response is not valid base64")
            return AuthCancelled()
        return AuthResponse(data)

    def _message_arg(self, arg: str) -> int | None:
        """Parse a message number that must name an undeleted message; on failure reply
        -ERR and return None."""
        number = _number(arg)
        if number is None:
            self._fail(f"not a message number: {arg[:20]!r}" if arg else "message number "
                       "required")
            return None
        if not 1 <= number <= len(self._sizes):
            self._fail(f"no such message, only {_plural(len(self._sizes), 'message')} "
                       "in maildrop")
            return None
        if number in self._deleted:
            self._fail(f"message {number} already deleted")
            return None
        return number

    # ------------------------------------------------------------------ commands

    def _cmd_user(self, rest: str) -> Event | None:
        if not self._plaintext_allowed():
            self._refuse_plaintext()
            return None
        if not rest.strip():
            self._fail("USER needs a mailbox name")
            return None
        self._user = None
        return User(rest.strip(" \t"))

    def _cmd_pass(self, rest: str) -> Event | None:
        # RFC 1939 7: the password is the rest of the line, spaces included.
        if not self._plaintext_allowed():
            self._refuse_plaintext()
            return None
        if self._user is None:
            self._fail("send USER first")
            return None
        return Pass(self._user, rest)

    def _cmd_apop(self, rest: str) -> Event | None:
        if self._config.apop_timestamp is None:
            self._fail("APOP is not available (the greeting has no timestamp)")
            return None
        name, _, digest = rest.rpartition(" ")
        name = name.strip(" \t")
        if not name or len(digest) != 32 or not all(c in "0123456789abcdefABCDEF"
                                                    for c in digest):
            self._fail("APOP needs a name and a 32-digit hex digest")
            return None
        self._user = None
        return Apop(name, digest.lower())

    def _cmd_auth(self, rest: str) -> Event | None:
        args = rest.split()
        if not args:
            # Clients that predate CAPA send a bare AUTH to list the mechanisms.
            self._multiline("SASL mechanisms follow", self._mechanisms())
            return None
        if len(args) > 2:
            self._fail("AUTH takes a mechanism and at most one initial response")
            return None
        mechanism = args[0].upper()
        if mechanism not in (m.upper() for m in self._config.sasl_mechanisms):
            self._fail(f"unsupported authentication mechanism {mechanism[:20]}")
            return None
        if mechanism in _PLAINTEXT_MECHANISMS and not self._plaintext_allowed():
            self._refuse_plaintext()
            return None
        initial: bytes | None = None
        if len(args) == 2:
            # RFC 5034 4: "=" stands for an empty initial response.
            if args[1] == "=":
                initial = b""
            else:
                try:
                    initial = base64.b64decode(args[1], validate=True)
                except (binascii.Error, ValueError):
                    self._fail("initial response is not valid base64")
                    return None
        self._user = None
        return AuthStart(mechanism, initial)

    def _cmd_stls(self, rest: str) -> Event | None:
        if rest:
            self._fail("STLS takes no arguments")
        elif self._tls_active:
            self._fail("TLS is already active")
        elif not self._config.stls:
            self._fail("STLS is not available on this port")
        else:
            return StartTLS()
        return None

    def _cmd_capa(self, rest: str) -> Event | None:
        self._multiline("Capability list follows", self.capabilities)
        return None

    def _cmd_quit(self, rest: str) -> Event | None:
        if self._state is State.TRANSACTION:
            deleted = tuple((n, self._uids[n - 1]) for n in sorted(self._deleted))
            self._move("quit")
            return Update(deleted)
        # RFC 1939 4: QUIT in AUTHORIZATION just ends the session.
        self._reply(True, f"{self._config.implementation} POP3 server signing off")
        self._move("quit")
        self._closed = ConnectionClosed("quit")
        return None

    def _cmd_stat(self, rest: str) -> Event | None:
        if rest:
            self._fail("STAT takes no arguments")
        else:
            self._reply(True, f"{self._live_count} {self._live_octets}")
        return None

    def _cmd_list(self, rest: str) -> Event | None:
        if rest:
            number = self._message_arg(rest)
            if number is not None:
                self._reply(True, f"{number} {self._sizes[number - 1]}")
            return None
        deleted = self._deleted
        self._multiline(
            f"{self._drop_summary()}",
            (f"{i} {size}" for i, size in enumerate(self._sizes, 1) if i not in deleted),
        )
        return None

    def _cmd_uidl(self, rest: str) -> Event | None:
        if rest:
            number = self._message_arg(rest)
            if number is not None:
                self._reply(True, f"{number} {self._uids[number - 1]}")
            return None
        deleted = self._deleted
        self._multiline(
            "unique-id listing follows",
            (f"{i} {uid}" for i, uid in enumerate(self._uids, 1) if i not in deleted),
        )
        return None

    def _cmd_retr(self, rest: str) -> Event | None:
        number = self._message_arg(rest)
        if number is None:
            return None
        return Retrieve(number, self._uids[number - 1])

    def _cmd_top(self, rest: str) -> Event | None:
        args = rest.split()
        if len(args) != 2:
            self._fail("TOP needs a message number and a line count")
            return None
        lines = _number(args[1])
        if lines is None:
            self._fail(f"not a line count: {args[1][:20]!r}")
            return None
        number = self._message_arg(args[0])
        if number is None:
            return None
        return Top(number, self._uids[number - 1], lines)

    def _cmd_dele(self, rest: str) -> Event | None:
        number = self._message_arg(rest)
        if number is not None:
            self._deleted.add(number)
            self._live_count -= 1
            self._live_octets -= self._sizes[number - 1]
            self._reply(True, f"message {number} deleted")
        return None

    def _cmd_noop(self, rest: str) -> Event | None:
        if rest:
            self._fail("NOOP takes no arguments")
        else:
            self._reply(True)
        return None

    def _cmd_rset(self, rest: str) -> Event | None:
        if rest:
            self._fail("RSET takes no arguments")
            return None
        self._deleted.clear()
        self._live_count = len(self._sizes)
        self._live_octets = sum(self._sizes)
        self._reply(True, f"maildrop has {self._drop_summary()}")
        return None

    def _start_message(self, event: Event) -> _MessageWriter:
        if isinstance(event, Top):
            self._reply(True, "top of message follows")
            writer = _MessageWriter(event.lines)
        else:
            assert isinstance(event, Retrieve)
            self._out.append(b"+OK %d octets\r\n" % self._sizes[event.msg_number - 1])
            writer = _MessageWriter(None)
        self._writer = writer
        return writer


# Command keyword -> handler; each gets the text after the keyword.
_HANDLERS: dict[str, Callable[[POP3Server, str], Event | None]] = {
    "USER": POP3Server._cmd_user,
    "PASS": POP3Server._cmd_pass,
    "APOP": POP3Server._cmd_apop,
    "AUTH": POP3Server._cmd_auth,
    "STLS": POP3Server._cmd_stls,
    "CAPA": POP3Server._cmd_capa,
    "QUIT": POP3Server._cmd_quit,
    "STAT": POP3Server._cmd_stat,
    "LIST": POP3Server._cmd_list,
    "UIDL": POP3Server._cmd_uidl,
    "RETR": POP3Server._cmd_retr,
    "TOP": POP3Server._cmd_top,
    "DELE": POP3Server._cmd_dele,
    "NOOP": POP3Server._cmd_noop,
    "RSET": POP3Server._cmd_rset,
}

__all__ = [
    "MAX_AUTH_LINE",
    "MAX_COMMAND_LINE",
    "MAX_RESPONSE_LINE",
    "NEED_DATA",
    "PAUSED",
    "Apop",
    "AuthCancelled",
    "AuthResponse",
    "AuthStart",
    "ConnectionClosed",
    "Event",
    "MessageInfo",
    "LocalProtocolError",
    "POP3Server",
    "POP3ServerConfig",
    "Pass",
    "Pop3Reply",
    "Retrieve",
    "Signal",
    "Snapshot",
    "StartTLS",
    "State",
    "Top",
    "Update",
    "User",
]
