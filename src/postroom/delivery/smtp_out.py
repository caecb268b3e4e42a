"""One SMTP session to one next hop, on asyncio: the relay's mail transactions over net.smtp.

`ClientSession.connect` gets a session ready with `net.smtp.SMTPConnection`,
which the relay shares with `postroom send` (greeting, EHLO or HELO, STARTTLS
as the hop's `tls` says, AUTH when the hop has a login: see there);
`smtp_errors.relay_error` words its failures for the relay.

`send` runs one mail transaction and returns every recipient's own reply: MAIL,
RCPTs and DATA go in one write when the server offers PIPELINING (RFC 2920
3.1), one by one otherwise; the message is read from its stream in chunks and
dot-stuffed on the way (never whole in memory), its lines over 998 octets
folded or broken as Postfix's smtp_line_length_limit does (RFC 5321
4.5.3.1.6; see protocol.folding.LineFolder). A server that offers CHUNKING
too gets the message with BDAT (RFC 3030), its first chunk in the same write
as MAIL and RCPT: one round trip for a small message. A session may send several
messages. What the hop cannot take is refused before anything is sent: a
message over its SIZE (RFC 1870 6.1, 5.3.4) or one that needs SMTPUTF8 from a
hop without it (RFC 6531 3.2, 5.6.7): one with a UTF-8 address, or a UTF-8
header field when the client asked for SMTPUTF8 (as Postfix decides). An
8-bit message goes as BODY=8BITMIME when the hop offers it and as it is
otherwise, as Postfix does (noted in the result). DSN parameters go only to
a hop that offers DSN (RFC 3461 5.2).

Failures of the session itself raise `SMTPError`: no connection, a timeout
(RFC 5321 4.5.3.2's values by default), a 421, a lost connection, a protocol
error, TLS or AUTH trouble. Couriers never retry: the queue decides.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from postroom.delivery.smtp_errors import SMTPError, relay_error
from postroom.net.channel import ConnectionFailure
from postroom.net.smtp import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    GREETING_TIMEOUT,
    Refused,
    Setup,
    SMTPConnection,
    StartTLSRefused,
)
from postroom.protocol.lines import MAX_CONTENT_LINE, DotStuffer
from postroom.protocol.replies import Reply
from postroom.protocol.smtp_client import Response, State, path_problem

log = logging.getLogger("postroom.delivery.smtp")

# RFC 5321 4.5.3.2: how long a client waits, at least, for each reply (the
# greeting's, and EHLO's, STARTTLS's and AUTH's, are net.smtp's).
MAIL_TIMEOUT = 300.0  # 4.5.3.2.2: MAIL, 5 minutes
RCPT_TIMEOUT = 300.0  # 4.5.3.2.3: RCPT, 5 minutes
DATA_INIT_TIMEOUT = 120.0  # 4.5.3.2.4: the 354 to DATA, 2 minutes
DATA_BLOCK_TIMEOUT = 180.0  # 4.5.3.2.5: each write of the content, 3 minutes
DATA_END_TIMEOUT = 600.0  # 4.5.3.2.6: the reply to the final dot, 10 minutes
CHUNK_SIZE = 64 * 1024  # message octets read from the file per write


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The reply timeouts of RFC 5321 4.5.3.2, in seconds (tests shorten them)."""

    greeting: float = GREETING_TIMEOUT
    mail: float = MAIL_TIMEOUT
    rcpt: float = RCPT_TIMEOUT
    data_init: float = DATA_INIT_TIMEOUT
    data_block: float = DATA_BLOCK_TIMEOUT
    data_end: float = DATA_END_TIMEOUT


@dataclass(frozen=True)
class Hop:
    """Where to send: a host to connect to, and what the session there must do (the
    config checked the values; net.smtp.Setup checks `tls` again)."""

    host: str  # host to connect to (name or IP)
    port: int
    name: str  # for logs and the DSN's Remote-MTA, e.g. the MX name; also the TLS name
    tls: str = "opportunistic"  # "opportunistic" | "required" | "none"
    auth: tuple[str, str] | None = field(default=None, repr=False)  # smarthost login


@dataclass(frozen=True)
class OutRecipient:
    """A recipient and its DSN requests (RFC 3461 4.1-4.2), as the queue stored them."""

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None  # "type;address" decoded


@dataclass(frozen=True)
class TransactionResult:
    """What one transaction did, recipient by recipient.

    `recipients` maps each address to its RCPT reply, or the DATA reply for an
    accepted one (the reply to DATA itself when it was refused, to the final
    dot otherwise), or the MAIL reply when MAIL was refused. An address that
    cannot be written in SMTP gets a local 553 5.1.3. `data_reply` is the reply
    to the final dot, None when no recipient was accepted or DATA was refused.
    `notes` says what was sent differently from what was asked.
    """

    recipients: dict[str, Reply]
    data_reply: Reply | None
    dsn_offered: bool  # the hop offered DSN (RFC 3461): NOTIFY etc. were passed on
    notes: tuple[str, ...] = ()


def peer_of(hop: Hop, address: tuple[str, int] | None = None) -> str:
    """ "name[ip]:port" of the server, for logs and DSNs."""
    ip, port = address or (hop.host, hop.port)
    return f"{hop.name}[{ip}]:{port}"


def _plaintext_note(hop: Hop, failure: ConnectionFailure) -> None:
    """Log that opportunistic TLS was given up for this session (net.smtp.Setup.on_plaintext)."""
    peer = peer_of(hop, failure.address)
    if isinstance(failure, StartTLSRefused):
        log.info("%s refused STARTTLS: %s; going on without TLS", peer, failure.reply)
    else:
        text = relay_error(failure, peer).text
        log.info("%s; trying again without TLS (opportunistic TLS)", text)


def _has_8bit(file: IO[bytes], *, headers_only: bool = False) -> bool:
    """Whether the message, or its header section up to the blank line (RFC 6532 3.2:
    UTF-8 header fields), has octets above 127 (RFC 6152); read in chunks, never
    whole, and the stream put back where it was (at the message's start)."""
    start = file.tell()
    try:
        before = b"\n"  # the content starts at a line start
        while chunk := file.read(CHUNK_SIZE):
            if headers_only:
                window = before + chunk
                ends = [i for i in (window.find(b"\n\r\n"), window.find(b"\n\n")) if i >= 0]
                if ends:
                    return not window[: min(ends)].isascii()
                before = window[-2:]
            if not chunk.isascii():
                return True
        return False
    finally:
        file.seek(start)


class ClientSession:
    """One connection to one hop, ready to send. Make it with `ClientSession.connect`;
    `connection` is its net.smtp.SMTPConnection (extensions, TLS), `peer` its
    "name[ip]:port" for logs and DSNs."""

    def __init__(self, hop: Hop, connection: SMTPConnection, *, command_timeout: float,
                 timeouts: Timeouts) -> None:
        self.connection = connection
        self.peer = peer_of(hop, connection.address)
        self._core = connection.core
        self._command_timeout = command_timeout
        self._timeouts = timeouts

    @classmethod
    async def connect(
        cls,
        hop: Hop,
        *,
        helo: str,
        tls_context: ssl.SSLContext,
        connect_timeout: float = CONNECT_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
        timeouts: Timeouts | None = None,
    ) -> ClientSession:
        """Connect to `hop` and get the session ready to send (see the module docstring).

        The hop's TLS mode is the connection's: a failed handshake where TLS
        is opportunistic is followed by a new connection in plaintext; a hop
        that requires TLS fails with 4.7.4 (not offered) or 4.7.5 (handshake).
        """
        timeouts = timeouts or Timeouts()
        setup = Setup(tls=hop.tls, tls_context=tls_context, tls_name=hop.name.strip("[]"),
                      helo=helo, login=hop.auth, connect_timeout=connect_timeout,
                      greeting_timeout=timeouts.greeting, command_timeout=command_timeout,
                      on_plaintext=functools.partial(_plaintext_note, hop))
        try:
            connection = await SMTPConnection.open(hop.host, hop.port, setup)
        except ConnectionFailure as failure:
            raise relay_error(failure, peer_of(hop, failure.address)) from None
        session = cls(hop, connection, command_timeout=command_timeout, timeouts=timeouts)
        log.debug("%s: ready, TLS %s", session.peer, connection.tls_version or "off")
        return session

    @property
    def closed(self) -> bool:
        return self.connection.closed

    async def __aenter__(self) -> ClientSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.quit()

    async def quit(self) -> None:
        """Say QUIT (when the session is fit for it) and close the connection."""
        await self.connection.quit()

    # --- Sending ----------------------------------------------------------

    async def send(
        self,
        *,
        sender: str,
        recipients: list[OutRecipient],
        message: IO[bytes],
        size: int,
        body: str | None = None,
        smtputf8: bool = False,
        ret: str | None = None,
        envid: str | None = None,
    ) -> TransactionResult:
        """Send one message; see the module docstring and TransactionResult.

        `message` is an open stream at the message's first octet, read to its
        end; `size` is the message's size in octets (declared with SIZE). `body`
        is "7BIT" or "8BITMIME" as the sender declared it, or None to look at
        the content. `smtputf8` says the client asked for SMTPUTF8 (non-ASCII
        addresses always do); a hop without it still gets the message when no
        address and no header field is UTF-8. Local refusals (size, SMTPUTF8,
        a sender that cannot be written) raise SMTPError and leave the session
        usable; any other SMTPError closes it. An OSError reading the message drops the
        connection before the final dot (so nothing is delivered) and
        propagates.
        """
        if self.closed:
            raise SMTPError(f"the session with {self.peer} is closed", temporary=True)
        if not recipients:
            raise ValueError("send() needs at least one recipient")
        wanted = {r.address: r for r in reversed(recipients)}  # the first of duplicates wins
        unique = [wanted[a] for a in dict.fromkeys(r.address for r in recipients)]
        utf8 = self._check(sender, unique, message, size, smtputf8)
        results: dict[str, Reply] = {}
        sendable = []
        for r in unique:
            problem = path_problem(r.address)
            if problem is None:
                sendable.append(r)
            else:
                results[r.address] = Reply(553, "5.1.3", f"cannot send this address: {problem}")
        dsn = self._core.extensions.dsn
        if not sendable:
            return TransactionResult(results, None, dsn)
        notes: list[str] = []
        body_param = self._body(body, message, notes)
        if self._core.state is not State.READY:
            await self._rset()
        self._core.mail(sender, size=size if "SIZE" in self._core.extensions else None,
                        body=body_param, smtputf8=utf8, ret=ret if dsn else None,
                        envid=envid if dsn else None)
        if self._core.extensions.pipelining and self._core.extensions.chunking:
            final = await self._chunked(message, sendable, results, dsn, notes)
        else:
            final = await self._transaction(message, sendable, results, dsn, notes)
        ordered = {r.address: results[r.address] for r in unique}
        return TransactionResult(ordered, final, dsn, tuple(notes))

    def _check(self, sender: str, recipients: list[OutRecipient], message: IO[bytes],
               size: int, smtputf8: bool) -> bool:
        """Refuse what the hop cannot take before anything is sent (SMTPError); return
        whether MAIL asks for SMTPUTF8."""
        ext = self._core.extensions
        ascii_envelope = sender.isascii() and all(r.address.isascii() for r in recipients)
        utf8 = smtputf8 or not ascii_envelope  # asked for: a hop that offers it gets it
        if utf8 and not ext.smtputf8:
            # RFC 6531 3.4: what needs SMTPUTF8 is a UTF-8 address or header field, not
            # the client's flag; like Postfix, a flagged message without either goes.
            if not ascii_envelope or _has_8bit(message, headers_only=True):
                text = f"host {self.peer} does not support SMTPUTF8, which the message needs"
                raise SMTPError(text, temporary=False, status="5.6.7")  # RFC 6531 3.2
            utf8 = False
        limit = ext.size_limit
        if limit is not None and size > limit:
            text = f"message size {size} exceeds size limit {limit} of server {self.peer}"
            raise SMTPError(text, temporary=False, status="5.3.4")  # RFC 1870 6.1
        problem = path_problem(sender, reverse=True)
        if problem is not None:
            text = f"cannot send sender <{sender}>: {problem}"
            raise SMTPError(text, temporary=False, status="5.1.7")
        return utf8

    def _body(self, body: str | None, message: IO[bytes], notes: list[str]) -> str | None:
        """MAIL's BODY parameter (RFC 6152): as declared, or 8BITMIME for 8-bit content."""
        eight_bit = body.upper() == "8BITMIME" if body is not None else _has_8bit(message)
        if self._core.extensions.eightbitmime:
            return body.upper() if body is not None else "8BITMIME" if eight_bit else None
        if eight_bit:
            # RFC 6152 3 asks for conversion or a bounce; like Postfix, send as is.
            notes.append(f"8-bit message sent to {self.peer}, which does not offer 8BITMIME")
        return None

    async def _transaction(
        self, file: IO[bytes], recipients: list[OutRecipient], results: dict[str, Reply],
        dsn: bool, notes: list[str],
    ) -> Reply | None:
        """The transaction with DATA, its MAIL already in the core: every recipient's
        reply into `results`; the reply to the final dot, if it came to that."""
        core, timeouts = self._core, self._timeouts
        pipelining = core.extensions.pipelining
        addresses = [r.address for r in recipients]
        if not pipelining:
            mail = await self._exchange(timeouts.mail)
            if mail.reply.code // 100 != 2:
                results.update(dict.fromkeys(addresses, mail.reply))
                return None
        for r in recipients:
            self._rcpt(r, dsn, notes)
            if not pipelining:
                results[r.address] = (await self._exchange(timeouts.rcpt)).reply
        data: Response | None = None
        if pipelining:
            # RFC 2920 3.1: MAIL, every RCPT and DATA in one write; then the
            # replies, each checked, in the same order.
            core.data()
            await self._flush(self._command_timeout)
            mail = await self._group_replies(addresses, results)
            data = await self._reply(timeouts.data_init)
        accepted = [a for a in addresses if results[a].code // 100 == 2]
        if not accepted or mail.reply.code // 100 != 2:
            if data is not None and data.reply.code == 354:
                # RFC 2920 3.1: DATA accepted without recipients gets a lone dot.
                core.end_data()
                await self._exchange(timeouts.data_end)
            if core.state is not State.READY:
                await self._rset()
            return None
        if data is None:
            core.data()
            data = await self._exchange(timeouts.data_init)
        if data.reply.code != 354:
            results.update(dict.fromkeys(accepted, data.reply))
            await self._rset()
            return None
        await self._content(file)
        core.end_data()
        final = await self._exchange(timeouts.data_end)
        results.update(dict.fromkeys(accepted, final.reply))
        return final.reply

    async def _chunked(
        self, file: IO[bytes], recipients: list[OutRecipient], results: dict[str, Reply],
        dsn: bool, notes: list[str],
    ) -> Reply | None:
        """The transaction with BDAT (RFC 3030) to a host that also pipelines (RFC 2920).

        MAIL, every RCPT and the first chunk go in one write, so a message of
        up to CHUNK_SIZE octets takes one round trip instead of DATA's two.
        Each further chunk is written before the reply to the one before it is
        read. A server that refused MAIL or every RCPT still reads the chunk
        and refuses it (RFC 3030 2). A refused chunk ends the transaction, and
        RSET clears what the server may keep of it (RFC 3030 leaves that to the
        server), so the session can carry the next message. The octets are
        those DATA would deliver: line ends made CRLF, a final CRLF added when
        missing, no dot-stuffing.
        """
        core, timeouts = self._core, self._timeouts
        addresses = [r.address for r in recipients]
        for r in recipients:
            self._rcpt(r, dsn, notes)
        chunks = self._bdat_chunks(file)
        chunk, last = next(chunks)
        core.bdat(chunk, last=last)
        await self._flush(timeouts.data_block)
        mail = await self._group_replies(addresses, results)
        accepted = [a for a in addresses if results[a].code // 100 == 2]
        if not accepted or mail.reply.code // 100 != 2:
            await self._reply(timeouts.data_end)  # the chunk's refusal
            if mail.reply.code // 100 == 2 or core.state is not State.READY:
                await self._rset()  # whatever the server kept of the transaction goes
            return None
        while not last:
            chunk, last = next(chunks)
            core.bdat(chunk, last=last)
            await self._flush(timeouts.data_block)
            previous = await self._reply(timeouts.data_block)
            if previous.reply.code // 100 != 2:
                results.update(dict.fromkeys(accepted, previous.reply))
                await self._reply(timeouts.data_end)  # to the chunk just written
                await self._rset()  # RFC 3030 2: the transaction failed; clear it
                return None
        final = await self._reply(timeouts.data_end)
        results.update(dict.fromkeys(accepted, final.reply))
        return final.reply

    async def _group_replies(self, addresses: list[str], results: dict[str, Reply]) -> Response:
        """The replies to a pipelined MAIL and its RCPTs (RFC 2920 3.1), in order, into
        `results`; a refused MAIL is every recipient's reply, not the RCPTs' 503s."""
        mail = await self._reply(self._timeouts.mail)
        for address in addresses:
            results[address] = (await self._reply(self._timeouts.rcpt)).reply
        if mail.reply.code // 100 != 2:
            results.update(dict.fromkeys(addresses, mail.reply))
        return mail

    def _bdat_chunks(self, file: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
        """The content in BDAT chunks of about CHUNK_SIZE octets, each with "is it the last".

        One chunk is read ahead, to know which is the last. A read error drops
        the connection before the LAST chunk (so nothing is delivered) and
        propagates.
        """
        lines = DotStuffer(dots=False, max_line=MAX_CONTENT_LINE)  # as DATA sends it
        try:
            ahead = lines.feed(file.read(CHUNK_SIZE))
            while True:
                more = file.read(CHUNK_SIZE)
                if not more:
                    yield ahead + lines.close(), True
                    return
                chunk, ahead = ahead, lines.feed(more)
                yield chunk, False
        except OSError:
            self.connection.close(abort=True)
            raise

    def _rcpt(self, recipient: OutRecipient, dsn: bool, notes: list[str]) -> None:
        notify = recipient.notify if dsn else None
        orcpt = recipient.orcpt if dsn else None
        try:
            self._core.rcpt(recipient.address, notify=notify, orcpt=orcpt)
        except ValueError as exc:
            if notify is None and orcpt is None:
                raise
            # The address was checked; a DSN request that cannot be written
            # only changes the reports (RFC 3461 4), so the mail still goes.
            self._core.rcpt(recipient.address)
            notes.append(f"DSN parameters of <{recipient.address}> not sent: {exc}")

    async def _content(self, file: IO[bytes]) -> None:
        """The message, chunk by chunk, dot-stuffed across chunk boundaries by the core.

        Each chunk is written when the next one has been read, so the last one
        goes out with the final "." (end_data, next): a small message is one write,
        and one read on the other side, instead of two.
        """
        while True:
            try:
                chunk = file.read(CHUNK_SIZE)
            except OSError:
                self.connection.close(abort=True)  # no final dot: the server discards the message
                raise
            if not chunk:
                return
            await self._flush(self._timeouts.data_block)
            self._core.send_data(chunk)

    async def _rset(self) -> None:
        self._core.rset()
        response = await self._exchange(self._command_timeout)
        if response.reply.code // 100 != 2:
            await self.quit()
            raise relay_error(Refused(response), self.peer)

    # --- Plumbing: net.smtp's failures in the relay's words ------------------

    async def _exchange(self, timeout: float) -> Response:
        """Write what the core has to send, then read the reply to the oldest command."""
        await self._flush(timeout)
        return await self._reply(timeout)

    async def _flush(self, timeout: float) -> None:
        try:
            await self.connection.flush(timeout)
        except ConnectionFailure as failure:
            raise relay_error(failure, self.peer) from None

    async def _reply(self, timeout: float) -> Response:
        """The next reply; a 421, EOF, timeout or protocol error raises SMTPError."""
        try:
            return await self.connection.reply(timeout)
        except ConnectionFailure as failure:
            raise relay_error(failure, self.peer) from None
