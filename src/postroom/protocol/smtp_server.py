"""The SMTP server protocol core (RFC 5321 and its extensions): bytes in, events out.

`SMTPServer` does no I/O. The server layer feeds it what the client sent
(`receive_data`), asks for the next event (`next_event`), answers events
that need a reply (`send`, `auth_succeeded`) and writes `data_to_send()` to
the client. The core answers everything that needs no policy by itself:
syntax and sequence errors, NOOP, RSET, VRFY, HELP, QUIT, limits, and the
end of each BDAT chunk.

    server = SMTPServer(SMTPServerConfig(hostname="mx.example"))
    server.send(Reply(220, None, "mx.example ESMTP postroom"))
    while not server.closing:
        event = server.next_event()
        if event is NEED_DATA: server.receive_data(await read())
        elif isinstance(event, MailFrom): server.send(policy.check_sender(event))
        ...
        write(server.data_to_send())

After an event that needs a reply, `next_event` returns PAUSED until it is
answered; commands pipelined behind it wait, so replies keep their order.
After `DataStart` exactly one of `MessageEnd` (then answered) and
`MessageAborted` follows; if the session ends while `MessageEnd` still awaits
its answer, a `MessageAborted` follows it (the client never heard a 250).
Once the session is over, `closing` is true and `next_event` returns
`ConnectionClosed`.

Malformed client input never raises; calling the core out of turn (a reply
with no event awaiting it, a reply code that does not fit the event) raises
`LocalProtocolError`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from postroom.protocol import address
from postroom.protocol._core import NEED_DATA, PAUSED, LocalProtocolError, Signal
from postroom.protocol.address import AddressError, ParameterError
from postroom.protocol.header_limits import (
    HEADER_TOO_BIG,
    MAX_HEADER_FIELDS,
    MAX_HEADER_SECTION,
    TOO_MANY_FIELDS,
    HeaderLimits,
)
from postroom.protocol.lines import (
    BARE_CR,
    BARE_LF,
    BARE_NEWLINE_MODES,
    LONG_LINE,
    MAX_MESSAGE_LINE,
    TOO_BIG,
    DataReader,
    Line,
    LineBuffer,
    LineMeter,
)
from postroom.protocol.replies import MAX_REPLY_LINE, Reply, encode_reply, reply_problem
from postroom.protocol.smtp_events import (
    AuthResponse,
    AuthStart,
    ConnectionClosed,
    DataStart,
    Event,
    Hello,
    MailFrom,
    MessageAborted,
    MessageData,
    MessageEnd,
    Quit,
    RcptTo,
    Reset,
    StartTLS,
)

# The events live in smtp_events; they are part of this module's API too.
__all__ = [
    "MAX_COMMAND_LINE",
    "SIZE_ALLOWANCE",
    "DSN_MAIL_ALLOWANCE",
    "DSN_RCPT_ALLOWANCE",
    "SMTPUTF8_ALLOWANCE",
    "BODY_ALLOWANCE",
    "AUTH_PARAM_ALLOWANCE",
    "MAX_MAIL_LINE",
    "MAX_RCPT_LINE",
    "MAX_AUTH_LINE",
    "MAX_RECIPIENTS",
    "MAX_REPLY_LINE",
    "MAX_CHUNK_DIGITS",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_ERRORS",
    "LocalProtocolError",
    "CONNECTED",
    "GREETED",
    "REFUSED",
    "READY",
    "MAIL",
    "RCPT",
    "DATA",
    "BDAT",
    "CHUNKING",
    "AUTH",
    "TLS_WAIT",
    "CLOSED",
    "SMTPServerConfig",
    "SMTPServer",
    "Event",
    "Hello",
    "MailFrom",
    "RcptTo",
    "DataStart",
    "MessageData",
    "MessageEnd",
    "MessageAborted",
    "StartTLS",
    "AuthStart",
    "AuthResponse",
    "Reset",
    "Quit",
    "ConnectionClosed",
    "NEED_DATA",
    "PAUSED",
    "Signal",
]

# --- Limits ----------------------------------------------------------------
MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4: command line including CRLF
SIZE_ALLOWANCE = 26  # RFC 1870 3 (5): " SIZE=" and up to 20 digits on MAIL
DSN_MAIL_ALLOWANCE = 100  # RFC 3461 4: RET and ENVID on MAIL
DSN_RCPT_ALLOWANCE = 500  # RFC 3461 4: NOTIFY and ORCPT on RCPT
SMTPUTF8_ALLOWANCE = 10  # RFC 6531 3.1 (5): " SMTPUTF8" on MAIL
BODY_ALLOWANCE = 16  # " BODY=8BITMIME" (RFC 6152 names no figure; room for it)
AUTH_PARAM_ALLOWANCE = 500  # AUTH=<mailbox> as xtext (RFC 4954 5 names no figure)
MAX_MAIL_LINE = (
    MAX_COMMAND_LINE
    + SIZE_ALLOWANCE
    + DSN_MAIL_ALLOWANCE
    + SMTPUTF8_ALLOWANCE
    + BODY_ALLOWANCE
    + AUTH_PARAM_ALLOWANCE
)
MAX_RCPT_LINE = MAX_COMMAND_LINE + DSN_RCPT_ALLOWANCE
MAX_AUTH_LINE = 12288  # RFC 4954 4: AUTH lines and SASL responses
MAX_RECIPIENTS = 100  # RFC 5321 4.5.3.1.8: the recipients buffer's minimum
MAX_CHUNK_DIGITS = 20  # BDAT chunk sizes, like RFC 1870's size-value
DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024
DEFAULT_MAX_ERRORS = 10

# Octets the line buffer keeps of an unfinished line: the longest line any
# state accepts. Per-command limits are checked once the verb is known.
_LINE_CEILING = MAX_AUTH_LINE
_LINE_LIMITS = {"MAIL": MAX_MAIL_LINE, "RCPT": MAX_RCPT_LINE, "AUTH": MAX_AUTH_LINE}


# --- States ----------------------------------------------------------------
CONNECTED = "connected"  # banner not sent yet
GREETED = "greeted"  # banner sent, no accepted HELO/EHLO
REFUSED = "refused"  # 554 banner: only QUIT (RFC 5321 3.1)
READY = "ready"  # greeted by the client, no transaction
MAIL = "mail"  # MAIL accepted, no recipient yet
RCPT = "rcpt"  # at least one recipient accepted
DATA = "data"  # reading DATA content
BDAT = "bdat"  # reading a BDAT chunk
CHUNKING = "chunking"  # between BDAT chunks of one message
AUTH = "auth"  # in a SASL exchange: lines are responses
TLS_WAIT = "tls_wait"  # 220 sent to STARTTLS: input discarded (RFC 3207 4.2)
CLOSED = "closed"

_TRANSACTION_STATES = frozenset({MAIL, RCPT, DATA, BDAT, CHUNKING})

# Which commands each state reads. A known command that its state does not
# list gets the reply _SEQUENCE_ERRORS names for (state, command), else
# 503 5.5.1. States absent here read no commands (content, SASL lines, TLS).
_ANYTIME = frozenset({"HELO", "EHLO", "NOOP", "RSET", "QUIT", "VRFY", "EXPN", "HELP"})
_COMMANDS: dict[str, frozenset[str]] = {
    GREETED: _ANYTIME,
    READY: _ANYTIME | {"MAIL", "AUTH", "STARTTLS"},
    MAIL: _ANYTIME | {"RCPT"},
    RCPT: _ANYTIME | {"RCPT", "DATA", "BDAT"},
    CHUNKING: _ANYTIME | {"BDAT"},
    REFUSED: frozenset({"QUIT"}),
}
_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
_NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
_NEED_MAIL = Reply(503, "5.5.1", "Send MAIL first")
_NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")  # RFC 5321 3.3
_NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
_IN_TRANSACTION = Reply(503, "5.5.1", "Not permitted during a mail transaction")
_SEQUENCE_ERRORS: dict[tuple[str, str], Reply] = {
    **{(GREETED, v): _NEED_HELO for v in ("MAIL", "RCPT", "DATA", "BDAT", "AUTH", "STARTTLS")},
    (READY, "RCPT"): _NEED_MAIL,
    (READY, "DATA"): _NEED_MAIL,
    (READY, "BDAT"): _NEED_MAIL,
    (MAIL, "DATA"): _NO_RECIPIENTS,
    (MAIL, "BDAT"): _NO_RECIPIENTS,
    **{(s, "MAIL"): _NESTED_MAIL for s in (MAIL, RCPT, CHUNKING)},
    # RFC 4954 4 (AUTH) and RFC 3207 4 (STARTTLS) outside transactions only.
    **{(s, v): _IN_TRANSACTION for s in (MAIL, RCPT, CHUNKING) for v in ("AUTH", "STARTTLS")},
    (CHUNKING, "DATA"): Reply(503, "5.5.1", "DATA cannot follow BDAT (RFC 3030 2)"),
    (CHUNKING, "RCPT"): Reply(503, "5.5.1", "RCPT cannot follow BDAT"),
}
_REFUSED_REPLY = Reply(503, "5.5.1", "No SMTP service here, only QUIT")  # RFC 5321 3.1

# What the application's answer to an event does:
# (state, event type) -> (state after a positive reply, after a negative one).
# A reply with close=True leads to "closed"; auth_succeeded() leads to "ready".
_AFTER_REPLY: dict[tuple[str, type[Event]], tuple[str, str]] = {
    (GREETED, Hello): (READY, GREETED),
    (READY, Hello): (READY, GREETED),
    (READY, MailFrom): (MAIL, READY),
    (MAIL, RcptTo): (RCPT, MAIL),
    (RCPT, RcptTo): (RCPT, RCPT),
    (RCPT, DataStart): (DATA, RCPT),
    (DATA, MessageEnd): (READY, READY),
    (BDAT, MessageEnd): (READY, READY),
    (READY, StartTLS): (TLS_WAIT, READY),
    (READY, AuthStart): (AUTH, READY),
    (AUTH, AuthResponse): (AUTH, READY),
}
# The positive codes each event may be answered with (4xx/5xx always fit).
# 235 is given through auth_succeeded(), which records the identity.
_POSITIVE: dict[type[Event], frozenset[int]] = {
    Hello: frozenset({250}),
    MailFrom: frozenset({250}),
    RcptTo: frozenset({250, 251, 252}),
    DataStart: frozenset({354}),
    MessageEnd: frozenset({250}),
    StartTLS: frozenset({220}),
    AuthStart: frozenset({334}),
    AuthResponse: frozenset({334}),
}
_BANNER_CODES = frozenset({220, 421, 554})

_FORBIDDEN = frozenset({"CONNECT", "GET", "POST"})  # HTTP sent to SMTP: hang up
_CONTROL_RE = re.compile(rb"[\x00-\x1f\x7f]")
_FROM_RE = re.compile(r"FROM:", re.IGNORECASE)
_TO_RE = re.compile(r"TO:", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class SMTPServerConfig:
    """What a listener offers. See the module docstring for who answers what."""

    hostname: str
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE  # RFC 1870 SIZE; 0 = no limit
    max_recipients: int = MAX_RECIPIENTS  # then 452 4.5.3 (RFC 5321 4.5.3.1.10)
    max_errors: int = DEFAULT_MAX_ERRORS  # then 421 4.7.0 and close; 0 = no limit
    bare_newline: str = "reject"  # "reject" | "normalize" (bare LF/CR in lines)
    starttls: bool = False  # STARTTLS offered (until TLS is active)
    tls_active: bool = False  # implicit TLS (port 465) from the start
    auth_mechanisms: tuple[str, ...] = ()  # offered with TLS (or auth_plaintext)
    auth_plaintext: bool = False  # allow AUTH before TLS
    auth_required: bool = False  # MAIL before AUTH -> 530 5.7.0 (submission)
    chunking: bool = True  # RFC 3030 CHUNKING (BDAT)
    dsn: bool = True  # RFC 3461
    smtputf8: bool = True  # RFC 6531
    eightbitmime: bool = True  # RFC 6152
    pipelining: bool = True  # RFC 2920 (advertised; input is read in order anyway)
    max_header_size: int = MAX_HEADER_SECTION  # octets of the header section, then 552
    max_header_fields: int = MAX_HEADER_FIELDS  # fields in the header section, then 554

    def __post_init__(self) -> None:
        if self.bare_newline not in BARE_NEWLINE_MODES:
            raise ValueError(f"bare_newline must be one of {BARE_NEWLINE_MODES}")
        if not self.hostname or any(ord(c) < 0x21 or ord(c) == 0x7F for c in self.hostname):
            raise ValueError("hostname must be a non-empty name without spaces or controls")
        if self.max_message_size < 0 or self.max_errors < 0 or self.max_recipients < 1:
            raise ValueError("limits must be positive (0 = none for size and errors)")
        if self.max_header_size < 1 or self.max_header_fields < 1:
            raise ValueError("header limits must be positive")
        for mech in self.auth_mechanisms:
            if not re.fullmatch(r"[A-Z0-9_-]{1,20}", mech):  # RFC 4422 3.1
                raise ValueError(f"invalid SASL mechanism name {mech!r}")


class SMTPServer:
    """One SMTP session, server side. See the module docstring."""

    def __init__(self, config: SMTPServerConfig) -> None:
        self._config = config
        self._state = CONNECTED
        self._lines = LineBuffer(_LINE_CEILING)
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._pending: Event | None = None
        self._eof = False
        self._errors = 0
        self._tls = config.tls_active
        self._authenticated: str | None = None
        self._helo: str | None = None
        self._esmtp = False
        self._reject_bare = config.bare_newline == "reject"
        # The transaction.
        self._smtputf8 = False
        self._recipients = 0
        self._in_message = False  # DataStart emitted, message not yet settled
        self._reader: DataReader | None = None
        self._octets = 0  # BDAT: octets of the message so far
        self._bdat_lines = LineMeter(MAX_MESSAGE_LINE)  # BDAT: the DATA line rule
        self._header = self._header_limits()  # DATA and BDAT: the header section's limits
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_error: Reply | None = None  # BDAT consumed only to stay in sync
        self._chunk_return = READY  # state after a chunk consumed for an error
        self._data_after_crlf = True  # the DATA command ended with CRLF, not bare LF

    # --- Properties -------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def closing(self) -> bool:
        """True once the session is over: write data_to_send(), then close."""
        return self._state == CLOSED

    @property
    def authenticated(self) -> str | None:
        """The identity given to auth_succeeded(), until TLS starts."""
        return self._authenticated

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def helo(self) -> str | None:
        """The domain of the last accepted HELO/EHLO."""
        return self._helo

    @property
    def bytes_buffered(self) -> int:
        """Received octets held by the core (a partial line, roughly)."""
        return len(self._lines) + (self._reader.buffered if self._reader else 0)

    # --- Input ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means it closed its side (EOF)."""
        if self._state == CLOSED:
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
        elif self._state != TLS_WAIT:  # RFC 3207 4.2: nothing before TLS counts
            self._lines.feed(data)

    def next_event(self) -> Event | Signal:
        while True:
            if self._events:
                return self._events.popleft()
            if self._pending is not None or self._state == CONNECTED:
                return PAUSED
            if self._state == CLOSED:
                return ConnectionClosed()
            if not self._step():
                if not self._eof:
                    return NEED_DATA
                self._abandon_message(Reply(421, "4.4.2", "Connection lost during the message"))
                self._close()
                self._events.append(ConnectionClosed())

    def _step(self) -> bool:
        """Process some input in the current state; False if none could be."""
        state = self._state
        if state == DATA:
            return self._read_data()
        if state == BDAT:
            return self._read_chunk()
        if state == TLS_WAIT:
            self._lines.clear()
            return False
        line = self._lines.next_line()
        if line is None:
            return False
        if state == AUTH:
            self._auth_line(line)
        else:
            self._command_line(line)
        return True

    # --- Output -----------------------------------------------------------

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def send(self, reply: Reply) -> None:
        """Answer the event awaiting a reply (or send the banner, first of all)."""
        self._check_reply(reply)
        if self._state == CONNECTED:
            self._send_banner(reply)
            return
        event = self._take_pending(reply)
        positive = reply.code < 400
        if positive and reply.code not in _POSITIVE[type(event)]:
            self._pending = event
            hint = " (use auth_succeeded())" if reply.code == 235 else ""
            raise LocalProtocolError(
                f"reply {reply.code} does not fit {type(event).__name__} "
                f"in state {self._state}{hint}"
            )
        if reply.close:
            self._write(reply)
            if isinstance(event, MessageEnd):
                self._end_transaction()  # settled by this very reply
            self._abandon_message(reply)
            self._close()
            return
        self._state = _AFTER_REPLY[(self._state, type(event))][0 if positive else 1]
        if isinstance(event, Hello):
            self._answer_hello(event, reply, positive)
            return
        self._write(reply)
        if isinstance(event, MailFrom) and positive:
            self._smtputf8 = event.smtputf8
            self._recipients = 0
        elif isinstance(event, RcptTo) and positive:
            self._recipients += 1
        elif isinstance(event, DataStart) and positive:
            self._in_message = True
            self._header = self._header_limits()
            self._reader = DataReader(
                bare_newline="reject" if self._reject_bare else "normalize",
                max_line=MAX_MESSAGE_LINE,
                max_size=self._config.max_message_size,
                after_crlf=self._data_after_crlf,
            )
        elif isinstance(event, MessageEnd):
            self._end_transaction()
        elif isinstance(event, StartTLS) and positive:
            self._lines.clear()  # RFC 3207 4.2: pipelined commands are discarded

    def auth_succeeded(self, identity: str, reply: Reply) -> None:
        """End a SASL exchange successfully (235): the session is `identity`'s."""
        self._check_reply(reply)
        if not identity:
            raise LocalProtocolError("auth_succeeded() needs an identity")
        if not isinstance(self._pending, AuthStart | AuthResponse):
            raise LocalProtocolError(
                f"auth_succeeded() with no AUTH exchange awaiting a reply "
                f"(state {self._state}, pending {type(self._pending).__name__})"
            )
        if not 200 <= reply.code < 300:
            raise LocalProtocolError(f"auth_succeeded() needs a 2xx reply, not {reply.code}")
        self._pending = None
        self._authenticated = identity
        self._write(reply)
        self._state = CLOSED if reply.close else READY

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS is done: reset (RFC 3207 4.2)."""
        if self._state != TLS_WAIT:
            raise LocalProtocolError(f"tls_started() in state {self._state}, not after STARTTLS")
        self._lines.clear()
        self._tls = True
        self._authenticated = None
        self._helo = None
        self._esmtp = False
        self._state = GREETED

    def timeout(self) -> None:
        """The client was idle too long: 421 4.4.2 and close."""
        text = f"{self._config.hostname} Error: timeout exceeded"
        self._end_session(Reply(421, "4.4.2", text, close=True))

    def shutdown(self, text: str) -> None:
        """The server is stopping: 421 4.3.2 with `text` and close."""
        self._end_session(Reply(421, "4.3.2", text, close=True))

    def _end_session(self, reply: Reply) -> None:
        self._check_reply(reply)
        if self._state == CLOSED:
            return
        self._pending = None
        self._write(reply)
        self._abandon_message(reply)
        self._close()

    # --- Reply plumbing ---------------------------------------------------

    def _check_reply(self, reply: Reply) -> None:
        if not isinstance(reply, Reply):
            raise LocalProtocolError(f"expected a Reply, got {type(reply).__name__}")
        problem = reply_problem(reply)
        if problem is not None:
            raise LocalProtocolError(problem)

    def _take_pending(self, reply: Reply) -> Event:
        if self._state == CLOSED:
            raise LocalProtocolError(f"send({reply}) after the session closed")
        event = self._pending
        if event is None:
            raise LocalProtocolError(
                f"send({reply}) with no event awaiting a reply (state {self._state})"
            )
        if (self._state, type(event)) not in _AFTER_REPLY:
            raise LocalProtocolError(f"no transition for {type(event).__name__} in {self._state}")
        self._pending = None
        return event

    def _send_banner(self, reply: Reply) -> None:
        if reply.code not in _BANNER_CODES:
            raise LocalProtocolError(f"the banner must be 220, 421 or 554, not {reply.code}")
        # RFC 2034 3: no enhanced code in the greeting.
        self._write(Reply(reply.code, None, reply.text))
        if reply.close or reply.code == 421:
            self._close()
        else:
            self._state = GREETED if reply.code == 220 else REFUSED

    def _write(self, reply: Reply) -> None:
        self._out += encode_reply(reply)

    def _error(self, reply: Reply) -> None:
        """Answer a client error; too many of them end the session."""
        self._write(reply)
        self._errors += 1
        limit = self._config.max_errors
        if limit and self._errors >= limit and self._state != CLOSED:
            text = f"{self._config.hostname} Error: too many errors"
            self._write(Reply(421, "4.7.0", text, close=True))
            self._abandon_message(Reply(421, "4.7.0", text))
            self._close()

    def _close(self) -> None:
        self._state = CLOSED
        self._pending = None
        self._reader = None
        self._lines.clear()

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        if event.needs_reply:
            self._pending = event

    def _abandon_message(self, reason: Reply) -> None:
        if self._in_message:
            self._in_message = False
            self._events.append(MessageAborted(reason))

    def _end_transaction(self) -> None:
        self._in_message = False
        self._reader = None
        self._smtputf8 = False
        self._recipients = 0
        self._octets = 0

    def _reset_transaction(self, why: str) -> None:
        """Drop the transaction (RSET, or HELO/EHLO inside one, RFC 5321 4.1.4)."""
        self._abandon_message(Reply(451, "4.3.0", f"Message abandoned by the client ({why})"))
        self._end_transaction()
        self._events.append(Reset())

    # --- EHLO -------------------------------------------------------------

    def _answer_hello(self, event: Hello, reply: Reply, positive: bool) -> None:
        if not positive:
            self._write(reply)
            return
        self._helo = event.domain
        self._esmtp = event.command == "EHLO"
        lines = [reply.text]
        if self._esmtp:
            lines += self._extensions()
        # RFC 2034 3: no enhanced codes in replies to HELO/EHLO.
        self._write(Reply(reply.code, None, "\n".join(lines)))

    def _header_limits(self) -> HeaderLimits:
        return HeaderLimits(self._config.max_header_size, self._config.max_header_fields)

    def _smtputf8_offered(self) -> bool:
        # RFC 6531 3.1 (8): SMTPUTF8 only comes with 8BITMIME.
        return self._config.smtputf8 and self._config.eightbitmime

    def _starttls_offered(self) -> bool:
        return self._config.starttls and not self._tls

    def _auth_offered(self) -> bool:
        c = self._config
        return bool(c.auth_mechanisms) and self._authenticated is None and (
            self._tls or c.auth_plaintext
        )

    def _extensions(self) -> list[str]:
        c = self._config
        ext = []
        if c.pipelining:
            ext.append("PIPELINING")
        ext.append(f"SIZE {c.max_message_size}" if c.max_message_size else "SIZE")
        if c.eightbitmime:
            ext.append("8BITMIME")
        ext.append("ENHANCEDSTATUSCODES")
        if self._smtputf8_offered():
            ext.append("SMTPUTF8")
        if self._starttls_offered():
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH " + " ".join(c.auth_mechanisms))
        if c.chunking:
            ext.append("CHUNKING")
        if c.dsn:
            ext.append("DSN")
        return ext

    # --- Command lines ----------------------------------------------------

    def _command_line(self, line: Line) -> None:
        if line.too_long:
            self._error(Reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.4)"))
            return
        if line.bare_lf and self._reject_bare:
            self._error(Reply(500, "5.5.2", "Bare <LF> received; commands end with <CR><LF>"))
            return
        raw = line.text
        if _CONTROL_RE.search(raw):
            what = "Bare <CR>" if b"\r" in raw else "Control character"
            self._error(Reply(500, "5.5.2", f"{what} in command"))
            return
        try:
            text = raw.decode("utf-8").rstrip(" ")
        except UnicodeDecodeError:
            self._error(Reply(500, "5.5.2", "Command is not valid UTF-8"))
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.lstrip(" ")
        handler = _HANDLERS.get(verb)
        if handler is None:
            if verb in _FORBIDDEN:
                text = f"{self._config.hostname} This is an SMTP server; closing"
                self._write(Reply(421, "4.7.0", text, close=True))
                self._close()
                return
            reply_text = "Empty command" if not verb else "Command unrecognized"
            self._error(Reply(500, "5.5.2" if not verb else "5.5.1", reply_text))
            return
        if line.length > _LINE_LIMITS.get(verb, MAX_COMMAND_LINE):
            self._error(Reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.4)"))
            return
        if verb == "BDAT":
            self._cmd_bdat(arg, after_crlf=not line.bare_lf)
            return
        if verb not in _COMMANDS[self._state]:
            if self._state == REFUSED:
                self._error(_REFUSED_REPLY)
            else:
                self._error(_SEQUENCE_ERRORS.get((self._state, verb), _BAD_SEQUENCE))
            return
        self._data_after_crlf = not line.bare_lf
        handler(self, verb, arg)

    def _cmd_hello(self, verb: str, arg: str) -> None:
        if not arg or " " in arg:
            self._error(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        if self._state in _TRANSACTION_STATES:
            self._reset_transaction(verb)
            self._state = READY
        self._emit(Hello(verb, arg))

    def _cmd_mail(self, verb: str, arg: str) -> None:
        c = self._config
        if c.auth_required and self._authenticated is None:
            self._write(Reply(530, "5.7.0", "Authentication required"))  # RFC 4954 6
            return
        if not _FROM_RE.match(arg):
            self._error(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        try:
            path, rest = address.parse_reverse_path(arg[5:])
        except AddressError as exc:
            self._error(Reply(501, "5.1.7", f"Bad sender address syntax: {exc}"))
            return
        offered = {"SIZE"}
        if c.eightbitmime:
            offered.add("BODY")
        if self._smtputf8_offered():
            offered.add("SMTPUTF8")
        if c.dsn:
            offered |= {"RET", "ENVID"}
        if c.auth_mechanisms:
            offered.add("AUTH")  # RFC 4954 5: accepted even before AUTH
        params = self._parameters(rest, offered, "MAIL FROM")
        if params is None:
            return
        try:
            size = address.parse_size(params["SIZE"]) if "SIZE" in params else None
            body = None
            if "BODY" in params:
                if (params["BODY"] or "").upper() == "BINARYMIME":
                    self._error(Reply(504, "5.5.4", "BODY=BINARYMIME is not supported"))
                    return
                body = address.parse_body(params["BODY"])
            if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
                raise ParameterError("SMTPUTF8 takes no value")
            ret = address.parse_ret(params["RET"]) if "RET" in params else None
            envid = address.parse_envid(params["ENVID"]) if "ENVID" in params else None
            auth = address.parse_auth_param(params["AUTH"]) if "AUTH" in params else None
        except ParameterError as exc:
            self._error(Reply(501, "5.5.4", str(exc)))
            return
        smtputf8 = "SMTPUTF8" in params
        if path.is_utf8 and not smtputf8:
            # RFC 6531 3.5: 550 and X.6.7 for a sender address that must be ASCII.
            self._error(Reply(550, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter"))
            return
        if size is not None and c.max_message_size and size > c.max_message_size:
            self._write(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
            return
        if auth is not None and self._authenticated is None:
            auth = "<>"  # RFC 4954 5: an unauthenticated client's AUTH= is not trusted
        self._emit(
            MailFrom(path.address, size, body, smtputf8, ret, envid, auth, route=path.route)
        )

    def _cmd_rcpt(self, verb: str, arg: str) -> None:
        c = self._config
        if not _TO_RE.match(arg):
            self._error(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        try:
            path, rest = address.parse_forward_path(arg[3:])
        except AddressError as exc:
            self._error(Reply(501, "5.1.3", f"Bad recipient address syntax: {exc}"))
            return
        params = self._parameters(rest, {"NOTIFY", "ORCPT"} if c.dsn else set(), "RCPT TO")
        if params is None:
            return
        try:
            notify = address.parse_notify(params["NOTIFY"]) if "NOTIFY" in params else None
            orcpt = address.parse_orcpt(params["ORCPT"]) if "ORCPT" in params else None
        except ParameterError as exc:
            self._error(Reply(501, "5.5.4", str(exc)))
            return
        if path.is_utf8 and not self._smtputf8:
            # RFC 6531 3.5: 553 and X.6.7 for a recipient address that must be ASCII.
            self._error(Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8 on MAIL FROM"))
            return
        if self._recipients >= c.max_recipients:
            self._write(Reply(452, "4.5.3", "Too many recipients"))  # RFC 5321 4.5.3.1.10
            return
        self._emit(RcptTo(path.address, notify, orcpt, route=path.route))

    def _parameters(
        self, text: str, offered: set[str], command: str
    ) -> dict[str, str | None] | None:
        try:
            params = address.parse_parameters(text)
        except ParameterError as exc:
            self._error(Reply(501, "5.5.4", str(exc)))
            return None
        unknown = [k for k in params if k not in offered]
        if unknown:
            # RFC 5321 4.1.1.11: 555 for parameters not recognized.
            self._error(Reply(555, "5.5.4", f"{command} parameter {unknown[0]} not supported"))
            return None
        return params

    def _cmd_data(self, verb: str, arg: str) -> None:
        if arg:
            self._error(Reply(501, "5.5.4", "Syntax: DATA"))
            return
        self._emit(DataStart(chunking=False))

    def _cmd_rset(self, verb: str, arg: str) -> None:
        if arg:
            self._error(Reply(501, "5.5.4", "Syntax: RSET"))
            return
        if self._state in _TRANSACTION_STATES:
            self._state = READY
        self._reset_transaction("RSET")
        self._write(Reply(250, "2.0.0", "OK"))

    def _cmd_noop(self, verb: str, arg: str) -> None:
        self._write(Reply(250, "2.0.0", "OK"))

    def _cmd_quit(self, verb: str, arg: str) -> None:
        self._write(Reply(221, "2.0.0", f"{self._config.hostname} closing connection"))
        self._abandon_message(Reply(451, "4.3.0", "Message abandoned by the client (QUIT)"))
        self._events.append(Quit())
        self._close()

    def _cmd_vrfy(self, verb: str, arg: str) -> None:
        if not arg:
            self._error(Reply(501, "5.5.4", "Syntax: VRFY address"))
            return
        # RFC 5321 3.5.3: 252 when the server will not verify.
        text = "Cannot VRFY user, but will accept message and attempt delivery"
        self._write(Reply(252, "2.5.0", text))

    def _cmd_expn(self, verb: str, arg: str) -> None:
        self._write(Reply(502, "5.5.1", "EXPN not available"))  # RFC 5321 3.5.2

    def _cmd_help(self, verb: str, arg: str) -> None:
        commands = ["EHLO", "HELO", "MAIL", "RCPT", "DATA"]
        if self._config.chunking:
            commands.append("BDAT")
        commands += ["RSET", "NOOP", "QUIT", "VRFY", "HELP"]
        if self._starttls_offered():
            commands.append("STARTTLS")
        if self._auth_offered():
            commands.append("AUTH")
        self._write(Reply(214, "2.0.0", "Commands: " + " ".join(commands)))

    def _cmd_starttls(self, verb: str, arg: str) -> None:
        if arg:
            self._error(Reply(501, "5.5.4", "Syntax: STARTTLS"))  # RFC 3207 4
        elif self._tls:
            self._error(Reply(503, "5.5.1", "TLS already active"))
        elif not self._config.starttls:
            self._error(Reply(502, "5.5.1", "STARTTLS not available"))
        else:
            self._emit(StartTLS())

    def _cmd_auth(self, verb: str, arg: str) -> None:
        c = self._config
        if not c.auth_mechanisms:
            self._error(Reply(502, "5.5.1", "AUTH not available"))
            return
        if self._authenticated is not None:
            self._error(Reply(503, "5.5.1", "Already authenticated"))  # RFC 4954 4
            return
        if not (self._tls or c.auth_plaintext):
            if self._starttls_offered():
                self._write(Reply(530, "5.7.0", "Must issue a STARTTLS command first"))
            else:
                self._error(Reply(502, "5.5.1", "AUTH not available without TLS"))
            return
        parts = arg.split(" ")
        if not arg or len(parts) > 2:
            self._error(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            return
        mechanism = parts[0].upper()
        if mechanism not in c.auth_mechanisms:
            self._error(Reply(504, "5.5.4", "Unrecognized authentication type"))  # RFC 4954 4
            return
        self._emit(AuthStart(mechanism, parts[1] if len(parts) == 2 else None))

    # --- SASL exchange lines ----------------------------------------------

    def _auth_line(self, line: Line) -> None:
        if line.too_long:
            # RFC 4954 4: a response longer than the buffer fails AUTH with 500 5.5.6.
            self._state = READY
            self._error(Reply(500, "5.5.6", "Authentication exchange line is too long"))
            return
        if line.bare_lf and self._reject_bare:
            self._state = READY
            self._error(Reply(500, "5.5.2", "Bare <LF> received; lines end with <CR><LF>"))
            return
        text = line.text.decode("ascii", "replace").strip(" ")
        if text == "*":
            self._state = READY
            self._write(Reply(501, "5.7.0", "Authentication cancelled"))  # RFC 4954 4
            return
        self._emit(AuthResponse(text))

    # --- DATA -------------------------------------------------------------

    def _read_data(self) -> bool:
        reader = self._reader
        assert reader is not None
        data = self._lines.take_all()
        if not data:
            return False
        content = reader.feed(data)
        header = self._header
        if content and (header.done or header.feed(content) is None):
            self._events.append(MessageData(content))
        if reader.done:
            self._lines.unread(reader.leftover)
            problem = reader.problem or header.problem
            if problem is None:
                self._emit(MessageEnd(reader.size))
            else:
                # At the end of data, as every content refusal (RFC 5321 4.2.5 lets
                # the server refuse the message only then).
                self._refuse_message(_CONTENT_REPLIES[problem])
        return True

    def _refuse_message(self, reply: Reply) -> None:
        self._write(reply)
        self._abandon_message(reply)
        self._end_transaction()
        self._state = READY

    # --- BDAT (RFC 3030) --------------------------------------------------

    def _cmd_bdat(self, arg: str, *, after_crlf: bool) -> None:
        if not self._config.chunking:
            self._error(Reply(502, "5.5.1", "BDAT not available"))
            return
        parts = arg.split(" ")
        size_text = parts[0]
        if (
            not 1 <= len(parts) <= 2
            or not (size_text.isascii() and size_text.isdigit())
            or len(size_text) > MAX_CHUNK_DIGITS
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            # The chunk's length is unknown: nothing can be skipped.
            self._error(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
            return
        size = int(size_text)
        self._chunk_left = self._chunk_size = size
        self._chunk_last = len(parts) == 2
        self._chunk_error = None
        state = self._state
        if "BDAT" not in _COMMANDS.get(state, frozenset()):
            # RFC 3030 3: read the chunk anyway so the stream stays in sync.
            self._chunk_error = (
                _REFUSED_REPLY
                if state == REFUSED
                else _SEQUENCE_ERRORS.get((state, "BDAT"), _BAD_SEQUENCE)
            )
            self._chunk_return = state
        else:
            if state == RCPT:
                self._octets = 0
                self._bdat_lines = LineMeter(MAX_MESSAGE_LINE)
                self._header = self._header_limits()
                self._in_message = True
                self._emit(DataStart(chunking=True))
            limit = self._config.max_message_size
            if limit and self._octets + size > limit:
                self._chunk_error = _CONTENT_REPLIES[TOO_BIG]
                self._chunk_return = READY
        self._state = BDAT
        if size == 0:
            self._chunk_done()

    def _read_chunk(self) -> bool:
        n = min(self._chunk_left, len(self._lines))
        if n == 0:
            return False
        data = self._lines.take(n)
        self._chunk_left -= n
        if self._chunk_error is None:
            self._octets += n
            header = self._header
            problem = (LONG_LINE if self._bdat_lines.feed(data)
                       else None if header.done else header.feed(data))
            if problem is not None:
                # Read to the chunk's end, keep nothing more, refuse it there.
                self._chunk_error = _CONTENT_REPLIES[problem]
                self._chunk_return = READY
            else:
                self._events.append(MessageData(data))
        if self._chunk_left == 0:
            self._chunk_done()
        return True

    def _chunk_done(self) -> None:
        error = self._chunk_error
        if error is not None:
            self._chunk_error = None
            self._state = self._chunk_return
            if error in _REFUSED_CONTENT:
                self._refuse_message(error)  # RFC 3030 3: the transaction failed
            else:
                self._error(error)
        elif self._chunk_last:
            self._emit(MessageEnd(self._octets))
        else:
            self._state = CHUNKING
            self._write(Reply(250, "2.0.0", f"{self._chunk_size} octets received"))


# Replies for content the core refuses at the end of the message.
_CONTENT_REPLIES: dict[str, Reply] = {
    TOO_BIG: Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"),
    BARE_LF: Reply(
        554, "5.5.2", "Message refused: bare <LF> received; lines end with <CR><LF>"
    ),
    BARE_CR: Reply(
        554, "5.5.2", "Message refused: bare <CR> received; lines end with <CR><LF>"
    ),
    LONG_LINE: Reply(
        554, "5.6.0", f"Message refused: a line is longer than {MAX_MESSAGE_LINE} octets"
    ),
    HEADER_TOO_BIG: Reply(552, "5.3.4", "Message header section exceeds fixed maximum size"),
    TOO_MANY_FIELDS: Reply(554, "5.6.0", "Message refused: too many header fields"),
}
# The replies that end a BDAT transaction at the chunk that brought them.
_REFUSED_CONTENT = frozenset(
    _CONTENT_REPLIES[p] for p in (TOO_BIG, LONG_LINE, HEADER_TOO_BIG, TOO_MANY_FIELDS)
)

_HANDLERS = {
    "HELO": SMTPServer._cmd_hello,
    "EHLO": SMTPServer._cmd_hello,
    "MAIL": SMTPServer._cmd_mail,
    "RCPT": SMTPServer._cmd_rcpt,
    "DATA": SMTPServer._cmd_data,
    "BDAT": SMTPServer._cmd_data,  # dispatched to _cmd_bdat before the table
    "RSET": SMTPServer._cmd_rset,
    "NOOP": SMTPServer._cmd_noop,
    "QUIT": SMTPServer._cmd_quit,
    "VRFY": SMTPServer._cmd_vrfy,
    "EXPN": SMTPServer._cmd_expn,
    "HELP": SMTPServer._cmd_help,
    "STARTTLS": SMTPServer._cmd_starttls,
    "AUTH": SMTPServer._cmd_auth,
}
