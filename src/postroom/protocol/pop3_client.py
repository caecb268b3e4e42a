"""The POP3 client protocol core (RFC 1939, 2449, 2595, 5034): commands out, responses in.

`POP3Client` does no I/O, like the SMTP client core. The driver calls a method
per command (`capa`, `stls`, `user`, `pass_`, `stat`, `retr`, ...), writes
`data_to_send()` to the server, feeds what the server sent to `receive_data`
(`b""` at EOF) and takes the events from `next_event()`:

    client = POP3Client()
    # the greeting is awaited from the start
    while (event := client.next_event()) is NEED_DATA:
        client.receive_data(await read())
    client.capa(); write(client.data_to_send())
    ... Response(CAPA, ok=True, lines=("TOP", "UIDL", "STLS", ...))
    client.retr(1); write(client.data_to_send())
    ... Response(RETR, ok=True, text="612 octets"), MessageData(...)..., MessageEnd(612)

Every status line becomes a `Response` naming the command it answers. The
multi-line answers of CAPA, LIST, UIDL (RFC 1939 3, RFC 2449 5) come whole, as
`Response.lines`; those of RETR and TOP are streamed: the `Response`, then
`MessageData` events carrying the content (transparency dots removed, CRLF line
ends, the final CRLF included, the terminating "." line left out), then one
`MessageEnd`. The end of a multi-line answer is CRLF "." CRLF and nothing else.
During AUTH the server's "+ " continuations (RFC 5034 4) come as `Challenge`.

Commands may be pipelined in the TRANSACTION state once CAPA said PIPELINING
(RFC 2449 6.6); the login commands and STLS are sent alone. A server that
breaks the protocol (a malformed status line, an answer no command awaits, a
continuation outside AUTH, bytes after the +OK to STLS) makes `next_event` raise
RemoteProtocolError and close the core; a call out of turn raises
LocalProtocolError, an argument that cannot be sent (a control character, a
line past RFC 2449's 255 octets) ValueError.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from postroom.protocol._core import (
    CLOSE,
    FAILED,
    MORE,
    OK,
    TLS_STARTED,
    ClientCore,
    CoreState,
    Offered,
    Step,
    check_text,
    shown,
)
from postroom.protocol._core import NEED_DATA as NEED_DATA
from postroom.protocol._core import LocalProtocolError as LocalProtocolError
from postroom.protocol._core import RemoteProtocolError as RemoteProtocolError
from postroom.protocol._core import Signal as Signal
from postroom.protocol.lines import DataReader, LineBuffer
from postroom.protocol.pop3_config import MAX_COMMAND_LINE as MAX_COMMAND_LINE
from postroom.protocol.pop3_snapshot import UID_RE, decimal
from postroom.protocol.pop3_wire import TIMESTAMP_RE
from postroom.protocol.pop3_wire import parse_status as parse_status

# Servers do send longer lines; accept them up to a bound that keeps a hostile
# server from filling memory.
MAX_STATUS_LINE_ACCEPTED = 8192
# A whole CAPA/LIST/UIDL listing. UIDL of 100,000 messages takes ~8 MB.
MAX_LISTING_OCTETS = 32 * 1024 * 1024


GREETING = "greeting"  # the server's opening +OK, awaited from the start
CAPA = "CAPA"
STLS = "STLS"
USER = "USER"
PASS = "PASS"
APOP = "APOP"
AUTH = "AUTH"
AUTH_RESPONSE = "AUTH response"  # a line answering a "+ " continuation
STAT = "STAT"
LIST = "LIST"
UIDL = "UIDL"
RETR = "RETR"
TOP = "TOP"
DELE = "DELE"
NOOP = "NOOP"
RSET = "RSET"
QUIT = "QUIT"


@dataclass(frozen=True, slots=True)
class Response:
    """A status line and the command it answers.

    `code` is the RFC 2449 8 response code without brackets ("IN-USE", "AUTH",
    "SYS/TEMP"), taken off the front of `text`. `command` is "" for a -ERR that
    came when no command awaited an answer (a server closing on its own). `argument` is the message
    number for LIST/UIDL/RETR/TOP/DELE ("" for a whole listing) and the name
    for USER/APOP; never a password. `lines` holds the listing of CAPA, LIST
    and UIDL, without line ends and with transparency dots removed.
    """

    command: str
    ok: bool
    text: str
    code: str | None = None
    argument: str = ""
    lines: tuple[str, ...] = ()

    def __str__(self) -> str:
        code = f" [{self.code}]" if self.code else ""
        text = f" {self.text}" if self.text else ""
        return f"{'+OK' if self.ok else '-ERR'}{code}{text}"


@dataclass(frozen=True, slots=True)
class Challenge:
    """A SASL continuation, "+ " and base64 text (RFC 5034 4); answer with auth_response()."""

    command: str
    text: str


@dataclass(frozen=True, slots=True)
class MessageData:
    """A piece of a RETR or TOP answer's content (un-stuffed, CRLF line ends)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The RETR or TOP answer is complete; `octets` counts its content (as LIST does)."""

    octets: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The session is over: QUIT answered, a -ERR greeting, EOF, or a protocol error.

    `unanswered` lists the commands still awaiting an answer when it ended (a
    RETR whose content was cut off is among them).
    """

    unanswered: tuple[str, ...] = ()


Event = Response | Challenge | MessageData | MessageEnd | ConnectionClosed

_CAPA_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")  # RFC 2449 5: capa-tag


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What CAPA listed (RFC 2449 5): tag (upper case) -> its parameters.

    Empty before CAPA, after a CAPA the server refused (servers older than RFC
    2449), and after STLS until the next CAPA (RFC 2595 4).
    """

    tags: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_lines(cls, lines: tuple[str, ...] | list[str]) -> Capabilities:
        tags: dict[str, tuple[str, ...]] = {}
        for line in lines:
            words = line.split()
            if not words or not _CAPA_TAG_RE.fullmatch(words[0]):
                continue  # junk lines are skipped
            tags[words[0].upper()] = tuple(words[1:])
        return cls(tags)

    def __contains__(self, tag: object) -> bool:
        return isinstance(tag, str) and tag.upper() in self.tags

    def get(self, tag: str) -> tuple[str, ...] | None:
        return self.tags.get(tag.upper())

    stls = Offered("STLS")  # RFC 2595 4
    user = Offered("USER")  # RFC 2449 6.8
    top = Offered("TOP")  # RFC 2449 6.1
    uidl = Offered("UIDL")  # RFC 2449 6.4
    pipelining = Offered("PIPELINING")  # RFC 2449 6.6
    resp_codes = Offered("RESP-CODES")  # RFC 2449 6.3

    @property
    def sasl(self) -> tuple[str, ...]:
        """SASL mechanisms offered (RFC 2449 6.3, RFC 5034 6), upper case."""
        return tuple(dict.fromkeys(m.upper() for m in self.tags.get("SASL", ())))

    @property
    def implementation(self) -> str | None:
        words = self.tags.get("IMPLEMENTATION")
        return " ".join(words) if words else None  # RFC 2449 6.9


def apop_timestamp(greeting: str) -> str | None:
    """The "<...>" timestamp in a greeting's text (RFC 1939 7), or None."""
    m = TIMESTAMP_RE.search(greeting)
    return m.group(0) if m is not None else None


def apop_digest(timestamp: str, secret: str) -> str:
    """MD5 of timestamp + shared secret as 32 lower-case hex digits (RFC 1939 7)."""
    data = (timestamp + secret).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class State(CoreState):
    CONNECTED = "connected"  # awaiting the greeting
    AUTHORIZATION = "authorization"  # RFC 1939 4
    IN_AUTH = "sasl"  # "+ " received: a SASL response next
    TLS_WAIT = "tls"  # +OK to STLS: handshake, then tls_started()
    TRANSACTION = "transaction"  # RFC 1939 5
    CLOSED = "closed"


_S = State
_SESSION_COMMANDS = (CAPA, STAT, LIST, UIDL, RETR, TOP, DELE, NOOP, RSET)
# (state, command) -> the states after +OK, after a "+ " continuation and after
# -ERR (see _core.Step).
_STEPS: dict[tuple[State, str], Step[State]] = {
    # RFC 1939 4: a server that will not serve says -ERR and closes.
    (_S.CONNECTED, GREETING): Step(_S.AUTHORIZATION, None, _S.CLOSED, sendable=False),
    **{(_S.AUTHORIZATION, c): Step(_S.AUTHORIZATION, None, _S.AUTHORIZATION)
       for c in (CAPA, USER)},
    (_S.AUTHORIZATION, STLS): Step(_S.TLS_WAIT, None, _S.AUTHORIZATION),
    (_S.TLS_WAIT, TLS_STARTED): Step(_S.AUTHORIZATION, None, _S.AUTHORIZATION, sendable=False),
    **{(_S.AUTHORIZATION, c): Step(_S.TRANSACTION, None, _S.AUTHORIZATION) for c in (PASS, APOP)},
    (_S.AUTHORIZATION, AUTH): Step(_S.TRANSACTION, _S.IN_AUTH, _S.AUTHORIZATION),
    (_S.IN_AUTH, AUTH_RESPONSE): Step(_S.TRANSACTION, _S.IN_AUTH, _S.AUTHORIZATION),
    **{(_S.TRANSACTION, c): Step(_S.TRANSACTION, None, _S.TRANSACTION) for c in _SESSION_COMMANDS},
    # RFC 1939 6: -ERR to QUIT says some deletions failed; the session ends anyway.
    **{(s, QUIT): Step(_S.CLOSED, None, _S.CLOSED) for s in (_S.AUTHORIZATION, _S.TRANSACTION)},
    **{(s, CLOSE): Step(_S.CLOSED, None, _S.CLOSED, sendable=False) for s in State},
}
# Nothing may follow these until they are answered: they change the session
# (login, TLS) or end it, and but for QUIT they are sent alone. RFC 2449 6.6
# lets the rest be pipelined.
_ENDS_GROUP = frozenset({GREETING, STLS, USER, PASS, APOP, AUTH, AUTH_RESPONSE, QUIT})
# What a +OK answers with a multi-line body (RFC 1939 3): always for these,
# and for LIST and UIDL without an argument.
_MULTILINE = frozenset({CAPA, RETR, TOP})
_STREAMED = frozenset({RETR, TOP})


def _check_number(number: int, what: str = "message number") -> str:
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"{what} must be a positive integer, not {number!r}")
    return str(number)


class POP3Client(ClientCore[State]):
    """One POP3 session, client side. See the module docstring."""

    _steps = _STEPS
    _closed = State.CLOSED
    _tls_wait = State.TLS_WAIT
    _tls_rule = "RFC 2595 4"
    _alone = _ENDS_GROUP - {QUIT}
    _ends_group = _ENDS_GROUP

    def __init__(self) -> None:
        super().__init__(State.CONNECTED, GREETING)
        self._lines = LineBuffer(MAX_STATUS_LINE_ACCEPTED)
        self._capabilities = Capabilities()
        self._timestamp: str | None = None
        # A multi-line body being read: its reader, the Response it belongs to,
        # what it gathered (listings) or counted (streams), and a MessageEnd owed.
        self._reader: DataReader | None = None
        self._head: Response | None = None
        self._listing = bytearray()
        self._octets = 0
        self._end_owed: MessageEnd | None = None

    @property
    def pending(self) -> tuple[str, ...]:
        """Commands sent and not yet (completely) answered, oldest first."""
        streaming = (self._head.command,) if self._head is not None else ()
        return streaming + tuple(command for command, _ in self._pending)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def timestamp(self) -> str | None:
        """The APOP timestamp of the greeting (RFC 1939 7), None if it had none."""
        return self._timestamp

    @property
    def _pipelining(self) -> bool:
        return self._capabilities.pipelining

    def _take(self, data: bytes) -> None:
        self._lines.feed(data)

    def next_event(self) -> Event | Literal[Signal.NEED_DATA]:
        """The next event, NEED_DATA, or ConnectionClosed when the session is over."""
        if self._end_owed is not None:
            end, self._end_owed = self._end_owed, None
            return end
        if self._state is State.CLOSED and self._reader is None:
            return ConnectionClosed(self._close())
        if self._violation is not None:
            self._fail(self._violation)
        if self._reader is not None:
            return self._body_event()
        line = self._lines.next_line()
        if line is None:
            if self._eof:
                return ConnectionClosed(self._close())
            return NEED_DATA
        if line.too_long:
            self._fail(f"status line longer than {MAX_STATUS_LINE_ACCEPTED} octets")
        return self._answer(line.text)

    def _answer(self, line: bytes) -> Event | Literal[Signal.NEED_DATA]:
        try:
            indicator, text, code = parse_status(line)
        except RemoteProtocolError:
            self._close()
            raise
        if not self._pending:
            if indicator == "-ERR":
                # A server closing on its own (an idle timeout, a shutdown) says
                # -ERR first, as Dovecot does; the session is over.
                self._close()
                return Response("", False, text, code)
            self._fail(f"response {shown(line)} with no command awaiting one")
        command, argument = self._pending.popleft()
        if indicator == "+":
            self._move(command, MORE, f"continuation {shown(line)}")
            self._settle()
            return Challenge(command, text)
        ok = indicator == "+OK"
        self._move(command, OK if ok else FAILED)
        response = Response(command, ok, text, code, argument)
        if command == GREETING and ok:
            self._timestamp = apop_timestamp(text)
        if ok and (command in _MULTILINE or (command in (LIST, UIDL) and not argument)):
            # RFC 1939 3: the body starts right after the status line's CRLF.
            self._reader = DataReader(bare_newline="normalize", check_lines=False)
            self._head = response
            self._listing.clear()
            self._octets = 0
            if command in _STREAMED:
                return response
            return self._body_event()
        if self._state is State.TLS_WAIT and len(self._lines):
            # Bytes behind the +OK would be read as if they came over TLS
            # (STARTTLS response injection, RFC 2595 4 forbids pipelining STLS).
            self._fail("the server sent data after its +OK to STLS (RFC 2595 4)")
        self._settle()
        return response

    def _body_event(self) -> Event | Literal[Signal.NEED_DATA]:
        """The next piece of a multi-line body: content, a finished listing, or its end."""
        reader, head = self._reader, self._head
        assert reader is not None and head is not None
        data = self._lines.take_all()
        content = reader.feed(data) if data else b""
        streamed = head.command in _STREAMED
        if content:
            self._octets += len(content)
            if not streamed:
                if len(self._listing) + len(content) > MAX_LISTING_OCTETS:
                    self._fail(f"{head.command} listing longer than {MAX_LISTING_OCTETS} octets")
                self._listing += content
        if reader.done:
            self._lines.unread(reader.leftover)
            self._reader = self._head = None
            self._settle()
            if not streamed:
                listing = self._listing.decode("utf-8", "replace").split("\r\n")[:-1]
                self._listing.clear()
                if head.command == CAPA:
                    self._capabilities = Capabilities.from_lines(listing)
                return replace(head, lines=tuple(listing))
            end = MessageEnd(self._octets)
            if content:
                self._end_owed = end
                return MessageData(content)
            return end
        if content and streamed:
            return MessageData(content)
        if self._eof:
            return ConnectionClosed(self._close())
        return NEED_DATA

    def _settle(self) -> None:
        if not self._pending and self._reader is None:
            self._projected = self._state
        if self._state is State.CLOSED and self._reader is None:
            self._pending.clear()

    def _close(self) -> tuple[str, ...]:
        if self._state is State.CLOSED and (self._pending or self._reader is not None):
            self._unanswered = self.pending  # QUIT answered, a RETR still streaming
        unanswered = super()._close()
        self._lines.clear()
        self._reader = self._head = None
        self._listing.clear()
        return unanswered

    def _command(self, command: str, line: str, argument: str = "", *, limit: bool = True) -> None:
        """Queue a command line and await its answer."""
        data = line.encode("utf-8") + b"\r\n"
        self._send(command, data, argument, MAX_COMMAND_LINE if limit else 0)

    def capa(self) -> None:
        """CAPA (RFC 2449 5); its listing replaces `capabilities`."""
        self._command(CAPA, "CAPA")

    def stls(self) -> None:
        """STLS (RFC 2595 4); after the +OK, do the handshake and call tls_started()."""
        if self._tls:
            raise LocalProtocolError("TLS is already active")
        self._command(STLS, "STLS")

    def tls_started(self) -> None:
        """The handshake after +OK to STLS is done: forget the capabilities (RFC 2595 4)."""
        if self._state is not State.TLS_WAIT:
            raise LocalProtocolError(f"tls_started() in state {self._state}, not after STLS")
        self._lines.clear()
        self._tls = True
        self._capabilities = Capabilities()
        self._projected = self._move(TLS_STARTED, OK)

    def user(self, name: str) -> None:
        check_text(name, "the user name")
        if not name:
            raise ValueError("USER needs a name")
        self._command(USER, f"USER {name}", name)

    def pass_(self, password: str) -> None:
        """PASS (RFC 1939 7): the rest of the line is the password, spaces included."""
        check_text(password, "the password")
        self._command(PASS, f"PASS {password}")

    def apop(self, name: str, secret: str) -> None:
        """APOP name digest (RFC 1939 7) with the greeting's timestamp."""
        if self._timestamp is None:
            raise ValueError("APOP needs a timestamp in the greeting, and it had none")
        check_text(name, "the user name")
        if not name or " " in name:
            raise ValueError("APOP needs a name without spaces")
        self._command(APOP, f"APOP {name} {apop_digest(self._timestamp, secret)}", name)

    def auth(self, mechanism: str, initial_response: str | None = None) -> None:
        """AUTH (RFC 5034 4); an empty initial response is sent as "=".

        RFC 5034 4: when the initial response would take the line past 255
        octets it must not be sent (ValueError here): send AUTH without it and
        answer the empty challenge instead.
        """
        check_text(mechanism, "the mechanism")
        mechanism = mechanism.upper()
        if not mechanism or " " in mechanism:
            raise ValueError(f"malformed SASL mechanism name {mechanism!r}")
        line = f"AUTH {mechanism}"
        if initial_response is not None:
            check_text(initial_response, "the initial response")
            line += f" {initial_response or '='}"
        self._command(AUTH, line, mechanism)

    def auth_response(self, response: str) -> None:
        """The line answering a continuation; "*" cancels the exchange (RFC 5034 4)."""
        check_text(response, "the SASL response")
        if self._state is not State.IN_AUTH:
            raise LocalProtocolError(f"auth_response() needs a continuation (state {self._state})")
        # RFC 5034 4: responses are not bound by the command line limit.
        self._command(AUTH_RESPONSE, response, limit=False)

    def stat(self) -> None:
        self._command(STAT, "STAT")

    def list(self, number: int | None = None) -> None:
        """LIST (a listing of every message) or LIST n (one line)."""
        if number is None:
            self._command(LIST, "LIST")
        else:
            arg = _check_number(number)
            self._command(LIST, f"LIST {arg}", arg)

    def uidl(self, number: int | None = None) -> None:
        """UIDL (a listing of every message) or UIDL n (one line); RFC 1939 7."""
        if number is None:
            self._command(UIDL, "UIDL")
        else:
            arg = _check_number(number)
            self._command(UIDL, f"UIDL {arg}", arg)

    def retr(self, number: int) -> None:
        arg = _check_number(number)
        self._command(RETR, f"RETR {arg}", arg)

    def top(self, number: int, lines: int) -> None:
        """TOP n lines (RFC 1939 7): the headers, the blank line and `lines` body lines."""
        arg = _check_number(number)
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
            raise ValueError(f"TOP needs a line count of 0 or more, not {lines!r}")
        self._command(TOP, f"TOP {arg} {lines}", arg)

    def dele(self, number: int) -> None:
        """DELE n: marked now, removed only when QUIT ends the session (RFC 1939 6)."""
        arg = _check_number(number)
        self._command(DELE, f"DELE {arg}", arg)

    def noop(self) -> None:
        self._command(NOOP, "NOOP")

    def rset(self) -> None:
        """RSET: unmark every message marked for deletion."""
        self._command(RSET, "RSET")

    def quit(self) -> None:
        self._command(QUIT, "QUIT")


def _fields(text: str, count: int, what: str) -> list[str]:
    words = text.split()
    if len(words) < count:
        raise RemoteProtocolError(f"malformed {what}: {text[:60]!r}")
    return words[:count]


def _int(word: str, what: str) -> int:
    number = decimal(word)
    if number is None:
        raise RemoteProtocolError(f"malformed number in {what}: {word[:20]!r}")
    return number


def stat_of(response: Response) -> tuple[int, int]:
    """(messages, octets) from a +OK to STAT: "+OK nn mm" (RFC 1939 5)."""
    count, octets = _fields(response.text, 2, "STAT response")
    return _int(count, "STAT"), _int(octets, "STAT")


def sizes_of(response: Response) -> dict[int, int]:
    """{message number: octets} from a +OK to LIST or LIST n (RFC 1939 5 scan listings)."""
    lines = [response.text] if response.argument else list(response.lines)
    sizes: dict[int, int] = {}
    for line in lines:
        number, size = _fields(line, 2, "scan listing")
        sizes[_int(number, "LIST")] = _int(size, "LIST")
    return sizes


def uids_of(response: Response) -> dict[int, str]:
    """{message number: unique-id} from a +OK to UIDL or UIDL n (RFC 1939 7)."""
    lines = [response.text] if response.argument else list(response.lines)
    uids: dict[int, str] = {}
    for line in lines:
        number, uid = _fields(line, 2, "unique-id listing")
        if not UID_RE.fullmatch(uid):
            raise RemoteProtocolError(f"malformed unique-id {uid[:80]!r}")
        uids[_int(number, "UIDL")] = uid
    return uids
