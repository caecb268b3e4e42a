"""The events of the SMTP server core: what `SMTPServer.next_event` returns.

Each event is a frozen value; `needs_reply` says (on the class and on each
instance) whether the core waits for the application's answer before it reads
on. `NEED_DATA` and `PAUSED` (from `_core`) are the two results that are not events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from postroom.protocol.replies import Reply


class _UnlessChunking:
    """DataStart's `needs_reply`: DATA waits for the app's 354; BDAT's data is already
    on its way."""

    def __get__(self, obj: DataStart | None, owner: object = None) -> bool:
        return obj is None or not obj.chunking


class Event:
    """Base of the events `next_event` returns."""

    __slots__ = ()
    needs_reply: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """HELO or EHLO. A 2xx answer to EHLO gets the extension lines appended."""

    needs_reply: ClassVar[bool] = True
    command: str
    domain: str


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    """MAIL FROM, syntax and parameters checked. `address` "" is the null path.

    `auth` is the decoded AUTH= parameter, or "<>" when the client gave one
    without being authenticated (RFC 4954 5). `route` holds the domains of a
    source route the client gave (dropped from `address`, RFC 5321 4.1.1.3).
    """

    needs_reply: ClassVar[bool] = True
    address: str
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None
    route: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    """RCPT TO. `orcpt` is "addr-type;decoded-address" (RFC 3461 4.2)."""

    needs_reply: ClassVar[bool] = True
    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    route: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DataStart(Event):
    """DATA (needs a 354 to go on) or the first BDAT of a transaction (no reply)."""

    needs_reply: ClassVar[_UnlessChunking] = _UnlessChunking()
    chunking: bool = False


@dataclass(frozen=True, slots=True)
class MessageData(Event):
    """Message content: dot-unstuffed (DATA) or raw (BDAT), CRLF line ends kept."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd(Event):
    """The whole message arrived; answer 250 once it is stored, or an error.

    `size` is the content's octet count (RFC 1870: after removing dots).
    """

    needs_reply: ClassVar[bool] = True
    size: int = 0


@dataclass(frozen=True, slots=True)
class MessageAborted(Event):
    """The message is void: discard whatever was stored of it.

    `reply` says why. When the core refused the message (size, bare line
    ends, long lines) or ended the session, it has queued that reply; when
    the client abandoned the message (RSET, HELO/EHLO, QUIT, EOF) the reply
    only describes what happened.
    """

    reply: Reply


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """STARTTLS; answer 220 and start the handshake, then call tls_started()."""

    needs_reply: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class AuthStart(Event):
    """AUTH; `initial_response` is the base64 text as sent ("=" means empty)."""

    needs_reply: ClassVar[bool] = True
    mechanism: str
    initial_response: str | None = None


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """A line of the SASL exchange (base64 text as sent)."""

    needs_reply: ClassVar[bool] = True
    data: str


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """The transaction was dropped (RSET, or HELO/EHLO inside a transaction)."""


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """QUIT: the core queued 221 and is closing."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The client closed the connection, or the session is over."""

