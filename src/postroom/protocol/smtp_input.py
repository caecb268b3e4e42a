"""What an SMTP client sends, read without side effects: command lines and message content.

The `read_*` functions give the event a command asks for, or an `Answer`: the
reply the core sends by itself. `DataContent` and `ChunkedContent` read a
message (DATA; BDAT, RFC 3030) and name the reply that refuses it at its end
(RFC 5321 4.2.5). smtp_server decides what may come in which state.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from postroom.protocol import lines, smtp_paths
from postroom.protocol.header_limits import HEADER_TOO_BIG, TOO_MANY_FIELDS, HeaderLimits
from postroom.protocol.replies import Reply
from postroom.protocol.smtp_config import (
    LINE_LIMITS,
    MAX_CHUNK_DIGITS,
    MAX_COMMAND_LINE,
    SMTPServerConfig,
)
from postroom.protocol.smtp_events import AuthStart, DataStart, Hello, MailFrom, RcptTo, StartTLS


class Answer(NamedTuple):
    """A reply the core gives by itself. `error`: the client erred (syntax, sequence, an
    extension it may not use), which counts toward max_errors; a limit or a policy
    refusal does not count."""

    reply: Reply
    error: bool = True


VERBS = frozenset({"HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT",
                   "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH"})
_FORBIDDEN = frozenset({"CONNECT", "GET", "POST"})  # HTTP sent to SMTP: hang up
_CONTROL_RE = re.compile(rb"[\x00-\x1f\x7f]")
_FROM_RE = re.compile(r"FROM:", re.IGNORECASE)
_TO_RE = re.compile(r"TO:", re.IGNORECASE)
_TOO_LONG = Answer(Reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.4)"))
_BARE_LF = Answer(Reply(500, "5.5.2", "Bare <LF> received; commands end with <CR><LF>"))


def read_command(line: lines.Line, config: SMTPServerConfig) -> tuple[str, str] | Answer:
    """The verb (upper case) and argument of a command line, or the answer to a line
    that is no usable command."""
    if line.too_long:
        return _TOO_LONG
    if line.bare_lf and config.bare_newline == "reject":
        return _BARE_LF
    raw = line.text
    if _CONTROL_RE.search(raw):
        what = "Bare <CR>" if b"\r" in raw else "Control character"
        return Answer(Reply(500, "5.5.2", f"{what} in command"))
    try:
        text = raw.decode("utf-8").rstrip(" ")
    except UnicodeDecodeError:
        return Answer(Reply(500, "5.5.2", "Command is not valid UTF-8"))
    verb, _, arg = text.partition(" ")
    verb = verb.upper()
    if verb not in VERBS:
        if verb in _FORBIDDEN:
            text = f"{config.hostname} This is an SMTP server; closing"
            return Answer(Reply(421, "4.7.0", text, close=True), error=False)
        if not verb:
            return Answer(Reply(500, "5.5.2", "Empty command"))
        return Answer(Reply(500, "5.5.1", "Command unrecognized"))
    if line.length > LINE_LIMITS.get(verb, MAX_COMMAND_LINE):
        return _TOO_LONG
    return verb, arg.lstrip(" ")


def read_hello(verb: str, arg: str) -> Hello | Answer:
    if not arg or " " in arg:
        return Answer(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
    return Hello(verb, arg)


def read_mail(
    arg: str, config: SMTPServerConfig, offered: frozenset[str], authenticated: bool
) -> MailFrom | Answer:
    """MAIL FROM:<path> and its parameters (RFC 5321 4.1.1.2)."""
    if config.auth_required and not authenticated:
        return Answer(Reply(530, "5.7.0", "Authentication required"), error=False)  # RFC 4954 6
    if not _FROM_RE.match(arg):
        return Answer(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
    try:
        path, rest = smtp_paths.parse_reverse_path(arg[5:])
    except smtp_paths.AddressError as exc:
        return Answer(Reply(501, "5.1.7", f"Bad sender address syntax: {exc}"))
    try:
        params = smtp_paths.parse_esmtp_parameters(rest, offered)
    except smtp_paths.ParameterError as exc:
        return _parameter_answer(exc, "MAIL FROM")
    if path.is_utf8 and not params.smtputf8:
        # RFC 6531 3.5: 550 and X.6.7 for a sender address that must be ASCII.
        return Answer(Reply(550, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter"))
    if params.size is not None and config.max_message_size and (
        params.size > config.max_message_size
    ):
        text = "Message size exceeds fixed maximum message size"
        return Answer(Reply(552, "5.3.4", text), error=False)
    auth = params.auth
    if auth is not None and not authenticated:
        auth = "<>"  # RFC 4954 5: an unauthenticated client's AUTH= is not trusted
    return MailFrom(path.address, params.size, params.body, params.smtputf8, params.ret,
                    params.envid, auth, route=path.route)


def read_rcpt(arg: str, offered: frozenset[str], smtputf8: bool, full: bool) -> RcptTo | Answer:
    """RCPT TO:<path> and its parameters (RFC 5321 4.1.1.3); `smtputf8`: the transaction
    has SMTPUTF8, `full`: it has as many recipients as it may."""
    if not _TO_RE.match(arg):
        return Answer(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
    try:
        path, rest = smtp_paths.parse_forward_path(arg[3:])
    except smtp_paths.AddressError as exc:
        return Answer(Reply(501, "5.1.3", f"Bad recipient address syntax: {exc}"))
    try:
        params = smtp_paths.parse_esmtp_parameters(rest, offered)
    except smtp_paths.ParameterError as exc:
        return _parameter_answer(exc, "RCPT TO")
    if path.is_utf8 and not smtputf8:
        # RFC 6531 3.5: 553 and X.6.7 for a recipient address that must be ASCII.
        return Answer(Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8 on MAIL FROM"))
    if full:  # RFC 5321 4.5.3.1.10
        return Answer(Reply(452, "4.5.3", "Too many recipients"), error=False)
    return RcptTo(path.address, params.notify, params.orcpt, route=path.route)


def _parameter_answer(exc: smtp_paths.ParameterError, command: str) -> Answer:
    """MAIL or RCPT parameters that cannot be taken (RFC 5321 4.1.1.11)."""
    if isinstance(exc, smtp_paths.UnsupportedParameter):
        if exc.value is None:
            text = f"{command} parameter {exc.keyword} not supported"
            return Answer(Reply(555, "5.5.4", text))
        return Answer(Reply(504, "5.5.4", str(exc)))
    return Answer(Reply(501, "5.5.4", str(exc)))


def read_data(arg: str) -> DataStart | Answer:
    if arg:
        return Answer(Reply(501, "5.5.4", "Syntax: DATA"))
    return DataStart(chunking=False)


def read_bdat(arg: str, config: SMTPServerConfig) -> tuple[int, bool] | Answer:
    """BDAT size [LAST] (RFC 3030 2): the chunk's size and whether it is the last."""
    if not config.chunking:
        return Answer(Reply(502, "5.5.1", "BDAT not available"))
    parts = arg.split(" ")
    size = parts[0]
    if (
        not 1 <= len(parts) <= 2
        or not (size.isascii() and size.isdigit())
        or len(size) > MAX_CHUNK_DIGITS
        or (len(parts) == 2 and parts[1].upper() != "LAST")
    ):
        # The chunk's length is unknown: nothing can be skipped.
        return Answer(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
    return int(size), len(parts) == 2


def read_vrfy(arg: str) -> Answer:
    if not arg:
        return Answer(Reply(501, "5.5.4", "Syntax: VRFY address"))
    # RFC 5321 3.5.3: 252 when the server will not verify.
    text = "Cannot VRFY user, but will accept message and attempt delivery"
    return Answer(Reply(252, "2.5.0", text), error=False)


def read_starttls(arg: str, config: SMTPServerConfig, tls: bool) -> StartTLS | Answer:
    if arg:
        return Answer(Reply(501, "5.5.4", "Syntax: STARTTLS"))  # RFC 3207 4
    if tls:
        return Answer(Reply(503, "5.5.1", "TLS already active"))
    if not config.starttls:
        return Answer(Reply(502, "5.5.1", "STARTTLS not available"))
    return StartTLS()


def read_auth(
    arg: str, config: SMTPServerConfig, tls: bool, authenticated: bool
) -> AuthStart | Answer:
    """AUTH mechanism [initial-response] (RFC 4954 4)."""
    if not config.auth_mechanisms:
        return Answer(Reply(502, "5.5.1", "AUTH not available"))
    if authenticated:
        return Answer(Reply(503, "5.5.1", "Already authenticated"))  # RFC 4954 4
    if not (tls or config.auth_plaintext):
        if config.starttls_offered(tls):
            text = "Must issue a STARTTLS command first"
            return Answer(Reply(530, "5.7.0", text), error=False)
        return Answer(Reply(502, "5.5.1", "AUTH not available without TLS"))
    parts = arg.split(" ")
    if not arg or len(parts) > 2:
        return Answer(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
    mechanism = parts[0].upper()
    if mechanism not in config.auth_mechanisms:
        return Answer(Reply(504, "5.5.4", "Unrecognized authentication type"))  # RFC 4954 4
    return AuthStart(mechanism, parts[1] if len(parts) == 2 else None)


# The replies that refuse content, by the problem found in it.
_BARE = "Message refused: bare <{}> received; lines end with <CR><LF>"
CONTENT_REPLIES: dict[str, Reply] = {
    lines.TOO_BIG: Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"),
    lines.BARE_LF: Reply(554, "5.5.2", _BARE.format("LF")),
    lines.BARE_CR: Reply(554, "5.5.2", _BARE.format("CR")),
    lines.LONG_LINE: Reply(
        554, "5.6.0", f"Message refused: a line is longer than {lines.MAX_MESSAGE_LINE} octets"
    ),
    HEADER_TOO_BIG: Reply(552, "5.3.4", "Message header section exceeds fixed maximum size"),
    TOO_MANY_FIELDS: Reply(554, "5.6.0", "Message refused: too many header fields"),
}


class DataContent(lines.DataReader):
    """DATA content: a lines.DataReader (fed what follows the 354, it gives the content
    without its dots until `done`) that also measures the header section, and
    says what refuses the message (`refusal`, None when it is good)."""

    __slots__ = ("_header",)

    def __init__(self, config: SMTPServerConfig, *, after_crlf: bool) -> None:
        super().__init__(
            bare_newline="reject" if config.bare_newline == "reject" else "normalize",
            max_line=lines.MAX_MESSAGE_LINE,
            max_size=config.max_message_size,
            after_crlf=after_crlf,
        )
        self._header = HeaderLimits(config.max_header_size, config.max_header_fields)

    def feed(self, data: bytes) -> bytes:
        content = lines.DataReader.feed(self, data)
        header = self._header
        if content and (header.done or header.feed(content) is None):
            return content
        return b""

    @property
    def refusal(self) -> Reply | None:
        problem = self.problem or self._header.problem
        return None if problem is None else CONTENT_REPLIES[problem]


class ChunkedContent:
    """BDAT content (RFC 3030), chunk by chunk: `size` counts it, `feed` and `admits`
    say whether the message must be refused (a reply) or may go on (None)."""

    __slots__ = ("_header", "_lines", "_max_size", "size")

    def __init__(self, config: SMTPServerConfig) -> None:
        self._header = HeaderLimits(config.max_header_size, config.max_header_fields)
        self._lines = lines.LineMeter(lines.MAX_MESSAGE_LINE)  # the DATA line rule
        self._max_size = config.max_message_size
        self.size = 0

    def admits(self, chunk_size: int) -> Reply | None:
        """Checked when a chunk is announced: the size it would bring the message to."""
        if self._max_size and self.size + chunk_size > self._max_size:
            return CONTENT_REPLIES[lines.TOO_BIG]
        return None

    def feed(self, data: bytes) -> Reply | None:
        self.size += len(data)
        if self._lines.feed(data):
            return CONTENT_REPLIES[lines.LONG_LINE]
        problem = None if self._header.done else self._header.feed(data)
        return None if problem is None else CONTENT_REPLIES[problem]
