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
(RFC 2449 6.6); the login commands, STLS and QUIT are always sent alone.
Anything from the server that breaks the protocol (a malformed status line, a
response no command awaits, a continuation outside AUTH, bytes after the +OK to
STLS) raises `RemoteProtocolError` from `next_event`; the core is closed after that.
Calling the core out of turn raises `LocalProtocolError`; an argument that cannot
be sent (a control character, a line past RFC 2449's 255 octets) raises
ValueError.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Literal, NoReturn

from postroom.protocol._core import NEED_DATA as NEED_DATA
from postroom.protocol._core import LocalProtocolError as LocalProtocolError
from postroom.protocol._core import RemoteProtocolError as RemoteProtocolError
from postroom.protocol._core import Signal as Signal
from postroom.protocol._core import shown
from postroom.protocol.lines import DataReader, LineBuffer
from postroom.protocol.pop3_replies import parse_status as parse_status

# --- Limits ----------------------------------------------------------------
MAX_COMMAND_LINE = 255  # RFC 2449 4: a command line, keyword, arguments and CRLF
MAX_STATUS_LINE = 512  # RFC 2449 4: a response line, CRLF included
# Servers do send longer lines; accept them up to a bound that keeps a hostile
# server from filling memory.
MAX_STATUS_LINE_ACCEPTED = 8192
# A whole CAPA/LIST/UIDL listing. UIDL of 100,000 messages takes ~8 MB.
MAX_LISTING_OCTETS = 32 * 1024 * 1024


# --- Commands (what a Response answers) ----------------------------------------
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

# --- Events --------------------------------------------------------------------


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

# --- Capabilities ----------------------------------------------------------------

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

    @property
    def stls(self) -> bool:
        return "STLS" in self.tags  # RFC 2595 4

    @property
    def user(self) -> bool:
        return "USER" in self.tags  # RFC 2449 6.8

    @property
    def top(self) -> bool:
        return "TOP" in self.tags  # RFC 2449 6.1

    @property
    def uidl(self) -> bool:
        return "UIDL" in self.tags  # RFC 2449 6.4

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.tags  # RFC 2449 6.6

    @property
    def resp_codes(self) -> bool:
        return "RESP-CODES" in self.tags  # RFC 2449 6.3

    @property
    def sasl(self) -> tuple[str, ...]:
        """SASL mechanisms offered (RFC 2449 6.3, RFC 5034 6), upper case."""
        return tuple(dict.fromkeys(m.upper() for m in self.tags.get("SASL", ())))

    @property
    def implementation(self) -> str | None:
        words = self.tags.get("IMPLEMENTATION")
        return " ".join(words) if words else None  # RFC 2449 6.9


# --- Status lines ------------------------------------------------------------------

# RFC 1939 7 (APOP): the greeting's timestamp has the syntax of a msg-id.
_TIMESTAMP_RE = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+>")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def apop_timestamp(greeting: str) -> str | None:
    """The "<...>" timestamp in a greeting's text (RFC 1939 7), or None."""
    m = _TIMESTAMP_RE.search(greeting)
    return m.group(0) if m is not None else None


def apop_digest(timestamp: str, secret: str) -> str:
    """MD5 of timestamp + shared secret as 32 lower-case hex digits (RFC 1939 7)."""
    data = (timestamp + secret).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# --- States ----------------------------------------------------------------------
CONNECTED = "connected"  # awaiting the greeting
AUTHORIZATION = "authorization"  # RFC 1939 4
IN_AUTH = "sasl"  # "+ " received: a SASL response next
TLS_WAIT = "tls"  # +OK to STLS: handshake, then tls_started()
TRANSACTION = "transaction"  # RFC 1939 5
CLOSED = "closed"

# Two tables drive the client, as in the SMTP client core. _SEND says which
# commands may be sent in a state and the state they lead to if they succeed;
# it is checked against the state the session will be in once every command
# sent so far succeeded. _ON_REPLY moves the state the responses confirm:
# (state, command) -> (after +OK, after -ERR, after a "+ " continuation);
# None marks an answer that cannot come for the command.
_SESSION_COMMANDS = (CAPA, STAT, LIST, UIDL, RETR, TOP, DELE, NOOP, RSET)
_SEND: dict[tuple[str, str], str] = {
    (AUTHORIZATION, CAPA): AUTHORIZATION,
    (AUTHORIZATION, STLS): TLS_WAIT,
    (AUTHORIZATION, USER): AUTHORIZATION,
    (AUTHORIZATION, PASS): TRANSACTION,
    (AUTHORIZATION, APOP): TRANSACTION,
    (AUTHORIZATION, AUTH): IN_AUTH,
    (IN_AUTH, AUTH_RESPONSE): IN_AUTH,
    (AUTHORIZATION, QUIT): CLOSED,
    **{(TRANSACTION, c): TRANSACTION for c in _SESSION_COMMANDS},
    (TRANSACTION, QUIT): CLOSED,  # RFC 1939 6: the Update state, then the end
}
_ON_REPLY: dict[tuple[str, str], tuple[str, str, str | None]] = {
    # RFC 1939 4: a server that will not serve says -ERR and closes.
    (CONNECTED, GREETING): (AUTHORIZATION, CLOSED, None),
    (AUTHORIZATION, CAPA): (AUTHORIZATION, AUTHORIZATION, None),
    (AUTHORIZATION, STLS): (TLS_WAIT, AUTHORIZATION, None),
    (AUTHORIZATION, USER): (AUTHORIZATION, AUTHORIZATION, None),
    (AUTHORIZATION, PASS): (TRANSACTION, AUTHORIZATION, None),
    (AUTHORIZATION, APOP): (TRANSACTION, AUTHORIZATION, None),
    (AUTHORIZATION, AUTH): (TRANSACTION, AUTHORIZATION, IN_AUTH),
    (IN_AUTH, AUTH_RESPONSE): (TRANSACTION, AUTHORIZATION, IN_AUTH),
    (AUTHORIZATION, QUIT): (CLOSED, CLOSED, None),
    **{(TRANSACTION, c): (TRANSACTION, TRANSACTION, None) for c in _SESSION_COMMANDS},
    # RFC 1939 6: -ERR to QUIT says some deletions failed; the session ends anyway.
    (TRANSACTION, QUIT): (CLOSED, CLOSED, None),
}
# Nothing may follow these until they are answered: they change the session
# (login, TLS) or end it. RFC 2449 6.6 lets the rest be pipelined.
_ENDS_GROUP = frozenset({GREETING, STLS, USER, PASS, APOP, AUTH, AUTH_RESPONSE, QUIT})
# What a +OK answers with a multi-line body (RFC 1939 3): always for these,
# and for LIST and UIDL without an argument.
_MULTILINE = frozenset({CAPA, RETR, TOP})
_STREAMED = frozenset({RETR, TOP})


def _check_text(value: str, what: str) -> None:
    # A CR or LF in an argument would end the command early: the rest would be
    # read as a command of its own (command injection).
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"control character in {what}")


def _check_number(number: int, what: str = "message number") -> str:
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"{what} must be a positive integer, not {number!r}")
    return str(number)


class POP3Client:
    """One POP3 session, client side. See the module docstring."""

    def __init__(self) -> None:
        self._state = CONNECTED  # what the responses so far confirm
        self._projected = CONNECTED  # once every pending command succeeds
        self._pending: deque[tuple[str, str]] = deque([(GREETING, "")])
        self._lines = LineBuffer(MAX_STATUS_LINE_ACCEPTED)
        self._out = bytearray()
        self._eof = False
        self._violation: str | None = None
        self._unanswered: tuple[str, ...] = ()
        self._capabilities = Capabilities()
        self._tls = False
        self._timestamp: str | None = None
        # A multi-line body being read: its reader, the Response it belongs to,
        # what it gathered (listings) or counted (streams), and a MessageEnd owed.
        self._reader: DataReader | None = None
        self._head: Response | None = None
        self._listing = bytearray()
        self._octets = 0
        self._end_owed: MessageEnd | None = None

    # --- Properties -------------------------------------------------------

    @property
    def state(self) -> str:
        """The state the responses so far confirm."""
        return self._state

    @property
    def pending(self) -> tuple[str, ...]:
        """Commands sent and not yet (completely) answered, oldest first."""
        streaming = (self._head.command,) if self._head is not None else ()
        return streaming + tuple(command for command, _ in self._pending)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def timestamp(self) -> str | None:
        """The APOP timestamp of the greeting (RFC 1939 7), None if it had none."""
        return self._timestamp

    # --- Input ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; b"" means it closed its side (EOF)."""
        if self._state == CLOSED:
            return
        if not data:
            self._eof = True
        elif self._state == TLS_WAIT:
            self._violation = "the server sent data before the TLS handshake (RFC 2595 4)"
        else:
            self._lines.feed(data)

    def next_event(self) -> Event | Literal[Signal.NEED_DATA]:
        """The next event, NEED_DATA, or ConnectionClosed when the session is over."""
        if self._end_owed is not None:
            end, self._end_owed = self._end_owed, None
            return end
        if self._state == CLOSED and self._reader is None:
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
        state = self._state
        after = _ON_REPLY.get((state, command))
        if after is None:  # pragma: no cover - _SEND and _ON_REPLY list the same pairs
            self._fail(f"{command} answered in state {state}")
        if indicator == "+":
            nxt = after[2]
            if nxt is None:
                self._fail(f"continuation {shown(line)} cannot answer {command}")
            self._state = nxt
            self._settle()
            return Challenge(command, text)
        ok = indicator == "+OK"
        self._state = after[0] if ok else after[1]
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
        if self._state == TLS_WAIT and len(self._lines):
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
                listing = _text(bytes(self._listing)).split("\r\n")[:-1]
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
        if self._state == CLOSED and self._reader is None:
            self._pending.clear()

    def _fail(self, why: str) -> NoReturn:
        self._close()
        raise RemoteProtocolError(why)

    def _close(self) -> tuple[str, ...]:
        if self._state != CLOSED or self._pending or self._reader is not None:
            self._unanswered = self.pending
        self._state = self._projected = CLOSED
        self._pending.clear()
        self._lines.clear()
        self._reader = self._head = None
        self._listing.clear()
        self._violation = None
        return self._unanswered

    # --- Output -----------------------------------------------------------

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def _command(self, command: str, line: str, argument: str = "", *, limit: bool = True) -> None:
        """Queue a command line and await its answer."""
        pending = self.pending
        if pending:
            last = pending[-1]
            if command == AUTH_RESPONSE or last in _ENDS_GROUP or command in _ENDS_GROUP - {QUIT}:
                raise LocalProtocolError(f"cannot send {command} before {last} is answered")
            if not self._capabilities.pipelining:
                raise LocalProtocolError(
                    f"cannot send {command} before {last} is answered: no PIPELINING"
                )
        nxt = _SEND.get((self._projected, command))
        if nxt is None:
            raise LocalProtocolError(f"cannot send {command} in state {self._projected}")
        data = line.encode("utf-8") + b"\r\n"
        if limit and len(data) > MAX_COMMAND_LINE:
            raise ValueError(f"{command} line longer than {MAX_COMMAND_LINE} octets (RFC 2449 4)")
        self._out += data
        self._pending.append((command, argument))
        self._projected = nxt

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
        if self._state != TLS_WAIT:
            raise LocalProtocolError(f"tls_started() in state {self._state}, not after STLS")
        self._lines.clear()
        self._tls = True
        self._capabilities = Capabilities()
        self._state = self._projected = AUTHORIZATION

    def user(self, name: str) -> None:
        _check_text(name, "the user name")
        if not name:
            raise ValueError("USER needs a name")
        self._command(USER, f"USER {name}", name)

    def pass_(self, password: str) -> None:
        """PASS (RFC 1939 7): the rest of the line is the password, spaces included."""
        _check_text(password, "the password")
        self._command(PASS, f"PASS {password}")

    def apop(self, name: str, secret: str) -> None:
        """APOP name digest (RFC 1939 7) with the greeting's timestamp."""
        if self._timestamp is None:
            raise ValueError("APOP needs a timestamp in the greeting, and it had none")
        _check_text(name, "the user name")
        if not name or " " in name:
            raise ValueError("APOP needs a name without spaces")
        self._command(APOP, f"APOP {name} {apop_digest(self._timestamp, secret)}", name)

    def auth(self, mechanism: str, initial_response: str | None = None) -> None:
        """AUTH (RFC 5034 4); an empty initial response is sent as "=".

        RFC 5034 4: when the initial response would take the line past 255
        octets it must not be sent (ValueError here): send AUTH without it and
        answer the empty challenge instead.
        """
        _check_text(mechanism, "the mechanism")
        mechanism = mechanism.upper()
        if not mechanism or " " in mechanism:
            raise ValueError(f"malformed SASL mechanism name {mechanism!r}")
        line = f"AUTH {mechanism}"
        if initial_response is not None:
            _check_text(initial_response, "the initial response")
            line += f" {initial_response or '='}"
        self._command(AUTH, line, mechanism)

    def auth_response(self, response: str) -> None:
        """The line answering a continuation; "*" cancels the exchange (RFC 5034 4)."""
        _check_text(response, "the SASL response")
        if self._state != IN_AUTH:
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


# --- Reading the answers ---------------------------------------------------------


def _fields(text: str, count: int, what: str) -> list[str]:
    words = text.split()
    if len(words) < count:
        raise RemoteProtocolError(f"malformed {what}: {text[:60]!r}")
    return words[:count]


def _int(word: str, what: str) -> int:
    if not (word.isascii() and word.isdigit()):
        raise RemoteProtocolError(f"malformed number in {what}: {word[:20]!r}")
    return int(word)


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
        # RFC 1939 7: 1 to 70 characters from 0x21 to 0x7E.
        if not (1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)):
            raise RemoteProtocolError(f"malformed unique-id {uid[:80]!r}")
        uids[_int(number, "UIDL")] = uid
    return uids
