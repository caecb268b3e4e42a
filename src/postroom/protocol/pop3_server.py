"""The sans-IO POP3 server core: client bytes in, events out; the app's answers in, bytes out.

RFC 1939 with RFC 2449 (CAPA, response codes), 2595 (STLS), 3206 and 5034 (SASL
AUTH); not RFC 6856 (UTF8), see pop3_states.COMMANDS. The core answers all
that needs no storage (CAPA, NOOP, STAT/LIST/UIDL from the snapshot, DELE/RSET
marks, state errors); the server layer owns sockets, TLS, clocks and the maildrop.

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
next_event() returns PAUSED. An answer that does not fit the pending event
raises `_core`'s LocalProtocolError.

The app sends a message the same way for RETR and TOP, as stored (pop3_wire
makes the wire form and cuts it for TOP), and may stop early once `wants_more`
turns False.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable

from postroom.protocol._core import NEED_DATA, PAUSED, LocalProtocolError, Signal, illegal_move
from postroom.protocol.lines import Line, LineBuffer
from postroom.protocol.pop3_config import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    PLAINTEXT_MECHANISMS,
    POP3ServerConfig,
)
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
from postroom.protocol.pop3_snapshot import Drop, MessageInfo, Snapshot, decimal, plural
from postroom.protocol.pop3_states import COMMANDS, KNOWN_COMMANDS, TRANSITIONS, State
from postroom.protocol.pop3_wire import MAX_RESPONSE_LINE, MessageWriter, Pop3Reply

# The events, states, config, replies and snapshot live in the pop3_* modules
# beside this one; they are part of this module's API too.
__all__ = [
    "MAX_COMMAND_LINE", "MAX_AUTH_LINE", "MAX_RESPONSE_LINE", "LocalProtocolError",
    "State", "Pop3Reply", "MessageInfo", "Snapshot", "POP3ServerConfig", "POP3Server",
    "Signal", "NEED_DATA", "PAUSED", "Event", "User", "Pass", "Apop", "AuthStart",
    "AuthResponse", "AuthCancelled", "StartTLS", "Retrieve", "Top", "Update",
    "ConnectionClosed",
]

_NO_ARGUMENTS = frozenset({"STLS", "STAT", "NOOP", "RSET"})  # RFC 1939 5, RFC 2595 4
_LOGIN_EVENTS = (Pass, Apop, AuthStart, AuthResponse)
_MESSAGE_EVENTS = (Retrieve, Top)
# States that keep what the client sends (RFC 2595 4: after STLS, nothing counts
# until the handshake), and those whose input waits for the application.
_READING = frozenset(State) - {State.STARTING_TLS, State.CLOSED}
_WAITING = frozenset({State.GREETING, State.STARTING_TLS})


class POP3Server:
    """One POP3 session seen from the server (see the module docstring for the loop)."""

    def __init__(self, config: POP3ServerConfig | None = None) -> None:
        self._config = config = config or POP3ServerConfig()
        config.check()
        self._state = State.GREETING
        self._tls_active = config.tls_active
        self._lines = LineBuffer(MAX_AUTH_LINE)  # the longest line any state takes
        self._eof = False
        self._out: list[bytes] = []
        self._errors = 0
        self._pending: Event | None = None
        self._user: str | None = None  # name accepted by USER, awaiting PASS
        self._closed: ConnectionClosed | None = None
        self._drop = Drop(Snapshot(()))  # the maildrop, from login on
        self._writer: MessageWriter | None = None  # RETR or TOP, from its first chunk

    @property
    def state(self) -> State:
        return self._state

    @property
    def closing(self) -> bool:
        """True once the server should flush data_to_send() and close the connection."""
        return self._closed is not None

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
        return self._config.capabilities(self._tls_active, self._state is State.TRANSACTION)

    @property
    def bytes_buffered(self) -> int:
        """Received octets not yet read as commands (a partial line, or pipelined ones)."""
        return len(self._lines)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means EOF."""
        reading = self._state in _READING
        if not reading and self._closed is not None:
            return
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if not data:
            self._eof = True
        elif reading:  # not after STLS: RFC 2595 4, pipelined bytes never run after TLS
            self._lines.feed(data)

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
        if self._state in _WAITING:
            if self._eof:
                return self._close("eof")
            return PAUSED
        while True:
            line = self._lines.next_line()
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
        self._lines.clear()

    def timeout(self) -> None:
        """The autologout timer fired: close without a reply and without UPDATE
        (RFC 1939 3). A no-op once closed."""
        if self._closed is None:
            self._close("timeout")

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
            self._lines.clear()

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
        drop = Drop(maildrop)
        if text is None:
            owner = f"{event.name}'s " if isinstance(event, (Pass, Apop)) else ""
            text = f"{owner}maildrop has {drop.summary()}"
        reply = Pop3Reply(True, text)
        self._pending = None
        self._drop = drop
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
        out = (self._writer or self._start_message(event)).feed(data, crlf)
        if out:
            self._out.append(out)

    def end_message(self) -> None:
        """Finish the message: a final line end if missing, then CRLF "." CRLF."""
        event = self._expect("end_message", _MESSAGE_EVENTS)
        self._out.append((self._writer or self._start_message(event)).finish())
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
                left = self._drop.count
                rest = "maildrop empty" if left == 0 else plural(left, "message") + " left"
                text = f"{self._config.implementation} POP3 server signing off ({rest})"
            else:
                text = "some deleted messages not removed"
        reply = Pop3Reply(ok, text)
        self._pending = None
        self._out.append(reply.to_bytes())
        self._move("update_done")
        self._closed = ConnectionClosed("quit")

    def _move(self, trigger: str) -> None:
        try:
            self._state = TRANSITIONS[self._state, trigger]
        except KeyError:
            raise illegal_move(self._state, trigger) from None

    def _close(self, reason: str) -> ConnectionClosed:
        self._move("close")
        self._pending = None
        self._writer = None
        self._lines.clear()
        self._closed = ConnectionClosed(reason)
        return self._closed

    def _expect(self, method: str, kinds: tuple[type, ...]) -> Event:
        event = self._pending
        if event is None or not isinstance(event, kinds):
            pending = type(event).__name__ if event is not None else "no event"
            raise LocalProtocolError(f"{method}() does not answer {pending} (state {self._state})")
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
        # Listing lines start with a number or a keyword, never with ".": nothing to stuff.
        body = "".join(f"{line}\r\n" for line in lines)
        self._out.append(f"+OK {first}\r\n{body}.\r\n".encode())

    def _refuse_plaintext(self) -> None:
        hint = " (use STLS)" if self._config.stls_offered(self._tls_active) else ""
        self._fail(f"Plaintext authentication disallowed without TLS{hint}", "AUTH")

    def _handle(self, line: Line) -> Event | None:
        if self._state is State.SASL:
            return self._sasl_response(line)
        if line.too_long or line.length > MAX_COMMAND_LINE:
            self._fail(f"command line too long (at most {MAX_COMMAND_LINE} octets)")
            return None
        try:
            text = line.text.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("command is not valid UTF-8")
            return None
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        if keyword not in COMMANDS[self._state]:
            if keyword in KNOWN_COMMANDS:
                where = "after login" if self._state is State.TRANSACTION else "before login"
                self._fail(f"{keyword} is not allowed {where}")
            elif keyword.isascii() and keyword.isalnum() and len(keyword) <= 8:
                self._fail(f"unknown command {keyword}")
            else:
                self._fail("unknown command")
            return None
        if keyword not in ("PASS", "USER"):
            rest = rest.strip(" \t")
        if rest and keyword in _NO_ARGUMENTS:
            self._fail(f"{keyword} takes no arguments")
            return None
        return _HANDLERS[keyword](self, rest)

    def _sasl_response(self, line: Line) -> Event | None:
        if line.too_long:
            self._move("auth_end")
            self._fail(f"authentication line too long (at most {MAX_AUTH_LINE} octets)")
            return AuthCancelled()
        text = line.text.strip(b" \t")
        if text == b"*":
            # RFC 5034 4: a "*" line cancels and the server MUST answer -ERR.
            self._move("auth_end")
            self._reply(False, "authentication cancelled")
            return AuthCancelled()
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._move("auth_end")
            self._fail("authentication response is not valid base64")
            return AuthCancelled()
        return AuthResponse(data)

    def _message_arg(self, arg: str) -> int | None:
        """The number of the undeleted message `arg` names; else -ERR and None."""
        number = self._drop.find(arg)
        if isinstance(number, str):
            self._fail(number)
            return None
        return number

    def _cmd_user(self, rest: str) -> Event | None:
        if not self._config.plaintext_allowed(self._tls_active):
            self._refuse_plaintext()
            return None
        if not rest.strip():
            self._fail("USER needs a mailbox name")
            return None
        self._user = None
        return User(rest.strip(" \t"))

    def _cmd_pass(self, rest: str) -> Event | None:
        # RFC 1939 7: the password is the rest of the line, spaces included.
        if not self._config.plaintext_allowed(self._tls_active):
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
            self._multiline("SASL mechanisms follow", self._config.mechanisms(self._tls_active))
            return None
        if len(args) > 2:
            self._fail("AUTH takes a mechanism and at most one initial response")
            return None
        mechanism = args[0].upper()
        if mechanism not in (m.upper() for m in self._config.sasl_mechanisms):
            self._fail(f"unsupported authentication mechanism {mechanism[:20]}")
            return None
        plaintext_allowed = self._config.plaintext_allowed(self._tls_active)
        if mechanism in PLAINTEXT_MECHANISMS and not plaintext_allowed:
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
        if self._tls_active:
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
            deleted = self._drop.deleted()
            self._move("quit")
            return Update(deleted)
        # RFC 1939 4: QUIT in AUTHORIZATION just ends the session.
        self._reply(True, f"{self._config.implementation} POP3 server signing off")
        self._move("quit")
        self._closed = ConnectionClosed("quit")
        return None

    def _cmd_stat(self, rest: str) -> Event | None:
        self._reply(True, f"{self._drop.count} {self._drop.octets}")
        return None

    def _cmd_list(self, rest: str) -> Event | None:
        if rest:
            number = self._message_arg(rest)
            if number is not None:
                self._reply(True, f"{number} {self._drop.size(number)}")
            return None
        self._multiline(self._drop.summary(), self._drop.scan_listing())
        return None

    def _cmd_uidl(self, rest: str) -> Event | None:
        if rest:
            number = self._message_arg(rest)
            if number is not None:
                self._reply(True, f"{number} {self._drop.uid(number)}")
            return None
        self._multiline("unique-id listing follows", self._drop.uid_listing())
        return None

    def _cmd_retr(self, rest: str) -> Event | None:
        number = self._message_arg(rest)
        if number is None:
            return None
        return Retrieve(number, self._drop.uid(number))

    def _cmd_top(self, rest: str) -> Event | None:
        args = rest.split()
        if len(args) != 2:
            self._fail("TOP needs a message number and a line count")
            return None
        lines = decimal(args[1])
        if lines is None:
            self._fail(f"not a line count: {args[1][:20]!r}")
            return None
        number = self._message_arg(args[0])
        if number is None:
            return None
        return Top(number, self._drop.uid(number), lines)

    def _cmd_dele(self, rest: str) -> Event | None:
        number = self._message_arg(rest)
        if number is not None:
            self._drop.delete(number)
            self._reply(True, f"message {number} deleted")
        return None

    def _cmd_noop(self, rest: str) -> Event | None:
        self._reply(True)
        return None

    def _cmd_rset(self, rest: str) -> Event | None:
        self._drop.reset()
        self._reply(True, f"maildrop has {self._drop.summary()}")
        return None

    def _start_message(self, event: Event) -> MessageWriter:
        if isinstance(event, Top):
            self._reply(True, "top of message follows")
            self._writer = MessageWriter(event.lines)
        else:
            assert isinstance(event, Retrieve)
            self._out.append(b"+OK %d octets\r\n" % self._drop.size(event.msg_number))
            self._writer = MessageWriter(None)
        return self._writer


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
