"""The relay's one failure type, SMTPError, and its words for net.smtp's failures.

`relay_error` turns a `net.ConnectionFailure` into an SMTPError: a text in
Postfix's style ("host mx[192.0.2.1]:25 said: ... (in reply to MAIL FROM
command)") that goes into logs and DSNs, and an RFC 3463 status: X.4.1 no
answer from the host, X.4.2 a bad connection, X.5.0 a protocol error, X.7.x
TLS and AUTH trouble, or the status the server's own reply gives.
"""

from __future__ import annotations

import re

from postroom.net.channel import ConnectFailed, ConnectionFailure, TLSFailed
from postroom.net.smtp import (
    AuthNeedsTLS,
    AuthRefused,
    BadChallenge,
    ConnectionLost,
    NoAuthMechanism,
    ProtocolError,
    Refused,
    StartTLSRefused,
    TimedOut,
    TLSNotOffered,
    UnusableLogin,
)
from postroom.protocol.replies import Reply
from postroom.protocol.smtp_client import END_DATA, GREETING, MAIL, RCPT


class SMTPError(Exception):
    """The session failed, or the message cannot go to this hop at all.

    `temporary` says whether trying again later may work (the class of the
    server's reply when there is one). `reply` is the server's reply that
    caused it, if any; `status` the RFC 3463 code for a DSN; `text` says what
    happened, Postfix-style ("host mx[192.0.2.1]:25 said: ... (in reply to
    MAIL FROM command)").
    """

    def __init__(
        self,
        text: str,
        *,
        temporary: bool,
        reply: Reply | None = None,
        status: str | None = None,
    ) -> None:
        super().__init__(text)
        self.text = text
        self.temporary = temporary
        self.reply = reply
        if status is None and reply is not None:
            status = status_of(reply)
        self.status = status or ("4.0.0" if temporary else "5.0.0")


_TEXT_STATUS_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")  # RFC 3463 2


def status_of(reply: Reply) -> str:
    """The RFC 3463 status a reply gives for a DSN.

    Its enhanced code; else one written at the start of its text by a server
    that did not offer ENHANCEDSTATUSCODES (many do), when its class fits the
    reply code; else the reply class's x.0.0.
    """
    if reply.enhanced:
        return reply.enhanced
    m = _TEXT_STATUS_RE.match(reply.text)
    klass = str(reply.code)[0]
    if m is not None and m.group(1) == klass:
        return m.group(0).rstrip(" ")
    return f"{klass}.0.0" if klass in "245" else "4.0.0"  # 3xx has no status class


def command_label(command: str | None) -> str:
    """A command as Postfix names it in "(in reply to ...)"."""
    if command is None:
        return "no command"
    names = {
        GREETING: "initial greeting",
        MAIL: "MAIL FROM command",
        RCPT: "RCPT TO command",
        END_DATA: "end of DATA command",
        "AUTH response": "AUTH command",
    }
    return names.get(command, f"{command} command")


def relay_error(failure: ConnectionFailure, peer: str) -> SMTPError:
    """A failure of the connection in the relay's words: Postfix-style text, RFC 3463 status.

    A refusal keeps the server's reply, whose class says whether it is
    temporary, except a refused login: like Postfix's smtp_sasl_auth_soft_bounce,
    mail waits for a person to fix it rather than bounce. All else is temporary.
    """
    if isinstance(failure, AuthRefused):
        reply = failure.reply
        text = f"SASL authentication failed with {peer}: {reply}"
        return SMTPError(text, temporary=True, reply=reply, status=reply.enhanced or "4.7.0")
    if isinstance(failure, Refused):
        reply = failure.reply
        text = f"host {peer} said: {reply} (in reply to {command_label(failure.command)})"
        status = "4.7.4" if isinstance(failure, StartTLSRefused) else None
        return SMTPError(text, temporary=reply.code < 500, reply=reply, status=status)
    status, text = _failure_words(failure, peer)
    return SMTPError(text, temporary=True, status=status)


def _failure_words(failure: ConnectionFailure, peer: str) -> tuple[str, str]:
    """(RFC 3463 status, text) for a failure that is not a refusal."""
    what = command_label(getattr(failure, "command", None))
    if isinstance(failure, ConnectFailed):
        why = failure.reason if failure.timeout is None else f"timed out after {failure.timeout:g}s"
        return "4.4.1", f"connect to {peer}: {why}"
    if isinstance(failure, TimedOut):
        if failure.sending:
            return "4.4.2", f"timed out after {failure.timeout:g}s sending to {peer}"
        return "4.4.2", f"timed out after {failure.timeout:g}s waiting for {peer} ({what})"
    if isinstance(failure, ConnectionLost):
        if failure.error is not None:
            return "4.4.2", f"lost connection with {peer} while sending: {failure.error}"
        return "4.4.2", f"lost connection with {peer} (waiting for {what})"
    if isinstance(failure, ProtocolError):
        return "4.5.0", f"protocol error with {peer} (after {what}): {failure}"
    if isinstance(failure, TLSFailed):
        why = str(failure.error) or type(failure.error).__name__
        return "4.7.5", f"cannot start TLS with {peer}: {why}"
    if isinstance(failure, TLSNotOffered):
        return "4.7.4", f"TLS is required, but was not offered by host {peer}"
    if isinstance(failure, AuthNeedsTLS):
        return "4.7.10", f"not sending the login for {peer} without TLS"
    if isinstance(failure, NoAuthMechanism):
        offered = " ".join(failure.offered) or "no AUTH"
        text = f"host {peer} offers no SASL mechanism postroom has (PLAIN, LOGIN): {offered}"
        return "4.7.0", text
    if isinstance(failure, UnusableLogin):
        return "4.7.0", f"unusable login for {peer}: {failure.detail}"
    assert isinstance(failure, BadChallenge), f"no words for {failure!r}"
    return "4.7.0", f"host {peer} sent an unusable SASL challenge: {failure.reply}"
