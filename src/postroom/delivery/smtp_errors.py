"""The relay's one failure type, SMTPError, and its words for net's failures.

`relay_error` turns a `net.ConnectionFailure` into an SMTPError: a text in
Postfix's style ("host mx[192.0.2.1]:25 said: ... (in reply to MAIL FROM
command)") that goes into logs and DSNs, and an RFC 3463 status.
"""

from __future__ import annotations

import re

from postroom.net import channel, smtp
from postroom.net.channel import ConnectFailed, ConnectionFailure, ConnectTimedOut, TLSFailed
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
    names = {
        None: "no command",
        GREETING: "initial greeting",
        MAIL: "MAIL FROM command",
        RCPT: "RCPT TO command",
        END_DATA: "end of DATA command",
        "AUTH response": "AUTH command",
    }
    return names.get(command, f"{command} command")


# The relay's words for each failure of the connection, Postfix-style (as logs and DSNs
# carry them; fields from the failure's facts), and its RFC 3463 status: X.4.1 no answer
# from the host, X.4.2 a bad connection, X.5.0 a protocol error, X.7.x TLS and AUTH
# trouble; None: the status the server's own reply gives.
_WORDS: dict[type[ConnectionFailure], tuple[str | None, str]] = {
    ConnectFailed: ("4.4.1", "connect to {peer}: {reason}"),
    ConnectTimedOut: ("4.4.1", "connect to {peer}: timed out after {timeout:g}s"),
    TLSFailed: ("4.7.5", "cannot start TLS with {peer}: {error}"),
    smtp.TLSNotOffered: ("4.7.4", "TLS is required, but was not offered by host {peer}"),
    channel.ReplyTimedOut: ("4.4.2", "timed out after {timeout:g}s waiting for {peer} ({what})"),
    channel.SendTimedOut: ("4.4.2", "timed out after {timeout:g}s sending to {peer}"),
    channel.PeerClosed: ("4.4.2", "lost connection with {peer} (waiting for {what})"),
    channel.SendFailed: ("4.4.2", "lost connection with {peer} while sending: {detail}"),
    channel.ProtocolError: ("4.5.0", "protocol error with {peer} (after {what}): {detail}"),
    smtp.AuthNeedsTLS: ("4.7.10", "not sending the login for {peer} without TLS"),
    smtp.NoAuthMechanism: (
        "4.7.0", "host {peer} offers no SASL mechanism postroom has (PLAIN, LOGIN): {offered}"),
    smtp.UnusableLogin: ("4.7.0", "unusable login for {peer}: {detail}"),
    smtp.BadChallenge: ("4.7.0", "host {peer} sent an unusable SASL challenge: {reply}"),
    smtp.AuthRefused: (None, "SASL authentication failed with {peer}: {reply}"),
    smtp.StartTLSRefused: ("4.7.4", "host {peer} said: {reply} (in reply to {what})"),
    smtp.Refused: (None, "host {peer} said: {reply} (in reply to {what})"),
}


def relay_error(failure: ConnectionFailure, peer: str) -> SMTPError:
    """A failure of the connection in the relay's words (see _WORDS).

    A refusal keeps the server's reply, whose class says whether it is
    temporary, except a refused login: like Postfix's smtp_sasl_auth_soft_bounce,
    mail waits for a person to fix it rather than bounce. All else is temporary.
    """
    status, words = next(_WORDS[kind] for kind in type(failure).__mro__ if kind in _WORDS)
    what = command_label(getattr(failure, "command", None))
    text = words.format_map({**vars(failure), "peer": peer, "what": what})
    if not isinstance(failure, smtp.Refused):
        return SMTPError(text, temporary=True, status=status)
    reply = failure.reply
    if isinstance(failure, smtp.AuthRefused):
        return SMTPError(text, temporary=True, reply=reply, status=reply.enhanced or "4.7.0")
    return SMTPError(text, temporary=reply.code < 500, reply=reply, status=status)
