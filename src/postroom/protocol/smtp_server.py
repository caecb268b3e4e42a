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
`ConnectionClosed`. Errors are `_core`'s: LocalProtocolError for a call out
of turn (a reply no event awaits, a code that does not fit the event).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable

from postroom.protocol import smtp_input as incoming
from postroom.protocol import smtp_states as states
from postroom.protocol._core import NEED_DATA, PAUSED, LocalProtocolError, Signal, illegal_move
from postroom.protocol.lines import LineBuffer
from postroom.protocol.replies import MAX_REPLY_LINE, Reply, encode_reply
from postroom.protocol.smtp_config import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    MAX_MAIL_LINE,
    MAX_RCPT_LINE,
    SMTPServerConfig,
)
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
from postroom.protocol.smtp_states import State

# The events, states, config and line limits live in the smtp_* modules beside
# this one; they are part of this module's API too.
__all__ = [
    "MAX_COMMAND_LINE", "MAX_MAIL_LINE", "MAX_RCPT_LINE", "MAX_AUTH_LINE", "MAX_REPLY_LINE",
    "LocalProtocolError", "State", "SMTPServerConfig", "SMTPServer",
    "Event", "Hello", "MailFrom", "RcptTo", "DataStart", "MessageData", "MessageEnd",
    "MessageAborted", "StartTLS", "AuthStart", "AuthResponse", "Reset", "Quit",
    "ConnectionClosed", "NEED_DATA", "PAUSED", "Signal",
]

_BANNER_CODES = frozenset({220, 421, 554})
_READING = frozenset(State) - {State.TLS_WAIT, State.CLOSED}  # states that keep input
# Attribute access on an Enum class goes through EnumType.__getattr__ (slow before
# Python 3.12): hot paths use this name or sets of states instead.
_CLOSED = State.CLOSED
_OK = Reply(250, "2.0.0", "OK")


class SMTPServer:
    """One SMTP session, server side. See the module docstring."""

    def __init__(self, config: SMTPServerConfig) -> None:
        self._config = config
        self._state = State.CONNECTED
        self._lines = LineBuffer(MAX_AUTH_LINE)  # the longest line any state takes
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._pending: Event | None = None
        self._eof = False
        self._errors = 0
        self._tls = config.tls_active
        self._authenticated: str | None = None
        self._helo: str | None = None
        self._reject_bare = config.bare_newline == "reject"
        self._mail_parameters = config.mail_parameters()
        self._rcpt_parameters = config.rcpt_parameters()
        # The transaction.
        self._smtputf8 = False
        self._recipients = 0
        self._in_message = False  # DataStart emitted, message not yet settled
        self._data: incoming.DataContent | None = None  # DATA, after the 354
        self._chunked: incoming.ChunkedContent | None = None  # BDAT, from the first chunk
        self._data_after_crlf = True  # the DATA command ended with CRLF, not bare LF
        # The BDAT chunk being read; with `_chunk_error` set it is only read past
        # (RFC 3030 3: the stream stays in sync), and that reply follows.
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_error: Reply | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def closing(self) -> bool:
        """True once the session is over: write data_to_send(), then close."""
        return self._state is _CLOSED

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
        return len(self._lines) + (self._data.buffered if self._data else 0)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means it closed its side (EOF)."""
        reading = self._state in _READING
        if not reading and self._state is State.CLOSED:
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
        elif reading:  # not TLS_WAIT: RFC 3207 4.2, nothing sent before TLS counts
            self._lines.feed(data)

    def next_event(self) -> Event | Signal:
        while True:
            if self._events:
                return self._events.popleft()
            if self._pending is not None:
                return PAUSED
            step = _STEPS.get(self._state)
            if step is None:  # no input is read before the banner or once closed
                return PAUSED if self._state is State.CONNECTED else ConnectionClosed()
            if not step(self):
                if not self._eof:
                    return NEED_DATA
                self._abandon_message(Reply(421, "4.4.2", "Connection lost during the message"))
                self._close()
                self._events.append(ConnectionClosed())

    def _read_command(self) -> bool:
        """Read and act on a command line; False if none is whole."""
        if self._chunk_left:
            return self._read_chunk()  # a chunk out of sequence, read past
        line = self._lines.next_line()
        if line is None:
            return False
        command = incoming.read_command(line, self._config)
        if isinstance(command, incoming.Answer):
            self._answer(command)
            return True
        verb, arg = command
        if verb == "BDAT":
            self._cmd_bdat(arg)  # sequenced by itself: its chunk is read in any state
        elif verb not in states.COMMANDS[self._state]:
            self._error(states.SEQUENCE_ERRORS.get((self._state, verb), states.BAD_SEQUENCE))
        else:
            self._data_after_crlf = not line.bare_lf
            _HANDLERS[verb](self, verb, arg)
        return True

    def _read_auth_line(self) -> bool:
        """Read and act on a SASL response line (RFC 4954 4); False if none is whole."""
        line = self._lines.next_line()
        if line is None:
            return False
        text = line.text.decode("ascii", "replace").strip(" ")
        if line.too_long:
            # RFC 4954 4: a response longer than the buffer fails AUTH with 500 5.5.6.
            self._move("auth end")
            self._error(Reply(500, "5.5.6", "Authentication exchange line is too long"))
        elif line.bare_lf and self._reject_bare:
            self._move("auth end")
            self._error(Reply(500, "5.5.2", "Bare <LF> received; lines end with <CR><LF>"))
        elif text == "*":
            self._move("auth end")
            self._write(Reply(501, "5.7.0", "Authentication cancelled"))  # RFC 4954 4
        else:
            self._emit(AuthResponse(text))
        return True

    def _discard(self) -> bool:
        self._lines.clear()  # RFC 3207 4.2: nothing before the TLS handshake counts
        return False

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def send(self, reply: Reply) -> None:
        """Answer the event awaiting a reply (or send the banner, first of all)."""
        data = self._wire(reply)
        event = self._pending
        if event is None:
            if self._state is State.CONNECTED:
                self._send_banner(reply)
                return
            if self._state is State.CLOSED:
                raise LocalProtocolError(f"send({reply}) after the session closed")
            raise LocalProtocolError(
                f"send({reply}) with no event awaiting a reply (state {self._state})"
            )
        positive = reply.code < 400
        codes, accepted, refused = states.ANSWERS[type(event)]
        if positive and reply.code not in codes:
            hint = " (use auth_succeeded())" if reply.code == 235 else ""
            raise LocalProtocolError(
                f"reply {reply.code} does not fit {type(event).__name__} "
                f"in state {self._state}{hint}"
            )
        if reply.close:
            self._pending = None
            self._out += data
            if isinstance(event, MessageEnd):
                self._end_transaction()  # settled by this very reply
            self._abandon_message(reply)
            self._close()
            return
        self._move(accepted if positive else refused)
        self._pending = None
        if isinstance(event, Hello):
            self._answer_hello(event, reply, positive)
            return
        self._out += data
        if not positive:
            if isinstance(event, MessageEnd):
                self._end_transaction()
        elif isinstance(event, MailFrom):
            self._smtputf8 = event.smtputf8
            self._recipients = 0
        elif isinstance(event, RcptTo):
            self._recipients += 1
        elif isinstance(event, DataStart):
            self._in_message = True
            self._data = incoming.DataContent(self._config, after_crlf=self._data_after_crlf)
        elif isinstance(event, MessageEnd):
            self._end_transaction()
        elif isinstance(event, StartTLS):
            self._lines.clear()  # RFC 3207 4.2: pipelined commands are discarded

    def auth_succeeded(self, identity: str, reply: Reply) -> None:
        """End a SASL exchange successfully (235): the session is `identity`'s."""
        data = self._wire(reply)
        if not identity:
            raise LocalProtocolError("auth_succeeded() needs an identity")
        if not isinstance(self._pending, AuthStart | AuthResponse):
            raise LocalProtocolError(
                f"auth_succeeded() with no AUTH exchange awaiting a reply "
                f"(state {self._state}, pending {type(self._pending).__name__})"
            )
        if not 200 <= reply.code < 300:
            raise LocalProtocolError(f"auth_succeeded() needs a 2xx reply, not {reply.code}")
        self._move("auth end")
        self._pending = None
        self._authenticated = identity
        self._out += data
        if reply.close:
            self._close()

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS is done: reset (RFC 3207 4.2)."""
        self._move("tls_started")
        self._lines.clear()
        self._tls = True
        self._authenticated = None
        self._helo = None

    def timeout(self) -> None:
        """The client was idle too long: 421 4.4.2 and close."""
        text = f"{self._config.hostname} Error: timeout exceeded"
        self._end_session(Reply(421, "4.4.2", text, close=True))

    def shutdown(self, text: str) -> None:
        """The server is stopping: 421 4.3.2 with `text` and close."""
        self._end_session(Reply(421, "4.3.2", text, close=True))

    def _end_session(self, reply: Reply) -> None:
        data = self._wire(reply)
        if self._state is State.CLOSED:
            return
        self._pending = None
        self._out += data
        self._abandon_message(reply)
        self._close()

    def _move(self, trigger: str) -> None:
        try:
            self._state = states.TRANSITIONS[self._state, trigger]
        except KeyError:
            raise illegal_move(self._state, trigger) from None

    def _wire(self, reply: Reply) -> bytes:
        """The wire form of an application's reply; LocalProtocolError if it has none."""
        if not isinstance(reply, Reply):
            raise LocalProtocolError(f"expected a Reply, got {type(reply).__name__}")
        try:
            return encode_reply(reply)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None

    def _send_banner(self, reply: Reply) -> None:
        if reply.code not in _BANNER_CODES:
            raise LocalProtocolError(f"the banner must be 220, 421 or 554, not {reply.code}")
        # RFC 2034 3: no enhanced code in the greeting.
        self._write(Reply(reply.code, None, reply.text))
        if reply.close or reply.code == 421:
            self._close()
        else:
            self._move("banner" if reply.code == 220 else "banner refused")

    def _write(self, reply: Reply) -> None:
        self._out += encode_reply(reply)

    def _error(self, reply: Reply) -> None:
        """Answer a client error; too many of them end the session."""
        self._write(reply)
        self._errors += 1
        limit = self._config.max_errors
        if limit and self._errors >= limit and self._state is not State.CLOSED:
            text = f"{self._config.hostname} Error: too many errors"
            self._write(Reply(421, "4.7.0", text, close=True))
            self._abandon_message(Reply(421, "4.7.0", text))
            self._close()

    def _close(self) -> None:
        self._move("close")
        self._pending = None
        self._data = None
        self._chunk_left = 0
        self._lines.clear()

    def _emit(self, event: Event) -> None:
        """Hand on an event that awaits the application's reply (all but BDAT's
        DataStart, which is appended as it is)."""
        self._events.append(event)
        self._pending = event

    def _abandon_message(self, reason: Reply) -> None:
        if self._in_message:
            self._in_message = False
            self._events.append(MessageAborted(reason))

    def _end_transaction(self) -> None:
        self._in_message = False
        self._data = None
        self._chunked = None
        self._smtputf8 = False
        self._recipients = 0

    def _reset_transaction(self, why: str) -> None:
        """Drop the transaction (RSET, or HELO/EHLO inside one, RFC 5321 4.1.4)."""
        if self._state in states.TRANSACTION_STATES:
            self._move("reset")
        self._abandon_message(Reply(451, "4.3.0", f"Message abandoned by the client ({why})"))
        self._end_transaction()
        self._events.append(Reset())

    def _answer_hello(self, event: Hello, reply: Reply, positive: bool) -> None:
        if not positive:
            self._write(reply)
            return
        self._helo = event.domain
        lines = [reply.text]
        if event.command == "EHLO":
            lines += self._config.extensions(self._tls, self._authenticated is not None)
        # RFC 2034 3: no enhanced codes in replies to HELO/EHLO.
        self._write(Reply(reply.code, None, "\n".join(lines)))

    def _answer(self, outcome: Event | incoming.Answer) -> None:
        """Hand on the event a command asks for, or send the core's own reply."""
        if not isinstance(outcome, incoming.Answer):
            self._events.append(outcome)  # as _emit: every such event awaits a reply
            self._pending = outcome
        elif outcome.reply.close:
            self._write(outcome.reply)
            self._close()
        elif outcome.error:
            self._error(outcome.reply)
        else:
            self._write(outcome.reply)

    def _cmd_hello(self, verb: str, arg: str) -> None:
        outcome = incoming.read_hello(verb, arg)
        if not isinstance(outcome, incoming.Answer) and self._state in states.TRANSACTION_STATES:
            self._reset_transaction(verb)
        self._answer(outcome)

    def _cmd_mail(self, verb: str, arg: str) -> None:
        authenticated = self._authenticated is not None
        self._answer(incoming.read_mail(arg, self._config, self._mail_parameters, authenticated))

    def _cmd_rcpt(self, verb: str, arg: str) -> None:
        full = self._recipients >= self._config.max_recipients
        self._answer(incoming.read_rcpt(arg, self._rcpt_parameters, self._smtputf8, full))

    def _cmd_data(self, verb: str, arg: str) -> None:
        self._answer(incoming.read_data(arg))

    def _cmd_rset(self, verb: str, arg: str) -> None:
        if arg:
            self._error(Reply(501, "5.5.4", "Syntax: RSET"))
            return
        self._reset_transaction("RSET")
        self._write(_OK)

    def _cmd_noop(self, verb: str, arg: str) -> None:
        self._write(_OK)

    def _cmd_quit(self, verb: str, arg: str) -> None:
        self._write(Reply(221, "2.0.0", f"{self._config.hostname} closing connection"))
        self._abandon_message(Reply(451, "4.3.0", "Message abandoned by the client (QUIT)"))
        self._events.append(Quit())
        self._close()

    def _cmd_vrfy(self, verb: str, arg: str) -> None:
        self._answer(incoming.read_vrfy(arg))

    def _cmd_expn(self, verb: str, arg: str) -> None:
        self._write(Reply(502, "5.5.1", "EXPN not available"))  # RFC 5321 3.5.2

    def _cmd_help(self, verb: str, arg: str) -> None:
        text = self._config.help_text(self._tls, self._authenticated is not None)
        self._write(Reply(214, "2.0.0", text))

    def _cmd_starttls(self, verb: str, arg: str) -> None:
        self._answer(incoming.read_starttls(arg, self._config, self._tls))

    def _cmd_auth(self, verb: str, arg: str) -> None:
        authenticated = self._authenticated is not None
        self._answer(incoming.read_auth(arg, self._config, self._tls, authenticated))

    def _read_data(self) -> bool:
        content = self._data
        assert content is not None
        data = self._lines.take_all()
        if not data:
            return False
        piece = content.feed(data)
        if piece:
            self._events.append(MessageData(piece))
        if content.done:
            self._lines.unread(content.leftover)
            refusal = content.refusal
            if refusal is None:
                self._emit(MessageEnd(content.size))
            else:
                self._refuse_message(refusal)
        return True

    def _refuse_message(self, reply: Reply) -> None:
        self._write(reply)
        self._abandon_message(reply)
        self._end_transaction()
        self._move("content refused")

    def _cmd_bdat(self, arg: str) -> None:
        chunk = incoming.read_bdat(arg, self._config)
        if isinstance(chunk, incoming.Answer):
            self._answer(chunk)
            return
        size, self._chunk_last = chunk
        self._chunk_left = self._chunk_size = size
        state = self._state
        if "BDAT" not in states.COMMANDS[state]:
            # RFC 3030 3: read past the chunk anyway so the stream stays in sync.
            self._chunk_error = states.SEQUENCE_ERRORS.get((state, "BDAT"), states.BAD_SEQUENCE)
        else:
            chunked = self._chunked
            if chunked is None:  # the first chunk, after RCPT
                chunked = self._chunked = incoming.ChunkedContent(self._config)
                self._in_message = True
                self._events.append(DataStart(chunking=True))  # no reply: RFC 3030 2
            self._chunk_error = chunked.admits(size)
            self._move("bdat")
        if size == 0:
            self._chunk_done()

    def _read_chunk(self) -> bool:
        n = min(self._chunk_left, len(self._lines))
        if n == 0:
            return False
        data = self._lines.take(n)
        self._chunk_left -= n
        if self._chunk_error is None:
            assert self._chunked is not None
            # Read to the chunk's end, keep nothing more, refuse it there.
            self._chunk_error = self._chunked.feed(data)
            if self._chunk_error is None:
                self._events.append(MessageData(data))
        if self._chunk_left == 0:
            self._chunk_done()
        return True

    def _chunk_done(self) -> None:
        error, self._chunk_error = self._chunk_error, None
        if error is not None:
            if self._state is State.BDAT:
                self._refuse_message(error)  # RFC 3030 3: the transaction failed
            else:
                self._error(error)  # a chunk out of sequence, read past
        elif self._chunk_last:
            assert self._chunked is not None
            self._emit(MessageEnd(self._chunked.size))
        else:
            self._move("chunk end")
            self._out += _chunk_received(self._chunk_size)


@functools.lru_cache(maxsize=256)  # a client sends chunks of a few sizes
def _chunk_received(size: int) -> bytes:
    """The wire form of the 250 to a BDAT chunk that is not the last (RFC 3030 2)."""
    return encode_reply(Reply(250, "2.0.0", f"{size} octets received"))


# What each state reads from the input (CONNECTED and CLOSED read nothing).
_STEPS: dict[State, Callable[[SMTPServer], bool]] = {
    **{s: SMTPServer._read_command for s in states.COMMANDS},
    State.AUTH: SMTPServer._read_auth_line,
    State.DATA: SMTPServer._read_data,
    State.BDAT: SMTPServer._read_chunk,
    State.TLS_WAIT: SMTPServer._discard,
}

_HANDLERS = {
    "HELO": SMTPServer._cmd_hello,
    "EHLO": SMTPServer._cmd_hello,
    "MAIL": SMTPServer._cmd_mail,
    "RCPT": SMTPServer._cmd_rcpt,
    "DATA": SMTPServer._cmd_data,
    "RSET": SMTPServer._cmd_rset,
    "NOOP": SMTPServer._cmd_noop,
    "QUIT": SMTPServer._cmd_quit,
    "VRFY": SMTPServer._cmd_vrfy,
    "EXPN": SMTPServer._cmd_expn,
    "HELP": SMTPServer._cmd_help,
    "STARTTLS": SMTPServer._cmd_starttls,
    "AUTH": SMTPServer._cmd_auth,
}
