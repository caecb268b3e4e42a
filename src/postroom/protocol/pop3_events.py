"""The events of the POP3 server core: what `POP3Server.next_event` returns.

Each event is a frozen value; those marked "answer" pause the core until the
application calls the method named. `NEED_DATA` and `PAUSED` (from `_core`) are
the two results that are not events.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class User:
    """USER name (RFC 1939 7). Answer: ok() to ask for PASS, or err()."""

    name: str


@dataclass(frozen=True, slots=True)
class Pass:
    """PASS after an accepted USER (RFC 1939 7). Answer: login_succeeded() or err()."""

    name: str
    password: str


@dataclass(frozen=True, slots=True)
class Apop:
    """APOP name digest (RFC 1939 7); digest is 32 lower-case hex digits of
    MD5(timestamp + secret). Answer: login_succeeded() or err()."""

    name: str
    digest: str


@dataclass(frozen=True, slots=True)
class AuthStart:
    """AUTH mechanism [initial-response] (RFC 5034 4); the response is decoded, None if
    absent. Answer: auth_challenge(), login_succeeded() or err()."""

    mechanism: str
    initial_response: bytes | None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A decoded response line inside AUTH. Answer: auth_challenge(), login_succeeded()
    or err()."""

    data: bytes


@dataclass(frozen=True, slots=True)
class AuthCancelled:
    """The AUTH exchange ended without login (the client sent "*" or bad base64); the
    core has already replied -ERR. No answer."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STLS (RFC 2595 4). Answer: ok() (then flush, handshake, tls_started()) or err()."""


@dataclass(frozen=True, slots=True)
class Retrieve:
    """RETR n. Answer: send_message_chunk()... end_message(), send_message(), or err()."""

    msg_number: int
    uid: str


@dataclass(frozen=True, slots=True)
class Top:
    """TOP n lines (RFC 1939 7). Answer as for Retrieve with the whole message: the core
    keeps the headers, the blank line and `lines` body lines."""

    msg_number: int
    uid: str
    lines: int


@dataclass(frozen=True, slots=True)
class Update:
    """QUIT in TRANSACTION (RFC 1939 6): remove these (number, uid) messages, then
    answer update_done()."""

    deleted: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The session is over; next_event keeps returning this. `reason` is one of "quit",
    "eof", "timeout", "errors" (too many, or an app err(close=True)), "refused"."""

    reason: str


Event = (
    User | Pass | Apop | AuthStart | AuthResponse | AuthCancelled | StartTLS | Retrieve | Top
    | Update | ConnectionClosed
)
