"""`postroom send`: build a message with the email package and submit it over TLS with SMTP AUTH.

`build_message` makes an RFC 5322 message (Date, Message-ID, MIME-Version,
encoded non-ASCII headers, base64 attachments). `submit` sends it the way a
mail user agent talks to its provider's submission port (RFC 6409), on the
SMTP client connection the relay uses too (`net.smtp`): implicit TLS (port
465, RFC 8314) or STARTTLS (port 587, RFC 3207), EHLO, AUTH PLAIN or LOGIN
(RFC 4954), then one transaction in lockstep, every step in the trace, whose
envelope comes from the headers (To, Cc and Bcc; Bcc itself is never sent).

Every failure is a `SendError` a person can read, with the exit status the
command line returns; what send and fetch share is in `client.connect`.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import email.policy
import email.utils
import mimetypes
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path
from types import MappingProxyType
from typing import TextIO

from postroom.client.connect import (
    EX_OK,
    LOST_WORDS,
    ClientError,
    ServerOptions,
    read_password,
    report,
)
from postroom.net import smtp
from postroom.net.channel import ConnectionFailure
from postroom.net.smtp import Setup, SMTPConnection
from postroom.protocol.replies import Reply
from postroom.protocol.smtp_client import path_problem

EX_PARTIAL = 1  # some recipients were refused, the others accepted (sysexits: see connect)

DATA_END_TIMEOUT = 600.0  # RFC 5321 4.5.3.2.6: the reply to the final dot, 10 minutes
CHUNK_SIZE = 64 * 1024  # message octets per write


class SendError(ClientError):
    """The message was not sent. `refused` maps each refused recipient to the reply."""

    refused: Mapping[str, str] = MappingProxyType({})


@dataclass
class SubmitResult:
    """What the server said: who was accepted, who refused (address -> reply), and why."""

    accepted: list[str]
    refused: dict[str, str]  # "550 5.1.1 <x@y>: Recipient address rejected ..."
    reply: str  # the final 250 text, e.g. "2.0.0 Ok: queued as 4F3A..."
    tls: str | None  # e.g. "TLSv1.3"
    notes: list[str] = field(default_factory=list)


# --- Building the message ---------------------------------------------------------------


def parse_address(text: str, what: str = "address") -> Address:
    """ "Name <user@host>" or "user@host" as an Address; ValueError if it is neither."""
    name, addr = email.utils.parseaddr(text)
    if not addr or "@" not in addr or any(c in addr for c in " \t\r\n<>"):
        raise ValueError(f"not an e-mail {what}: {text!r}")
    try:
        return Address(display_name=name, addr_spec=addr)
    except (ValueError, IndexError) as exc:
        local, _, domain = addr.rpartition("@")
        if addr.isascii() or not local or not domain:
            raise ValueError(f"not an e-mail {what}: {text!r} ({exc})") from None
    # A non-ASCII mailbox (RFC 6532): the parser refuses it, the parts are taken
    # as given; only an SMTPUTF8 session can carry it (see `submit`).
    return Address(display_name=name, username=local, domain=domain)


def _message_id_domain(address: str) -> str:
    domain = address.rpartition("@")[2].strip("[]") or "localhost"
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "localhost"


def _text_cte(body: str) -> str:
    """7bit for ASCII within RFC 5322 2.1.1's 998 octets, else quoted-printable.

    Never 8bit: the message must pass servers without 8BITMIME (RFC 6152) as is.
    """
    if body.isascii() and all(len(line) <= 998 for line in body.splitlines()):
        return "7bit"
    return "quoted-printable"


def build_message(
    *,
    sender: str,
    to: Sequence[str],
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
    subject: str,
    body: str,
    attachments: Iterable[Path] = (),
    sender_name: str | None = None,
) -> EmailMessage:
    """A message ready for `submit` (which strips Bcc and takes the envelope from it).

    Addresses may carry a display name ("Boss <boss@corp.example>"). Non-ASCII
    subjects, names and file names are encoded when the message is written
    (RFC 2047, RFC 2231). Attachments are read whole, typed by their name
    (mimetypes) and sent base64; message/* files go as application/octet-stream,
    since RFC 2046 5.2.1 forbids base64 for those types.
    """
    msg = EmailMessage(policy=email.policy.default)
    author = parse_address(sender, "sender")
    if sender_name is not None:
        author = Address(display_name=sender_name, addr_spec=author.addr_spec)
    msg["From"] = author
    for header, values in (("To", to), ("Cc", cc), ("Bcc", bcc)):
        if values:
            msg[header] = [parse_address(v, "recipient") for v in values]
    msg["Subject"] = subject
    msg["Date"] = email.utils.localtime()
    msg["Message-ID"] = email.utils.make_msgid(domain=_message_id_domain(author.addr_spec))
    msg.set_content(body, cte=_text_cte(body))
    for path in attachments:
        path = Path(path)
        data = path.read_bytes()
        ctype, encoding = mimetypes.guess_type(path.name)
        if ctype is None or encoding is not None or ctype.startswith("message/"):
            ctype = "application/octet-stream"  # a .gz is its own type, not its content's
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=path.name)
    if msg.is_multipart():
        # Chosen now, not when the message is written, so every copy is the same
        # bytes. "=_" cannot occur in base64 or quoted-printable text (RFC 2045
        # 6.7, 6.8), and the random part not in the 7bit text.
        msg.set_boundary(f"=_postroom_{secrets.token_hex(16)}")
    return msg


def _addresses(message: EmailMessage, *headers: str) -> list[str]:
    values = [str(v) for h in headers for v in message.get_all(h, [])]
    return [addr for _name, addr in email.utils.getaddresses(values) if addr]


def envelope_of(message: EmailMessage) -> tuple[str, list[str]]:
    """(reverse-path, forward-paths) from the headers, as sendmail -t takes them.

    The sender is the Sender header's address, else the (first) From address;
    the recipients are To, Cc and Bcc, each once.
    """
    senders = _addresses(message, "Sender") or _addresses(message, "From")
    if not senders:
        raise SendError("the message has no From address", kind="usage")
    recipients = list(dict.fromkeys(_addresses(message, "To", "Cc", "Bcc")))
    if not recipients:
        raise SendError("the message has no recipients (To, Cc or Bcc)", kind="usage")
    return senders[0], recipients


def wire_bytes(message: EmailMessage, *, utf8: bool = False) -> bytes:
    """The message as sent: Bcc removed (RFC 5322 3.6.3), CRLF line ends.

    With `utf8` (an SMTPUTF8 session, RFC 6532) headers stay UTF-8; otherwise
    non-ASCII header text is RFC 2047 encoded.
    """
    sent = copy.deepcopy(message)
    del sent["Bcc"]
    del sent["Resent-Bcc"]
    return sent.as_bytes(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)


# --- The SMTP session -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SubmitOptions(ServerOptions):
    """Where and how `submit` sends: the server, its TLS, the login ("" user: no AUTH),
    and the envelope."""

    # STARTTLS (RFC 3207; the server must offer it) on 587, implicit TLS on 465
    # (RFC 8314 3.3); 2465 is postroom's loopback default.
    ports = {"starttls": 587, "tls": 465}
    implicit_tls_ports = frozenset({465, 2465})

    helo: str | None = None  # default: the address literal of our end


def _check_paths(sender: str, recipients: list[str]) -> None:
    for path, way, reverse in [(sender, "from", True), *((r, "to", False) for r in recipients)]:
        problem = path_problem(path, reverse=reverse)
        if problem is not None:
            raise SendError(f"cannot send {way} <{path}>: {problem}", kind="usage")


async def submit(message: EmailMessage, options: SubmitOptions) -> SubmitResult:
    """Submit `message` as `options` say; see the module docstring.

    Returns when at least one recipient was accepted and the message taken;
    raises SendError otherwise.
    """
    sender, rcpts = envelope_of(message)
    _check_paths(sender, rcpts)
    utf8 = not all(a.isascii() for a in (sender, *rcpts))
    data = wire_bytes(message, utf8=utf8)
    timeout = options.timeout
    login = (options.user, options.password) if options.user else None
    setup = Setup(tls="implicit" if options.security == "tls" else "required",
                  tls_context=options.tls_context(), helo=options.helo, login=login,
                  connect_timeout=timeout, greeting_timeout=timeout, command_timeout=timeout,
                  trace=options.trace)
    connection = None
    try:
        connection = await SMTPConnection.open(options.host, options.port, setup)
        return await _Submission(connection, options.where, timeout).run(sender, rcpts, data,
                                                                         utf8)
    except SendError:
        assert connection is not None
        await connection.quit()  # refused: the session ends politely
        raise
    except ConnectionFailure as failure:
        raise options.error(failure, SendError, _WORDS, user=options.user) from None
    except BaseException:
        if connection is not None:
            connection.close(abort=True)
        raise


# send's words for the refusals of the session set-up: (kind, text), the failure's
# facts as fields (see client.connect.ServerOptions.error).
_WORDS: dict[type[ConnectionFailure], tuple[str, str]] = {
    **LOST_WORDS,
    smtp.ServerClosing: ("refused", "{where} is closing: {reply}"),
    smtp.GreetingRefused: ("refused", "{where} refused the session: {reply}"),
    smtp.HelloRefused: ("refused", "{where} refused {command}: {reply}"),
    smtp.StartTLSRefused: ("tls", "{where} refused STARTTLS: {reply}"),
    smtp.TLSNotOffered: ("tls", "{where} does not offer STARTTLS; not sending the password "
                                "without TLS (try --security tls?)"),
    smtp.AuthNeedsTLS: ("tls", "not sending the password to {where} without TLS"),
    smtp.AuthRefused: ("auth", "{where} refused the login of {user}: {reply}"),
    smtp.NoAuthMechanism: ("auth", "{where} offers no password login (AUTH PLAIN or LOGIN), "
                                   "only {offered}"),
    smtp.UnusableLogin: ("usage", "unusable login: {detail}"),
    smtp.BadChallenge: ("protocol", "{where} sent an unusable SASL challenge"),
}


class _Submission:
    """One transaction on a ready connection, in lockstep, each step in the trace."""

    def __init__(self, connection: SMTPConnection, where: str, timeout: float) -> None:
        self.connection = connection
        self.core = connection.core
        self.where = where
        self.timeout = timeout

    async def run(self, sender: str, rcpts: list[str], data: bytes, utf8: bool
                  ) -> SubmitResult:
        notes: list[str] = []
        await self._mail(sender, data, utf8, notes)
        accepted, refused = await self._recipients(rcpts)
        final = await self._data(data)
        text = " ".join(final.text.split("\n"))  # without the code: "2.0.0 Ok: queued as ..."
        said = f"{final.enhanced} {text}" if final.enhanced else text
        result = SubmitResult(accepted, refused, said, self.connection.tls_version, notes)
        await self.connection.quit()
        return result

    async def _mail(self, sender: str, data: bytes, utf8: bool, notes: list[str]) -> None:
        """MAIL FROM, once the server can take the message: SMTPUTF8, SIZE, 8BITMIME."""
        ext = self.connection.extensions
        if utf8 and not ext.smtputf8:
            raise SendError(f"{self.where} does not support SMTPUTF8, which the non-ASCII "
                            "addresses need", kind="refused")
        limit = ext.size_limit
        if limit is not None and len(data) > limit:
            raise SendError(f"the message ({len(data)} octets) is larger than {self.where} "
                            f"accepts ({limit} octets)", kind="refused")
        body = None
        if not data.isascii():
            if ext.eightbitmime:
                body = "8BITMIME"
            else:
                notes.append("8-bit message sent to a server without 8BITMIME")
        size = len(data) if "SIZE" in ext else None
        self.core.mail(sender, size=size, body=body, smtputf8=utf8)
        params = (f" SIZE={size}" if size is not None else "") + (f" BODY={body}" if body else "")
        shown = f"MAIL FROM:<{sender}>{params}" + (" SMTPUTF8" if utf8 else "")
        mail = await self.connection.command(shown, self.timeout)
        if mail.reply.code // 100 != 2:
            raise self._refused(f"refused the sender <{sender}>", mail.reply)

    async def _recipients(self, rcpts: list[str]) -> tuple[list[str], dict[str, str]]:
        """RCPT TO for each: (accepted, refused address -> reply); SendError if none is taken."""
        accepted: list[str] = []
        refused: dict[str, str] = {}
        for rcpt in rcpts:
            self.core.rcpt(rcpt)
            response = await self.connection.command(f"RCPT TO:<{rcpt}>", self.timeout)
            if response.reply.code // 100 == 2:
                accepted.append(rcpt)
            else:
                refused[rcpt] = str(response.reply)
        if not accepted:
            temporary = all(r.startswith("4") for r in refused.values())
            error = SendError(f"{self.where} refused every recipient", kind="refused",
                              temporary=temporary)
            error.refused = refused
            raise error
        return accepted, refused

    async def _data(self, data: bytes) -> Reply:
        """DATA, the message, and the reply to the final dot, which must be 2xx."""
        connection = self.connection
        self.core.data()
        response = await connection.command("DATA", self.timeout)
        if response.reply.code != 354:
            raise self._refused("refused DATA", response.reply)
        connection.trace(f"C: ({len(data)} octets of message)")
        for start in range(0, len(data), CHUNK_SIZE):
            self.core.send_data(data[start : start + CHUNK_SIZE])
            await connection.flush(self.timeout)
        self.core.end_data()
        final = await connection.command(".", max(self.timeout, DATA_END_TIMEOUT))
        if final.reply.code // 100 != 2:
            raise self._refused("refused the message", final.reply)
        return final.reply

    def _refused(self, what: str, reply: Reply) -> SendError:
        """The error that says the server refused `what` with `reply`."""
        return SendError(f"{self.where} {what}: {reply}", kind="refused",
                         temporary=reply.is_transient)


# --- The command line -----------------------------------------------------------------------


def _read_body(args: argparse.Namespace, stdin: TextIO, stderr: TextIO) -> str:
    if args.body is not None:
        return str(args.body)
    if args.body_file is not None and args.body_file != "-":
        return Path(args.body_file).read_text(encoding="utf-8")
    if stdin.isatty():
        print("(type the message; end it with Ctrl-D on a line of its own)", file=stderr)
    return stdin.read()


def command(args: argparse.Namespace, *, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """`postroom send` with the arguments cli.add_send defines; returns the exit status."""
    try:
        server = SubmitOptions.from_args(args, stderr)
        author = parse_address(args.sender, "sender")
        message = build_message(
            sender=author.addr_spec,
            sender_name=args.name if args.name is not None else (author.display_name or None),
            to=args.to or [],
            cc=args.cc or [],
            bcc=args.bcc or [],
            subject=args.subject or "",
            body=_read_body(args, stdin, stderr),
            attachments=[Path(p) for p in args.attach or []],
        )
        envelope_of(message)  # no recipients: say so before asking for a password
        user = args.user or author.addr_spec
        password = read_password(user, args.password_file)
        options = SubmitOptions(**server, user=user, password=password)
        result = asyncio.run(submit(message, options))
    except (ClientError, OSError, UnicodeDecodeError, ValueError) as exc:
        for address, reply in getattr(exc, "refused", {}).items():
            print(f"postroom send: refused <{address}>: {reply}", file=stderr)
        return report("postroom send", exc, stderr)
    for address, reply in result.refused.items():
        print(f"postroom send: refused <{address}>: {reply}", file=stderr)
    for note in result.notes:
        print(f"postroom send: note: {note}", file=stderr)
    count = len(result.accepted)
    print(f"sent to {count} recipient{'s' if count != 1 else ''} over {result.tls}: "
          f"{result.reply}", file=stdout)
    return EX_PARTIAL if result.refused else EX_OK
