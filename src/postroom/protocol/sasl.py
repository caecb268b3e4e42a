"""SASL PLAIN and LOGIN exchanges as small state machines, server and client side.

The SMTP core hands the application `AuthStart(mechanism, initial_response)`
and `AuthResponse(data)` events carrying the client's base64 text as sent. A
`ServerExchange` turns them into either the next challenge (a 334 `Reply`) or
the `Credentials` to check; the application then answers with
`auth_succeeded(...)`, or with `AUTH_FAILED`. Client errors (bad base64, a
malformed PLAIN message) raise `SASLError` carrying the reply to send.

Only mechanisms that work with hashed passwords are here: PLAIN (RFC 4616),
the one RFC 4954 4 makes mandatory over TLS, and LOGIN (the widely deployed
draft-murchison-sasl-login), both of which send the password and so belong
behind TLS. Names are compared as given; preparing them (SASLprep, RFC 4013)
is left to the user directory.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Literal

from postroom.protocol.replies import Reply

PLAIN = "PLAIN"
LOGIN = "LOGIN"
SUPPORTED_MECHANISMS: tuple[str, ...] = (PLAIN, LOGIN)

# RFC 4954 6: the replies an application gives at the end of an exchange.
AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")

# RFC 4954 4: base64 without whitespace, padding only at the end.
_BASE64_RE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_LOGIN_USERNAME = b"Username:"
_LOGIN_PASSWORD = b"Password:"


class SASLError(Exception):
    """A client response that cannot be used; `reply` is what to answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a password mechanism yields: who logs in, with what, acting as whom.

    `authzid` is the identity the client asks to act as; "" means the same as
    `authcid` (RFC 4616 2). The password never shows in the repr.
    """

    authcid: str
    password: str = field(repr=False)
    authzid: str = ""


def decode_base64(text: str) -> bytes:
    """A client response as octets (RFC 4954 4): strict base64, "=" is empty.

    Raises SASLError with 501 5.5.2 for anything else, as RFC 4954 4 requires.
    """
    if text == "=":
        return b""
    if not _BASE64_RE.fullmatch(text):
        raise SASLError(Reply(501, "5.5.2", "Cannot decode the base64 response"))
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(Reply(501, "5.5.2", "Cannot decode the base64 response")) from None


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def challenge(data: bytes) -> Reply:
    """A 334 continuation carrying `data` (empty data gives the bare "334 ")."""
    return Reply(334, None, encode_base64(data))


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(Reply(501, "5.5.2", f"The {what} is not UTF-8 text")) from None


def _parse_plain(data: bytes) -> Credentials:
    # RFC 4616 2: message = [authzid] NUL authcid NUL passwd
    parts = data.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SASLError(Reply(501, "5.5.2", "Malformed PLAIN response"))
    authzid, authcid, password = (_text(p, "PLAIN response") for p in parts)
    return Credentials(authcid=authcid, password=password, authzid=authzid)


_ServerState = Literal["start", "plain", "username", "password", "done"]

# How a server exchange moves: (mechanism, state) -> state after the client's
# next piece of data. "start" reads the AUTH command's initial response (if
# any); "done" accepts nothing more.
_SERVER_STEPS: dict[tuple[str, _ServerState], _ServerState] = {
    (PLAIN, "start"): "done",
    (PLAIN, "plain"): "done",
    (LOGIN, "start"): "password",
    (LOGIN, "username"): "password",
    (LOGIN, "password"): "done",
}


class ServerExchange:
    """The server side of one SASL exchange.

    Create it on `AuthStart` (an unknown mechanism raises SASLError with
    504 5.5.4), call `start()` with the event's initial response, then
    `respond()` with each `AuthResponse`. Each returns the 334 challenge to
    send, or the `Credentials` once the client has given them.
    """

    __slots__ = ("_state", "_username", "mechanism")

    def __init__(self, mechanism: str) -> None:
        name = mechanism.upper()
        if name not in SUPPORTED_MECHANISMS:
            raise SASLError(Reply(504, "5.5.4", "Unrecognized authentication type"))
        self.mechanism = name
        self._state: _ServerState = "start"
        self._username = ""

    @property
    def done(self) -> bool:
        return self._state == "done"

    def start(self, initial_response: str | None) -> Reply | Credentials:
        if self._state != "start":
            raise ValueError("ServerExchange.start() called twice")
        if initial_response is None:
            # RFC 4422 5.1: the client starts; ask for its first data.
            if self.mechanism == PLAIN:
                self._state = "plain"
                return challenge(b"")
            self._state = "username"
            return challenge(_LOGIN_USERNAME)
        return self._step(initial_response)

    def respond(self, response: str) -> Reply | Credentials:
        if self._state in ("start", "done"):
            raise ValueError(f"ServerExchange.respond() in state {self._state}")
        return self._step(response)

    def _step(self, text: str) -> Reply | Credentials:
        data = decode_base64(text)
        state = self._state
        self._state = _SERVER_STEPS[(self.mechanism, state)]
        if self.mechanism == PLAIN:
            return _parse_plain(data)
        if state in ("start", "username"):
            self._username = _text(data, "user name")
            return challenge(_LOGIN_PASSWORD)
        return Credentials(authcid=self._username, password=_text(data, "password"))


class ClientExchange:
    """The client side: what to send for PLAIN or LOGIN.

    `initial_response()` gives the text to put on the AUTH line (None for
    LOGIN, which waits for the server's prompt); `respond(challenge)` gives
    the line answering each 334 challenge (its base64 text).
    """

    __slots__ = ("_authcid", "_authzid", "_password", "_sent", "mechanism")

    def __init__(self, mechanism: str, authcid: str, password: str, authzid: str = "") -> None:
        name = mechanism.upper()
        if name not in SUPPORTED_MECHANISMS:
            raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
        if "\0" in authcid + password + authzid:
            raise ValueError("SASL identities and passwords cannot contain NUL")
        self.mechanism = name
        self._authcid = authcid
        self._password = password
        self._authzid = authzid
        self._sent = 0  # client messages sent so far

    def _plain_message(self) -> str:
        fields = (self._authzid, self._authcid, self._password)
        return encode_base64("\0".join(fields).encode("utf-8"))

    def initial_response(self) -> str | None:
        if self.mechanism == PLAIN:
            self._sent = 1
            return self._plain_message()
        return None

    def respond(self, challenge_text: str) -> str:
        decode_base64(challenge_text or "=")  # a server that sends junk is refused
        self._sent += 1
        if self.mechanism == PLAIN:
            if self._sent != 1:
                raise SASLError(Reply(501, "5.7.0", "Unexpected PLAIN challenge"))
            return self._plain_message()
        if self._sent == 1:
            return encode_base64(self._authcid.encode("utf-8"))
        if self._sent == 2:
            return encode_base64(self._password.encode("utf-8"))
        raise SASLError(Reply(501, "5.7.0", "Unexpected LOGIN challenge"))
