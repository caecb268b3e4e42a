"""Connections for the user's mail tools: servers, TLS, logins, and failures said in words.

What `client.send` (SMTP submission) and `client.fetch` (POP3) share: their
`ServerOptions` (the server from "host:port", its TLS, the login, the trace),
the password (never from the command line), and the words for a connection,
a TLS handshake or a session that failed (`net.channel`'s failures): a
`ClientError` a person can read ("cannot connect to ...") with its exit status.
"""

from __future__ import annotations

import argparse
import getpass
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO, TypeVar

from postroom.config.values import parse_endpoint
from postroom.net.channel import (
    ConnectFailed,
    ConnectionFailure,
    ConnectTimedOut,
    PeerClosed,
    ProtocolError,
    ReplyTimedOut,
    SendFailed,
    SendTimedOut,
    SessionLost,
    TLSFailed,
    Trace,
    host_port,
)

# sysexits.h, as sendmail and msmtp use them.
EX_OK = 0
EX_USAGE = 2  # argparse's status; postroom uses it for every user-fixable error
EX_UNAVAILABLE = 69  # the server cannot be reached, refused us, or TLS/AUTH failed
EX_TEMPFAIL = 75  # try again later: a 4xx reply, a timeout, a lost connection

PASSWORD_ENV = "POSTROOM_PASSWORD"
DEFAULT_TIMEOUT = 120.0  # seconds for the connection and each reply


class ClientError(Exception):
    """A failure of a client tool, in one line a person can read.

    `kind` says what failed: "usage", "connect", "tls", "certificate",
    "auth", "refused", "protocol", "lost". `temporary` says whether trying
    again later may work.
    """

    def __init__(self, text: str, *, kind: str, temporary: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.kind = kind
        self.temporary = temporary

    @property
    def exit_code(self) -> int:
        if self.kind == "usage":
            return EX_USAGE
        return EX_TEMPFAIL if self.temporary else EX_UNAVAILABLE


ErrorT = TypeVar("ErrorT", bound=ClientError)


def parse_server(text: str) -> tuple[str, int | None]:
    """ "host:port", "[v6]:port", or a bare host (port None): the config's endpoint
    syntax (config.values.parse_endpoint), where port 0 is never a server's port."""
    endpoint = parse_endpoint(text, default_port=_NO_PORT)
    return endpoint.host, endpoint.port or None


_NO_PORT = 0  # what parse_endpoint gives a bare host here; an explicit ":0" is refused


# The words for a session that broke off, as send and fetch say them: (kind, text)
# with the failure's facts as str.format fields; each tool adds its protocol's refusals.
LOST_WORDS: dict[type[ConnectionFailure], tuple[str, str]] = {
    ReplyTimedOut: ("lost", "no {answer} from {where} within {timeout:g}s ({what})"),
    SendTimedOut: ("lost", "{where} stopped reading for {timeout:g}s"),
    PeerClosed: ("lost", "{where} closed the connection ({what})"),
    SendFailed: ("lost", "lost the connection with {where}: {detail}"),
    ProtocolError: ("protocol", "{where} broke the protocol: {detail}"),
}


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """Where a tool connects and how: the server, its TLS, the login, the trace."""

    # The tool's securities, each with its default port: "tls" is implicit TLS
    # (RFC 8314), the first the upgrade the server must offer; and the ports
    # where implicit TLS is the custom (postroom's loopback defaults among them).
    ports: ClassVar[dict[str, int]]
    implicit_tls_ports: ClassVar[frozenset[int]]

    host: str
    port: int
    security: str
    user: str
    password: str = field(repr=False)
    verify_cert: bool = True
    cafile: str | None = None  # CA certificates trusted besides the system's
    trace: Trace | None = None  # told every line of the conversation, credentials hidden
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.security not in self.ports:
            raise ClientError(f"security must be one of {', '.join(self.ports)}, "
                              f"not {self.security!r}", kind="usage")

    @classmethod
    def default_security(cls, port: int | None) -> str:
        return "tls" if port in cls.implicit_tls_ports else next(iter(cls.ports))

    @classmethod
    def from_args(cls, args: argparse.Namespace, stderr: TextIO) -> dict[str, Any]:
        """The options --server, --security and the connection options give (cli.mail)."""
        host, port = parse_server(args.server)
        security = args.security or cls.default_security(port)
        trace = (lambda line: print(line, file=stderr, flush=True)) if args.verbose else None
        return dict(host=host, port=cls.ports[security] if port is None else port,
                    security=security, verify_cert=not args.insecure, cafile=args.cafile,
                    trace=trace, timeout=args.timeout)

    @property
    def where(self) -> str:
        return host_port(self.host, self.port)

    def tls_context(self) -> ssl.SSLContext:
        """TLS 1.2 or newer, the system's CAs plus `cafile`, names checked unless not to."""
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996, RFC 9325 3.1.1
        if self.cafile:
            try:
                context.load_verify_locations(cafile=self.cafile)
            except (OSError, ssl.SSLError) as exc:
                raise ClientError(f"cannot load the CA file {self.cafile}: {exc}",
                                  kind="usage") from None
        if not self.verify_cert:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def error(self, failure: ConnectionFailure, error: type[ErrorT],
              words: Mapping[type, tuple[str, str]] = LOST_WORDS, **fields: str) -> ErrorT:
        """`failure` as `error`: connecting and TLS in this module's words, the rest in
        `words`. A broken session is temporary, a refusal when its reply is, the rest not.

        A session lost before the greeting on a STARTTLS port says the port may want
        TLS at once: a server waiting for a TLS handshake says nothing and gives up.
        """
        if isinstance(failure, ConnectFailed):
            return _connect_error(failure, self.where, error)
        if isinstance(failure, TLSFailed):
            return _tls_error(failure, self.where, error)
        kind, text = words[type(failure)]
        command = getattr(failure, "command", None)
        what = "waiting for nothing" if command is None else (
            "waiting for the greeting" if command == "greeting"
            else f"waiting for the answer to {command}")
        text = text.format_map({**vars(failure), "where": self.where, "what": what,
                                "answer": "reply", **fields})
        reply = getattr(failure, "reply", None)
        temporary = isinstance(failure, SessionLost) or (reply is not None and reply.is_transient)
        if kind == "lost" and command == "greeting" and self.security != "tls":
            text += "; if this port expects TLS from the start, use --security tls"
        return error(text, kind=kind, temporary=temporary)


def _connect_error(failure: ConnectFailed, where: str, error: type[ErrorT]) -> ErrorT:
    """No connection to `where`, in words (kind "connect"); a timeout is temporary."""
    if isinstance(failure, ConnectTimedOut):
        text = f"cannot connect to {where}: no answer within {failure.timeout:g}s"
        return error(text, kind="connect", temporary=True)
    return error(f"cannot connect to {where}: {failure.reason}", kind="connect")


def _tls_error(failure: TLSFailed, where: str, error: type[ErrorT]) -> ErrorT:
    """A failed TLS handshake with `where`, in words.

    A certificate that is not trusted is kind "certificate", any other
    handshake failure kind "tls".
    """
    exc = failure.error
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        text = f"TLS failure with {where}: its certificate is not trusted ({why})"
        return error(text, kind="certificate")
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "WRONG_VERSION_NUMBER":
            # The server spoke in plain text: its greeting where TLS was expected.
            return error(f"TLS failure with {where}: the server answered in plain text, not "
                         "TLS (is this a STARTTLS/STLS port?)", kind="tls")
        return error(f"TLS failure with {where}: {exc.reason or exc}", kind="tls")
    if isinstance(exc, TimeoutError):
        text = f"TLS failure with {where}: the handshake took longer than {failure.timeout:g}s"
        return error(text, kind="tls", temporary=True)
    text = f"TLS failure with {where}: the connection broke during the handshake ({exc})"
    return error(text, kind="tls", temporary=True)


def read_password(user: str, password_file: str | None) -> str:
    """The password from --password-file, else $POSTROOM_PASSWORD, else asked on the terminal.

    Never from a command-line argument, where other users see it (ps).
    """
    if password_file:
        with open(password_file, encoding="utf-8") as f:
            line = f.readline()
        password = line.rstrip("\r\n")
        if not password:
            raise ClientError(f"{password_file}: no password on its first line", kind="usage")
        return password
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    try:
        with open("/dev/tty"):
            pass
    except OSError:
        raise ClientError(f"no password: give --password-file FILE or set {PASSWORD_ENV} "
                          "(there is no terminal to ask on)", kind="usage") from None
    return getpass.getpass(f"Password for {user}: ")


def report(prog: str, exc: Exception, stderr: TextIO) -> int:
    """A tool's failure as one line on `stderr`; the exit status (2 unless a ClientError's).

    An untrusted certificate comes with how to get past it.
    """
    if isinstance(exc, ClientError):
        hint = " (trust it with --cafile FILE, or skip the check with --insecure)"
        print(f"{prog}: {exc.text}{hint if exc.kind == 'certificate' else ''}", file=stderr)
        return exc.exit_code
    where = getattr(exc, "filename", None)
    text = getattr(exc, "strerror", None) or str(exc)
    print(f"{prog}: {text}" + (f": {where}" if where else ""), file=stderr)
    return EX_USAGE
