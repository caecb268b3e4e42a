"""The SMTP client protocol core (RFC 5321 and its extensions): commands out, replies in.

`SMTPClient` does no I/O. The driver calls a method per command (`ehlo`,
`mail`, `rcpt`, `data`, ...), writes `data_to_send()` to the server, feeds
what the server sent to `receive_data` (`b""` at EOF) and takes each reply,
paired with the command it answers, from `next_event()`:

    client = SMTPClient()
    # the greeting is awaited from the start
    while (event := client.next_event()) is NEED_DATA:
        client.receive_data(await read())
    client.ehlo("relay.example")
    ...
    client.mail("a@x.example"); client.rcpt("b@y.example"); client.data()
    write(client.data_to_send())        # one write: PIPELINING (RFC 2920 3.1)
    ... three Response events later, on 354:
    client.send_data(chunk) ... client.end_data()

Commands may be sent before earlier ones are answered when the server offered
PIPELINING and the earlier command may be followed in a group (RFC 2920 3.1);
each `Response` names its command. Content goes through lines.DotStuffer (CRLF
lines, long ones folded, RFC 5321 4.5.3.1.6), replies through replies.ReplyParser.
A server that breaks the protocol (a malformed reply, a reply no command awaits
or that cannot answer it, bytes after the 220 to STARTTLS) makes `next_event`
raise RemoteProtocolError and close the core; a call out of turn raises
LocalProtocolError, an argument that cannot be sent ValueError.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from postroom.protocol import smtp_paths
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
)
from postroom.protocol._core import NEED_DATA as NEED_DATA
from postroom.protocol._core import LocalProtocolError as LocalProtocolError
from postroom.protocol._core import RemoteProtocolError as RemoteProtocolError
from postroom.protocol._core import Signal as Signal
from postroom.protocol.lines import MAX_CONTENT_LINE, DotStuffer
from postroom.protocol.replies import Reply, ReplyParser
from postroom.protocol.smtp_paths import AddressError, ParameterError

GREETING = "greeting"  # the server's opening reply, awaited from the start
EHLO = "EHLO"
HELO = "HELO"
MAIL = "MAIL"
RCPT = "RCPT"
DATA = "DATA"
END_DATA = "."  # the content's final CRLF "." CRLF
BDAT = "BDAT"
BDAT_LAST = "BDAT LAST"
STARTTLS = "STARTTLS"
AUTH = "AUTH"
AUTH_RESPONSE = "AUTH response"  # a line answering a 334 challenge
RSET = "RSET"
NOOP = "NOOP"
QUIT = "QUIT"


@dataclass(frozen=True, slots=True)
class Response:
    """A reply and the command it answers.

    `argument` is the address for MAIL and RCPT, the name for EHLO/HELO, the
    chunk size for BDAT, "" otherwise. `command` is "" for a 421 that came
    when no command awaited a reply (a server closing on its own).
    """

    command: str
    reply: Reply
    argument: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The session is over: QUIT answered, a 421, EOF, or a protocol error.

    `unanswered` lists the commands still awaiting a reply when it ended.
    """

    unanswered: tuple[str, ...] = ()


Event = Response | ConnectionClosed

_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")  # RFC 5321 4.1.1.1 ehlo-keyword


@dataclass(frozen=True, slots=True)
class Extensions:
    """What the server's EHLO reply offered: keyword (upper case) -> its parameters.

    Empty after HELO, before EHLO, and after STARTTLS until the next EHLO.
    """

    keywords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Extensions:
        """Parse the lines after the first (RFC 5321 4.1.1.1); junk lines are skipped."""
        keywords: dict[str, str] = {}
        for line in reply.text.split("\n")[1:]:
            word, _, params = line.strip().partition(" ")
            if word.upper().startswith("AUTH="):
                # Old servers write "AUTH=LOGIN PLAIN" for clients of a draft.
                word, params = "AUTH", f"{word[5:]} {params}"
            if not _KEYWORD_RE.fullmatch(word):
                continue
            word = word.upper()
            params = " ".join(params.split())
            if word in keywords and params:
                params = f"{keywords[word]} {params}".strip()
            keywords[word] = params
        return cls(keywords)

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.keywords

    def get(self, keyword: str) -> str | None:
        return self.keywords.get(keyword.upper())

    @property
    def size_limit(self) -> int | None:
        """SIZE's fixed maximum (RFC 1870 4); None when absent or 0 (no fixed limit)."""
        value = self.keywords.get("SIZE", "").split(" ")[0]
        if not (value.isascii() and value.isdigit()) or int(value) == 0:
            return None
        return int(value)

    pipelining = Offered("PIPELINING")  # RFC 2920
    starttls = Offered("STARTTLS")  # RFC 3207
    eightbitmime = Offered("8BITMIME")  # RFC 6152
    smtputf8 = Offered("SMTPUTF8")  # RFC 6531
    dsn = Offered("DSN")  # RFC 3461
    chunking = Offered("CHUNKING")  # RFC 3030
    enhanced_status_codes = Offered("ENHANCEDSTATUSCODES")  # RFC 2034

    @property
    def auth_mechanisms(self) -> tuple[str, ...]:
        """SASL mechanisms offered with AUTH (RFC 4954 3), upper case."""
        return tuple(dict.fromkeys(self.keywords.get("AUTH", "").upper().split()))


class State(CoreState):
    CONNECTED = "connected"  # awaiting the greeting
    GREETED = "greeted"  # 220 greeting (or TLS started): EHLO/HELO next
    REFUSED = "refused"  # 554 greeting: only QUIT (RFC 5321 3.1)
    READY = "ready"  # greeted, no transaction
    IN_MAIL = "mail"  # MAIL accepted, no recipient yet
    IN_RCPT = "rcpt"  # at least one recipient accepted
    IN_DATA = "data"  # 354 received: content, then end_data()
    CHUNKING = "chunking"  # between BDAT chunks
    IN_AUTH = "auth"  # 334 received: a SASL response next
    TLS_WAIT = "tls"  # 220 to STARTTLS: handshake, then tls_started()
    CLOSED = "closed"


_S = State
_TRANSACTION = (_S.READY, _S.IN_MAIL, _S.IN_RCPT, _S.CHUNKING)
# (state, command) -> the states after a 2xx, a 3xx and a 4xx/5xx reply (see
# _core.Step). A 421 closes from anywhere (RFC 5321 3.8).
_STEPS: dict[tuple[State, str], Step[State]] = {
    (_S.CONNECTED, GREETING): Step(_S.GREETED, None, _S.REFUSED, sendable=False),
    **{(s, c): Step(_S.READY, None, _S.GREETED)
       for s in (_S.GREETED, _S.READY) for c in (EHLO, HELO)},
    (_S.READY, MAIL): Step(_S.IN_MAIL, None, _S.READY),
    (_S.IN_MAIL, RCPT): Step(_S.IN_RCPT, None, _S.IN_MAIL),
    (_S.IN_RCPT, RCPT): Step(_S.IN_RCPT, None, _S.IN_RCPT),
    (_S.IN_RCPT, DATA): Step(None, _S.IN_DATA, _S.IN_RCPT),
    # RFC 2920 3.1: a DATA pipelined after MAIL or every RCPT failed may still get
    # a 354 (then the client sends an empty message).
    **{(s, DATA): Step(None, _S.IN_DATA, s, sendable=False) for s in (_S.READY, _S.IN_MAIL)},
    (_S.IN_DATA, END_DATA): Step(_S.READY, None, _S.READY),
    # RFC 3030 3: after a failed chunk the transaction is void; send RSET.
    **{(s, BDAT): Step(_S.CHUNKING, None, _S.READY) for s in (_S.IN_RCPT, _S.CHUNKING)},
    **{(s, BDAT_LAST): Step(_S.READY, None, _S.READY) for s in (_S.IN_RCPT, _S.CHUNKING)},
    (_S.READY, STARTTLS): Step(_S.TLS_WAIT, None, _S.READY),
    (_S.TLS_WAIT, TLS_STARTED): Step(_S.GREETED, None, _S.GREETED, sendable=False),
    (_S.READY, AUTH): Step(_S.READY, _S.IN_AUTH, _S.READY),
    (_S.IN_AUTH, AUTH_RESPONSE): Step(_S.READY, _S.IN_AUTH, _S.READY),
    (_S.GREETED, RSET): Step(_S.GREETED, None, _S.GREETED),
    **{(s, RSET): Step(_S.READY, None, s) for s in _TRANSACTION},
    **{(s, NOOP): Step(s, None, s) for s in (_S.GREETED, *_TRANSACTION)},
    **{(s, QUIT): Step(_S.CLOSED, None, _S.CLOSED)
       for s in (_S.GREETED, _S.REFUSED, *_TRANSACTION)},
    **{(s, CLOSE): Step(_S.CLOSED, None, _S.CLOSED, sendable=False) for s in State},
}
# RFC 2920 3.1: these end a group; nothing may be sent until they are answered
# (STARTTLS and AUTH change the session; the greeting comes before anything).
_ENDS_GROUP = frozenset({GREETING, EHLO, HELO, DATA, STARTTLS, AUTH, AUTH_RESPONSE, NOOP, QUIT})
# Commands that continue an exchange after an intermediate reply: they need
# that reply first, even with PIPELINING.
_CONTINUATIONS = frozenset({END_DATA, AUTH_RESPONSE})

_QCHAR_EXCLUDED = frozenset("+=\\")  # RFC 6533 3: not QCHAR
# The EHLO keyword each MAIL or RCPT parameter needs offered.
_EXTENSION_OF = {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8", "RET": "DSN",
                 "ENVID": "DSN", "AUTH": "AUTH", "NOTIFY": "DSN", "ORCPT": "DSN"}


def encode_orcpt(value: str) -> str:
    """An ORCPT value for the wire (RFC 3461 4.2): "addr-type;xtext".

    `value` is "type;address" as decoded (what the server core's `RcptTo`
    carries) or a bare address (taken as rfc822). A non-ASCII address uses
    the "utf-8" type with \\x{HEX} escapes (RFC 6533 3), which needs no
    SMTPUTF8 session.
    """
    addr_type, sep, addr = value.partition(";")
    if not sep:
        addr_type, addr = "rfc822", value
    if addr.isascii() and addr_type.lower() != "utf-8":
        return f"{addr_type};{smtp_paths.xtext_encode(addr)}"
    if addr_type.lower() not in ("rfc822", "utf-8"):
        raise ValueError(f"ORCPT address of type {addr_type!r} must be ASCII")
    escaped = "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in _QCHAR_EXCLUDED else f"\\x{{{ord(c):X}}}"
        for c in addr
    )
    return f"utf-8;{escaped}"


@functools.lru_cache(maxsize=4096)
def path_problem(path: str, *, reverse: bool = False) -> str | None:
    """Why `path` cannot go in MAIL FROM:<...> (`reverse`) or RCPT TO:<...>, or None.

    The address is given without angle brackets, as the server core hands it
    out ("" is the null reverse-path); it must be RFC 5321 4.1.2 syntax.
    Answers are remembered for the last few thousand paths (the same senders
    and recipients come back message after message).
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "control character in the address"
    parse = smtp_paths.parse_reverse_path if reverse else smtp_paths.parse_forward_path
    try:
        _path, rest = parse(f"<{path}>")
    except AddressError as exc:
        return str(exc)
    return "text after the address" if rest else None


class SMTPClient(ClientCore[State]):
    """One SMTP session, client side. See the module docstring.

    `max_line`: the longest content line sent, CRLF not counted (None: as it is).
    """

    _steps = _STEPS
    _closed = State.CLOSED
    _tls_wait = State.TLS_WAIT
    _tls_rule = "RFC 3207 4.2"
    _alone = _CONTINUATIONS
    _ends_group = _ENDS_GROUP

    def __init__(self, *, max_line: int | None = MAX_CONTENT_LINE) -> None:
        super().__init__(State.CONNECTED, GREETING)
        self._parser = ReplyParser()
        self._extensions = Extensions()
        self._esmtp = False
        self._authenticated = False
        self._utf8 = False  # the transaction was opened with SMTPUTF8
        self._stuffer = DotStuffer(max_line=max_line)

    @property
    def extensions(self) -> Extensions:
        return self._extensions

    @property
    def esmtp(self) -> bool:
        """The server accepted EHLO (since the last STARTTLS)."""
        return self._esmtp

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def _pipelining(self) -> bool:
        return self._extensions.pipelining

    def _take(self, data: bytes) -> None:
        self._parser.feed(data)

    def next_event(self) -> Event | Literal[Signal.NEED_DATA]:
        """The next reply with its command, NEED_DATA, or ConnectionClosed when over."""
        if self._state is State.CLOSED:
            return ConnectionClosed(self._close())
        if self._violation is not None:
            self._fail(self._violation)
        try:
            reply = self._parser.next_reply()
        except RemoteProtocolError:
            self._close()
            raise
        if reply is None:
            if self._eof:
                return ConnectionClosed(self._close())
            return NEED_DATA
        return self._answer(reply)

    def _answer(self, reply: Reply) -> Response:
        if not self._pending:
            if reply.code == 421:
                self._close()
                return Response("", reply)
            self._fail(f"reply {reply.code} with no command awaiting one")
        command, argument = self._pending.popleft()
        if reply.code == 421:
            self._close()
            return Response(command, reply, argument)
        cls = reply.code // 100
        state = self._move(command, OK if cls == 2 else MORE if cls == 3 else FAILED,
                           f"reply {reply.code}")
        if cls == 2 and command in (EHLO, HELO):
            self._esmtp = command == EHLO
            self._extensions = Extensions.from_ehlo(reply) if self._esmtp else Extensions()
            self._parser.enhanced = self._extensions.enhanced_status_codes
        elif cls == 2 and command in (AUTH, AUTH_RESPONSE):
            self._authenticated = True
        elif state is State.TLS_WAIT and len(self._parser):
            # Bytes behind the 220 would be read as if they came over TLS
            # (STARTTLS response injection).
            self._fail("the server sent data after its 220 reply to STARTTLS (RFC 3207 4.2)")
        elif state is State.CLOSED:
            self._close()
        if not self._pending:
            self._projected = self._state
        return Response(command, reply, argument)

    def _close(self) -> tuple[str, ...]:
        self._parser.clear()
        return super()._close()

    def _command(self, command: str, line: str | None, argument: str = "") -> None:
        """Queue a command line (None: no line, for the end of data) and await its reply."""
        self._send(command, b"" if line is None else line.encode("utf-8") + b"\r\n", argument)

    def ehlo(self, name: str) -> None:
        self._command(EHLO, f"EHLO {self._hello_name(name)}", name)

    def helo(self, name: str) -> None:
        self._command(HELO, f"HELO {self._hello_name(name)}", name)

    @staticmethod
    def _hello_name(name: str) -> str:
        check_text(name, "the HELO name")
        if not name or " " in name or not name.isascii():
            raise ValueError(f"HELO/EHLO needs an ASCII domain or address literal: {name!r}")
        return name

    def mail(
        self,
        sender: str,
        *,
        size: int | None = None,
        body: str | None = None,
        smtputf8: bool = False,
        ret: str | None = None,
        envid: str | None = None,
        auth: str | None = None,
    ) -> None:
        """MAIL FROM:<sender> ("" is the null path) with the parameters given.

        Each parameter needs its extension offered: SIZE (RFC 1870), BODY
        (8BITMIME, RFC 6152), SMTPUTF8 (RFC 6531), RET/ENVID (DSN, RFC 3461;
        `envid` is given decoded and sent as xtext), AUTH (RFC 4954 5: a
        mailbox or "<>", sent as xtext). ValueError otherwise.
        """
        problem = path_problem(sender, reverse=True)
        if problem is not None:
            raise ValueError(f"cannot send sender {sender!r}: {problem}")
        if not sender.isascii() and not smtputf8:
            raise ValueError("a non-ASCII sender needs smtputf8=True (RFC 6531 3.4)")
        given: dict[str, str | None] = {}
        if size is not None:
            given["SIZE"] = str(size)
        if body is not None:
            given["BODY"] = body.upper()
        if smtputf8:
            given["SMTPUTF8"] = None
        if ret is not None:
            given["RET"] = ret.upper()
        if envid is not None:
            given["ENVID"] = smtp_paths.xtext_encode(envid)
        if auth is not None:
            given["AUTH"] = smtp_paths.xtext_encode(auth)
        params = self._parameters(given, smtp_paths.MAIL_PARAMETERS)
        line = " ".join([f"MAIL FROM:<{sender}>", *params])
        self._command(MAIL, line, sender)
        self._utf8 = smtputf8

    def rcpt(
        self,
        recipient: str,
        *,
        notify: Iterable[str] | None = None,
        orcpt: str | None = None,
    ) -> None:
        """RCPT TO:<recipient>, with NOTIFY and ORCPT (DSN offered, RFC 3461 4.1-4.2).

        `orcpt` is "type;address" decoded, or a bare address; see encode_orcpt.
        """
        problem = path_problem(recipient)
        if problem is not None:
            raise ValueError(f"cannot send recipient {recipient!r}: {problem}")
        if not recipient.isascii() and not self._utf8:
            raise ValueError("a non-ASCII recipient needs SMTPUTF8 on MAIL (RFC 6531 3.4)")
        given: dict[str, str | None] = {}
        if notify is not None:
            given["NOTIFY"] = ",".join(notify).upper()
        if orcpt is not None:
            check_text(orcpt, "ORCPT")
            given["ORCPT"] = encode_orcpt(orcpt)
        params = self._parameters(given, smtp_paths.RCPT_PARAMETERS)
        self._command(RCPT, " ".join([f"RCPT TO:<{recipient}>", *params]), recipient)

    def _need(self, keyword: str, parameter: str) -> None:
        if keyword not in self._extensions:
            raise ValueError(f"{parameter} needs {keyword}, which the server did not offer")

    def _parameters(self, given: dict[str, str | None], known: frozenset[str]) -> list[str]:
        """MAIL or RCPT parameters as sent, each with its extension offered and checked
        by the parser the server core uses (smtp_paths.parse_esmtp_parameters)."""
        params = []
        for keyword, value in given.items():
            self._need(_EXTENSION_OF[keyword], keyword)
            params.append(keyword if value is None else f"{keyword}={value}")
        try:
            smtp_paths.parse_esmtp_parameters(" ".join(params), known)
        except ParameterError as exc:
            raise ValueError(str(exc)) from None
        return params

    def data(self) -> None:
        self._command(DATA, "DATA")

    def send_data(self, chunk: bytes) -> None:
        """Message content after the 354: line ends made CRLF, leading dots doubled."""
        self._in_content("send_data()")
        self._out += self._stuffer.feed(chunk)

    def end_data(self) -> None:
        """End the content: a CRLF if it lacked a final one, then "." CRLF (RFC 5321 4.1.1.4)."""
        self._in_content("end_data()")
        self._command(END_DATA, None)
        self._out += self._stuffer.end()

    def _in_content(self, what: str) -> None:
        in_data = State.IN_DATA
        if self._pending or self._state is not in_data or self._projected is not in_data:
            raise LocalProtocolError(f"{what} needs a 354 reply to DATA (state {self._state})")

    def bdat(self, chunk: bytes, *, last: bool = False) -> None:
        """A BDAT chunk (RFC 3030 2), sent as is: line ends are the caller's business."""
        self._need("CHUNKING", "BDAT")
        command = BDAT_LAST if last else BDAT
        line = f"BDAT {len(chunk)}{' LAST' if last else ''}"
        self._command(command, line, str(len(chunk)))
        self._out += chunk

    def starttls(self) -> None:
        if self._tls:
            raise LocalProtocolError("TLS is already active")
        self._need("STARTTLS", "STARTTLS")
        self._command(STARTTLS, "STARTTLS")

    def tls_started(self) -> None:
        """The handshake after a 220 to STARTTLS is done: forget the session (RFC 3207 4.2)."""
        if self._state is not State.TLS_WAIT:
            raise LocalProtocolError(f"tls_started() in state {self._state}, not after STARTTLS")
        self._parser.clear()
        self._parser.enhanced = False
        self._tls = True
        self._esmtp = False
        self._extensions = Extensions()
        self._authenticated = False
        self._projected = self._move(TLS_STARTED, OK)

    def auth(self, mechanism: str, initial_response: str | None = None) -> None:
        """AUTH (RFC 4954 4); an empty initial response is sent as "="."""
        mechanism = mechanism.upper()
        if mechanism not in self._extensions.auth_mechanisms:
            raise ValueError(f"the server did not offer AUTH {mechanism}")
        line = f"AUTH {mechanism}"
        if initial_response is not None:
            check_text(initial_response, "the initial response")
            line += f" {initial_response or '='}"
        self._command(AUTH, line, mechanism)

    def auth_response(self, response: str) -> None:
        """The line answering a 334 challenge; "*" cancels the exchange (RFC 4954 4)."""
        check_text(response, "the SASL response")
        if self._state is not State.IN_AUTH:
            raise LocalProtocolError(f"auth_response() needs a 334 reply (state {self._state})")
        self._command(AUTH_RESPONSE, response)

    def rset(self) -> None:
        self._command(RSET, "RSET")

    def noop(self) -> None:
        self._command(NOOP, "NOOP")

    def quit(self) -> None:
        self._command(QUIT, "QUIT")
