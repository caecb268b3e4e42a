"""`postroom send`: build a message with the email package and submit it over TLS with SMTP AUTH.

`build_message` makes an RFC 5322 message (Date, Message-ID, MIME-Version,
encoded non-ASCII headers, base64 attachments). `submit` drives the SMTP
client core (`protocol.smtp_client`) on a connection of its own, the way a
mail user agent talks to its provider's submission port (RFC 6409): implicit
TLS (port 465, RFC 8314) or STARTTLS (port 587, RFC 3207), EHLO, AUTH PLAIN or
LOGIN (RFC 4954), then one transaction whose envelope comes from the headers
(To, Cc and Bcc; Bcc itself is never sent). `delivery.smtp_out.ClientSession`
is built for relaying (opportunistic TLS, no implicit TLS, no trace), so this
module drives the core itself, on the same connection channel (`net.Channel`).

Every failure is a `SendError` a person can read ("cannot connect to ...",
"TLS failure with ...", "authentication failed ..."), with the exit status
the command line returns. Connecting, TLS and the password come from
`client.connect`, shared with `client.fetch`.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import email.policy
import email.utils
import mimetypes
import secrets
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path
from typing import TextIO

from postroom.client.connect import (
    EX_OK,
    EX_USAGE,
    Channel,
    ClientError,
    Session,
    Trace,
    certificate_hint,
    connect,
    host_port,
    parse_server,
    read_password,
    start_tls,
    tls_context,
    tls_expected,
    waiting_for,
)
from postroom.protocol.replies import Reply
from postroom.protocol.sasl import LOGIN, PLAIN, ClientExchange, SASLError
from postroom.protocol.smtp_client import (
    NEED_DATA,
    ConnectionClosed,
    Extensions,
    RemoteProtocolError,
    Response,
    SMTPClient,
    path_problem,
)

EX_PARTIAL = 1  # some recipients were refused, the others accepted (sysexits: see connect)

SECURITIES = ("starttls", "tls")
DEFAULT_TIMEOUT = 120.0  # seconds for the connection and each reply
CHUNK_SIZE = 64 * 1024
# Ports where implicit TLS is the custom (RFC 8314 3.3 for submission; the
# 2xxx one is postroom's loopback default).
IMPLICIT_TLS_PORTS = frozenset({465, 2465})


class SendError(ClientError):
    """The message was not sent. `refused` maps each refused recipient to the reply."""

    def __init__(
        self,
        text: str,
        *,
        kind: str,
        temporary: bool = False,
        refused: dict[str, str] | None = None,
    ) -> None:
        super().__init__(text, kind=kind, temporary=temporary)
        self.refused = dict(refused or {})


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
    date: datetime.datetime | None = None,
    message_id: str | None = None,
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
    msg["Date"] = date or email.utils.localtime()
    msg["Message-ID"] = message_id or email.utils.make_msgid(
        domain=_message_id_domain(author.addr_spec)
    )
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


def _one_line(reply: Reply) -> str:
    return " ".join(str(reply).split("\n"))


def _text_of(reply: Reply) -> str:
    """A reply's text with its enhanced code, without the reply code: "2.0.0 Ok: queued"."""
    text = " ".join(reply.text.split("\n"))
    return f"{reply.enhanced} {text}" if reply.enhanced else text


def _ehlo_summary(reply: Reply) -> str:
    lines = reply.text.split("\n")
    keywords = ", ".join(line.strip() for line in lines[1:] if line.strip())
    return f"{reply.code} {lines[0]}" + (f" ({keywords})" if keywords else "")


class _Session(Session[SMTPClient]):
    """One submission session: the SMTP core's commands and replies, said in the trace."""

    error = SendError

    def __init__(self, channel: Channel, where: str, timeout: float, trace: Trace | None):
        super().__init__(channel, SMTPClient(), where, timeout, trace)

    async def reply(self, timeout: float | None = None) -> Response:
        """The next reply; a 421, EOF, timeout or protocol error raises SendError."""
        core = self.core
        what = waiting_for(core.pending)
        while True:
            try:
                event = core.next_event()
            except RemoteProtocolError as exc:
                raise self.lost(f"{self.where} broke the protocol: {exc}", "protocol") from None
            if event is NEED_DATA:
                try:
                    data = await self.channel.read(timeout or self.timeout)
                except TimeoutError:
                    text = f"no reply from {self.where} within {timeout or self.timeout:g}s"
                    raise self.lost(f"{text} ({what})") from None
                core.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                raise self.lost(f"{self.where} closed the connection ({what})")
            assert isinstance(event, Response)
            reply = event.reply
            self.trace("S: " + (_ehlo_summary(reply) if event.command == "EHLO"
                                else _one_line(reply)))
            if reply.code == 421:  # RFC 5321 3.8: the server is closing
                self.channel.abort()
                raise SendError(f"{self.where} is closing: {_one_line(reply)}",
                                kind="refused", temporary=True)
            return event

    async def command(self, shown: str, timeout: float | None = None) -> Response:
        self.trace(f"C: {shown}")
        await self.flush()
        return await self.reply(timeout)

    def refusal(self, what: str, response: Response, kind: str = "refused") -> SendError:
        reply = response.reply
        return SendError(f"{self.where} {what}: {_one_line(reply)}", kind=kind,
                         temporary=reply.is_transient)

    async def quit(self) -> None:
        """QUIT when the session is fit for it (the 221 is a courtesy), then close."""
        try:
            self.core.quit()
            await self.command("QUIT", timeout=min(self.timeout, 10.0))
        except Exception:  # the session is over either way
            pass
        finally:
            self.channel.close()

    async def hello(self, name: str) -> Extensions:
        self.core.ehlo(name)
        response = await self.command(f"EHLO {name}")
        if response.reply.code // 100 != 2:
            # RFC 6409 requires ESMTP: without EHLO there is no AUTH to log in with.
            raise self.refusal("refused EHLO", response)
        return self.core.extensions

    async def authenticate(self, user: str, password: str) -> None:
        offered = self.core.extensions.auth_mechanisms
        mechanism = next((m for m in (PLAIN, LOGIN) if m in offered), None)
        if mechanism is None:
            have = " ".join(offered) or "no AUTH at all"
            raise SendError(f"{self.where} offers no password login (AUTH PLAIN or LOGIN), "
                            f"only {have}", kind="auth")
        try:
            exchange = ClientExchange(mechanism, user, password)
        except ValueError as exc:
            raise SendError(f"unusable login: {exc}", kind="usage") from None
        self.core.auth(mechanism, exchange.initial_response())
        response = await self.command(f"AUTH {mechanism} (credentials hidden)")
        while response.reply.code == 334:
            try:
                self.core.auth_response(exchange.respond(response.reply.text))
            except SASLError:
                self.core.auth_response("*")  # RFC 4954 4: cancel
                await self.command("*")
                raise SendError(f"{self.where} sent an unusable SASL challenge",
                                kind="protocol") from None
            response = await self.command("(credentials hidden)")
        if response.reply.code // 100 != 2:
            raise self.refusal(f"refused the login of {user}", response, kind="auth")


def _hello_name(channel: Channel) -> str:
    """The address literal of our end (RFC 5321 4.1.3): always valid, names no host."""
    local = channel.get_extra_info("sockname")
    if not local:
        return "localhost"
    ip = str(local[0])
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def _check_paths(sender: str, recipients: list[str]) -> None:
    problem = path_problem(sender, reverse=True)
    if problem is not None:
        raise SendError(f"cannot send from <{sender}>: {problem}", kind="usage")
    for r in recipients:
        problem = path_problem(r)
        if problem is not None:
            raise SendError(f"cannot send to <{r}>: {problem}", kind="usage")


async def submit(
    message: EmailMessage,
    *,
    host: str,
    port: int,
    security: str,
    user: str,
    password: str,
    verify_cert: bool = True,
    cafile: str | None = None,
    trace: Trace | None = None,
    envelope_from: str | None = None,
    recipients: Sequence[str] | None = None,
    helo: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> SubmitResult:
    """Submit `message` to host:port; see the module docstring.

    `security` is "starttls" (RFC 3207; the server must offer it) or "tls"
    (implicit, RFC 8314). The login is never sent without TLS; an empty
    `user` skips AUTH. The envelope comes from the headers unless
    `envelope_from`/`recipients` say otherwise. Returns when at least one
    recipient was accepted and the message taken; raises SendError otherwise.
    """
    if security not in SECURITIES:
        raise SendError(f"security must be one of {', '.join(SECURITIES)}, not {security!r}",
                        kind="usage")
    sender, rcpts = envelope_of(message)
    if envelope_from is not None:
        sender = envelope_from
    if recipients is not None:
        rcpts = list(dict.fromkeys(recipients))
    _check_paths(sender, rcpts)
    utf8 = not all(a.isascii() for a in (sender, *rcpts))
    data = wire_bytes(message, utf8=utf8)
    context = tls_context(verify_cert=verify_cert, cafile=cafile)
    where = host_port(host, port)
    channel = await connect(host, port, timeout=timeout, error=SendError, trace=trace)
    session = _Session(channel, where, timeout, trace)
    try:
        if security == "tls":
            await start_tls(channel, context, host, port, timeout=timeout, error=SendError,
                            trace=trace)
        return await _transaction(session, context, host, port, security, user, password,
                                  helo or _hello_name(channel), sender, rcpts, data, utf8)
    except BaseException:
        channel.abort()
        raise


async def _transaction(
    session: _Session,
    context: ssl.SSLContext,
    host: str,
    port: int,
    security: str,
    user: str,
    password: str,
    helo: str,
    sender: str,
    rcpts: list[str],
    data: bytes,
    utf8: bool,
) -> SubmitResult:
    core = session.core
    try:
        greeting = await session.reply()
    except SendError as exc:
        if security != "starttls" or exc.kind != "lost":
            raise
        raise tls_expected(exc) from None
    if greeting.reply.code != 220:
        error = session.refusal("refused the session", greeting)
        await session.quit()  # RFC 5321 3.1: a 554 greeting still waits for QUIT
        raise error
    ext = await session.hello(helo)
    if security == "starttls":
        if not ext.starttls:
            await session.quit()
            raise SendError(f"{session.where} does not offer STARTTLS; not sending the "
                            "password without TLS (try --security tls?)", kind="tls")
        core.starttls()
        response = await session.command("STARTTLS")
        if response.reply.code != 220:
            error = session.refusal("refused STARTTLS", response, kind="tls")
            await session.quit()
            raise error
        leftover = session.channel.take()
        if leftover:
            core.receive_data(leftover)
            await session.reply()  # raises: data behind the 220 (RFC 3207 4.2)
        await start_tls(session.channel, context, host, port, timeout=session.timeout,
                        error=SendError, trace=session.trace)
        core.tls_started()
        ext = await session.hello(helo)  # RFC 3207 4.2: forget what came before TLS
    if user:
        await session.authenticate(user, password)
    notes: list[str] = []
    if utf8 and not ext.smtputf8:
        await session.quit()
        raise SendError(f"{session.where} does not support SMTPUTF8, which the non-ASCII "
                        "addresses need", kind="refused")
    limit = ext.size_limit
    if limit is not None and len(data) > limit:
        await session.quit()
        raise SendError(f"the message ({len(data)} octets) is larger than {session.where} "
                        f"accepts ({limit} octets)", kind="refused")
    body = None
    if not data.isascii():
        if ext.eightbitmime:
            body = "8BITMIME"
        else:
            notes.append("8-bit message sent to a server without 8BITMIME")
    core.mail(sender, size=len(data) if "SIZE" in ext else None, body=body, smtputf8=utf8)
    params = (f" SIZE={len(data)}" if "SIZE" in ext else "") + (f" BODY={body}" if body else "")
    mail = await session.command(f"MAIL FROM:<{sender}>{params}" + (" SMTPUTF8" if utf8 else ""))
    if mail.reply.code // 100 != 2:
        error = session.refusal(f"refused the sender <{sender}>", mail)
        await session.quit()
        raise error
    accepted: list[str] = []
    refused: dict[str, str] = {}
    for rcpt in rcpts:
        core.rcpt(rcpt)
        response = await session.command(f"RCPT TO:<{rcpt}>")
        if response.reply.code // 100 == 2:
            accepted.append(rcpt)
        else:
            refused[rcpt] = _one_line(response.reply)
    if not accepted:
        await session.quit()
        temporary = all(r.startswith("4") for r in refused.values())
        raise SendError(f"{session.where} refused every recipient", kind="refused",
                        temporary=temporary, refused=refused)
    core.data()
    response = await session.command("DATA")
    if response.reply.code != 354:
        error = session.refusal("refused DATA", response)
        await session.quit()
        raise error
    session.trace(f"C: ({len(data)} octets of message)")
    for start in range(0, len(data), CHUNK_SIZE):
        core.send_data(data[start : start + CHUNK_SIZE])
        await session.flush()
    core.end_data()
    # RFC 5321 4.5.3.2.6: the reply to the final dot may take ten minutes.
    final = await session.command(".", timeout=max(session.timeout, 600.0))
    if final.reply.code // 100 != 2:
        error = session.refusal("refused the message", final)
        await session.quit()
        raise error
    tls = session.channel.get_extra_info("ssl_object")
    result = SubmitResult(accepted, refused, _text_of(final.reply),
                          tls.version() if tls is not None else None, notes)
    await session.quit()
    return result


# --- The command line -----------------------------------------------------------------------


def default_security(port: int | None) -> str:
    return "tls" if port in IMPLICIT_TLS_PORTS else "starttls"


def _read_body(args: argparse.Namespace, stdin: TextIO, stderr: TextIO) -> str:
    if args.body is not None:
        return str(args.body)
    if args.body_file is not None and args.body_file != "-":
        return Path(args.body_file).read_text(encoding="utf-8")
    if stdin.isatty():
        print("(type the message; end it with Ctrl-D on a line of its own)", file=stderr)
    return stdin.read()


def command(
    args: argparse.Namespace,
    *,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    environ: dict[str, str] | None = None,
) -> int:
    """`postroom send` with the arguments cli.add_send defines; returns the exit status."""
    try:
        host, port = parse_server(args.server)
    except ValueError as exc:
        print(f"postroom send: {exc}", file=stderr)
        return EX_USAGE
    security = args.security or default_security(port)
    if port is None:
        port = 465 if security == "tls" else 587
    trace = (lambda line: print(line, file=stderr, flush=True)) if args.verbose else None
    try:
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
        password = read_password(user=user, password_file=args.password_file,
                                 stderr=stderr, environ=environ)
        result = asyncio.run(submit(
            message, host=host, port=port, security=security, user=user,
            password=password, verify_cert=not args.insecure, cafile=args.cafile,
            trace=trace, timeout=args.timeout,
        ))
    except ClientError as exc:
        for address, reply in getattr(exc, "refused", {}).items():
            print(f"postroom send: refused <{address}>: {reply}", file=stderr)
        print(f"postroom send: {exc.text}{certificate_hint(exc)}", file=stderr)
        return exc.exit_code
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        where = getattr(exc, "filename", None)
        text = getattr(exc, "strerror", None) or str(exc)
        print(f"postroom send: {text}" + (f": {where}" if where else ""), file=stderr)
        return EX_USAGE
    for address, reply in result.refused.items():
        print(f"postroom send: refused <{address}>: {reply}", file=stderr)
    for note in result.notes:
        print(f"postroom send: note: {note}", file=stderr)
    count = len(result.accepted)
    print(f"sent to {count} recipient{'s' if count != 1 else ''} over {result.tls}: "
          f"{result.reply}", file=stdout)
    return EX_PARTIAL if result.refused else EX_OK
