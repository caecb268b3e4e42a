"""One SMTP connection: moves bytes between a socket and the sans-IO core, asks policy, stores mail.

The core (`postroom.protocol.smtp_server`) decides what the client said and
what the protocol requires; this module supplies what the core cannot know:
the clock (timeouts), TLS, who the recipients are, and where the message goes.
What happens at the end of the message, up to its 250, is server.message_end's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from postroom.defense.gate import LOGINS_REFUSED, Screening
from postroom.ids import new_queue_id
from postroom.mailauth.checks import MailChecks, MessageChecks, Verdict
from postroom.mailauth.results import OurResultsRemover
from postroom.mailauth.sign import Signer, StreamSigner
from postroom.milter.connection import MilterSpec
from postroom.policy.relay import RecipientDecision, RecipientPolicy
from postroom.policy.submission import SubmissionPolicy
from postroom.protocol import sasl
from postroom.protocol import smtp_server as core
from postroom.protocol.replies import Reply
from postroom.queue.envelope import Envelope, Recipient
from postroom.server.diskspace import FreeSpace
from postroom.server.forwarding import Forwarding
from postroom.server.headers import HeaderCapture, missing_headers
from postroom.server.message_end import MessageEnd
from postroom.server.milter_steps import mail_parameters, rcpt_parameters
from postroom.server.received import DEFAULT_MAX_RECEIVED, HopCounter, TraceInfo, received_header
from postroom.server.session import Service, Session
from postroom.server.stream import Stream
from postroom.store.api import Incoming, Mailboxes
from postroom.store.returnpath import ReturnPathRemover, return_path

log = logging.getLogger("postroom.smtpd")

STARTTLS_READY = Reply(220, "2.0.0", "Ready to start TLS")  # RFC 3207 4
# Commands a client must send alone and wait for the answer to, unless it negotiated
# PIPELINING (RFC 2920 3.1); defense.gate tells off one that sends more behind them.
SENT_ALONE = (core.Hello, core.MailFrom, core.RcptTo, core.DataStart, core.Reset,
              core.StartTLS, core.AuthStart)
# The user directory could not be read (a database down): ask the client to come back.
LOOKUP_FAILED = Reply(451, "4.3.0", "Temporary lookup failure, try later")  # as Postfix
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")  # RFC 4954 6


class Outbound(Protocol):
    """The durable queue (server.relay): mail for other hosts, and the delivery reports
    about mail filed here (postroom.queue.dsn)."""

    async def add(self, envelope: Envelope, chunks: Iterable[bytes]) -> None:
        """Store durably; `chunks` may be iterated in another thread."""

    def queued(self, envelope: Envelope) -> None:
        """`add` returned for `envelope`: try it now."""

    async def delivered(
        self, envelope: Envelope, recipients: list[tuple[Recipient, int]], original: bytes | Path
    ) -> None:
        """Local `recipients` (each with the number of mailboxes it reached) have the
        message: queue what their NOTIFY asked for (RFC 3461 4.1). Never raises."""


@dataclass(kw_only=True)
class SMTPService(Service):
    """What every session of one SMTP listener ("smtp", "submission", "submissions") shares."""

    core_config: core.SMTPServerConfig
    policy: RecipientPolicy
    mailboxes: Mailboxes
    outbound: Outbound
    free_space: FreeSpace  # MAIL FROM: 452 when the disk cannot take it
    # Submission only (RFC 6409): authenticated users and their sender checks.
    submission: SubmissionPolicy | None = None
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: server timeout 5 minutes
    data_timeout: float = 600.0  # RFC 5321 4.5.3.2.6: 10 minutes after end of data...
    max_received: int = DEFAULT_MAX_RECEIVED
    # MX only: SPF, DKIM, ARC, DMARC and iprev of what strangers send (postroom.mailauth).
    checks: MailChecks | None = None
    # Submission only: DKIM-signs what authenticated users send (postroom.mailauth.sign).
    dkim: Signer | None = None
    # Aliases to other hosts and bounces to SRS addresses (server.forwarding).
    forwarding: Forwarding | None = None
    milters: tuple[MilterSpec, ...] = ()  # [milters]: the filters of this listener, in order
    junk_folder: str = "Junk"  # where DMARC and milter quarantine file mail ([dmarc])
    mx: bool = False  # the MX listener: postscreen's checks, DNS lists, greylisting


@dataclass
class Transaction:
    """The envelope and spool of the message being received (RFC 5321 3.3)."""

    queue_id: str
    mail: core.MailFrom  # the sender and the MAIL parameters (RFC 1870, 3461, 6152, 6531)
    started: float
    recipients: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    remote: list[Recipient] = field(default_factory=list)  # to relay (submission)
    # Local recipients that asked for a success report (RFC 3461 4.1, NOTIFY and
    # ORCPT kept), with the number of mailboxes each reaches.
    notify: list[tuple[Recipient, int]] = field(default_factory=list)
    writer: Incoming | None = None  # while DATA is in progress
    hops: HopCounter | None = None
    headers: HeaderCapture | None = None  # submission: the fields we check and complete
    # RFC 5321 4.4: a Return-Path the client sent is no one's to write; ours heads
    # the filed copies (the message's head), and the relayed copy carries none.
    return_paths: ReturnPathRemover = field(default_factory=ReturnPathRemover)
    from_header: list[str] | None = None  # submission: From's values, checked at the end
    # MX with checks on: the checks under way, and what they decided at the end of DATA.
    auth: MessageChecks | None = None
    auth_verdict: Verdict | None = None
    forged_results: OurResultsRemover | None = None  # AR fields claiming our name go
    signer: StreamSigner | None = None  # submission: the DKIM signature being computed
    # Addresses on other hosts, by the local domain whose alias forwards to them.
    forward: dict[str, list[str]] = field(default_factory=dict)
    # The message failed its From domain's DMARC check here: not to be forwarded (set at
    # the end of DATA, before the message is stored; its local copies are still filed or
    # refused as the policy says).
    dmarc_failed: bool = False

    def mailboxes(self) -> list[str]:
        """Each local mailbox once, however many recipients (aliases) lead to it."""
        return list(dict.fromkeys(box for _rcpt, boxes in self.recipients for box in boxes))


class SMTPSession(Session, MessageEnd):
    """Drives one connection from the banner to the close."""

    log = log
    service: SMTPService
    conn: core.SMTPServer

    def __init__(self, service: SMTPService, stream: Stream) -> None:
        super().__init__(service, stream, service.command_timeout)
        self.conn = core.SMTPServer(service.core_config)
        self.helo = ""
        self.esmtp = False
        self.tls: tuple[str, str] | None = self._tls_info()
        self.txn: Transaction | None = None
        self.in_data = False
        self.milters = self._milter_chain() if service.milters else None
        self.screening: Screening | None = None  # defense.gate's checks, from _admitted

    @property
    def busy(self) -> bool:
        """Inside a transaction: SIGTERM waits for it to end."""
        return self.txn is not None

    def _tls_info(self) -> tuple[str, str] | None:
        obj = self.stream.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        return (str(obj.version()), str(cipher[0]) if cipher else "unknown")

    # -- the loop ---------------------------------------------------------

    def _refuse(self) -> None:
        self.conn.send(Reply(421, "4.7.0", f"{self.service.hostname} Too many connections, "
                             "try later", close=True))

    def _greet(self) -> None:
        hostname = self.service.hostname
        if self.service.draining:
            self.conn.shutdown(f"{hostname} Service shutting down")
        else:
            self.conn.send(Reply(220, None, f"{hostname} ESMTP postroom"))

    async def _admitted(self) -> bool:
        svc = self.service
        local = self.stream.get_extra_info("sockname") or ("", 0)
        self.screening = svc.defense.screening(svc.name, svc.mx, self.client_ip, str(local[0]))
        refusal = await self.screening.connect(self.stream.read)
        if refusal is not None:
            self.conn.send(refusal)
        return refusal is None

    def _ended(self) -> None:
        self._abort_transaction("connection closed")
        if self.milters is not None:
            self.milters.close()
        if self.screening is not None:
            self.screening.ended()

    async def _loop(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is core.NEED_DATA:
                if not await self._flush() or conn.closing:
                    return
                if not await self._read():
                    return
                continue
            if event is core.PAUSED:  # pragma: no cover - we answer every event
                raise RuntimeError("SMTP core paused with no pending reply")
            await self._handle(event)
            if conn.closing:
                await self._flush()
                return

    async def _read(self) -> bool:
        """Feed the core; False when the connection must end (timeout, EOF handled by core).

        Each request has a deadline (server.deadline): a command line must be
        whole within the command timeout, message content keeps a minimum rate;
        no single byte buys more time. Both shrink under stress (server.limits).
        """
        svc = self.service
        now = asyncio.get_running_loop().time()
        deadline = self.deadline
        if self.in_data:
            limit = svc.limiter.timeout(svc.data_timeout)
            if not deadline.content:
                deadline.start(now, limit, content=True)
            timeout = min(limit, deadline.remaining(now))  # and never idle longer
        else:
            if deadline.content or not deadline.started or self.conn.bytes_buffered == 0:
                deadline.start(now, svc.limiter.timeout(svc.command_timeout))
            timeout = deadline.remaining(now)
        try:
            data = await self.stream.read(timeout)
        except TimeoutError:
            log.info("%s: timeout after %s from [%s]", svc.name, self.conn.state,
                     self.client_ip)
            self.conn.timeout()
            await self._flush()
            return False
        deadline.received(len(data))
        self.conn.receive_data(data)
        return True

    # -- events -------------------------------------------------------------

    async def _handle(self, event: object) -> None:
        conn = self.conn
        if isinstance(event, core.MessageData):
            self._write(event.data)
            return
        if self.screening is not None and isinstance(event, SENT_ALONE):
            chunk = isinstance(event, core.DataStart) and event.chunking  # RFC 3030 2
            ahead = self.screening.ahead(0 if chunk else conn.bytes_buffered, self.esmtp)
            if ahead is not None:
                conn.send(ahead)
                return
        if isinstance(event, core.Hello):
            refusal = await self.screening.hello(event.domain) if self.screening else None
            if refusal is not None:
                conn.send(refusal)
                return
            self.helo = event.domain
            self.esmtp = event.command == "EHLO"
            self._abort_transaction("new greeting")
            if self.milters is not None:
                refusal = await self._milter_helo(event.domain)
                if refusal is not None:
                    conn.send(refusal)
                    return
            conn.send(Reply(250, None, f"{self.service.hostname} Hello {event.domain}"
                                       f" [{self.client_ip}]"))
        elif isinstance(event, core.MailFrom):
            await self._mail_from(event)
        elif isinstance(event, core.RcptTo):
            await self._rcpt_to(event)
        elif isinstance(event, core.DataStart):
            self._data_start(event)
        elif isinstance(event, core.MessageEnd):
            await self._message_end()
        elif isinstance(event, core.MessageAborted):
            self._abort_transaction(f"refused: {event.reply}")
        elif isinstance(event, core.StartTLS):
            await self._starttls()
        elif isinstance(event, core.AuthStart | core.AuthResponse):
            await self._auth(event)
        elif isinstance(event, core.Reset):
            self._abort_transaction("reset")
        elif isinstance(event, core.Quit | core.ConnectionClosed):
            self._abort_transaction("client left")

    async def _mail_from(self, event: core.MailFrom) -> None:
        svc = self.service
        if svc.draining:
            self.conn.send(Reply(421, "4.3.2", f"{svc.hostname} Service shutting down",
                                 close=True))
            return
        self._abort_transaction("new transaction")
        limited = await self.screening.mail(self.user) if self.screening else None
        if limited is not None:
            self.conn.send(limited)
            return
        if svc.submission is not None and self.user is not None:
            refusal = await svc.submission.check_sender(self.user, event.address)
            if refusal is not None:
                log.info("%s: reject: MAIL from [%s]: %s; user=%s", svc.name, self.client_ip,
                         refusal, self.user)
                self.conn.send(refusal)
                return
        full = self._storage_refusal(event.size)
        if full is not None:
            self.conn.send(full)
            return
        txn = Transaction(queue_id=new_queue_id(), mail=event, started=time.time())
        if self.milters is not None:
            refusal = await self.milters.mail(event.address, mail_parameters(event),
                                              txn.queue_id)
            if refusal is not None:
                self.conn.send(refusal)
                return
        self.txn = txn
        log.info("%s: %s: client=[%s], helo=%s, from=<%s>%s", svc.name, txn.queue_id,
                 self.client_ip, self.helo, event.address,
                 f", size={event.size}" if event.size is not None else "")
        self.conn.send(Reply(250, "2.1.0", "Sender ok"))

    def _storage_refusal(self, declared: int | None) -> Reply | None:
        """452 4.3.1 when the mail or queue filesystem cannot take the message now."""
        svc = self.service
        try:
            refusal = svc.free_space.check(declared)
        except OSError as exc:
            log.warning("%s: cannot read the free disk space: %s", svc.name, exc)
            return None
        if refusal is not None:
            log.warning("%s: reject: MAIL from [%s]: %s; %d octets free, %s declared, "
                        "%d kept free", svc.name, self.client_ip, refusal,
                        svc.free_space.free(), declared if declared is not None else "none",
                        svc.free_space.reserve)
        return refusal

    async def _rcpt_to(self, event: core.RcptTo) -> None:
        txn = self.txn
        assert txn is not None, "the core emits RcptTo only inside a transaction"
        svc = self.service
        limited = await self.screening.recipient(self.user) if self.screening else None
        if limited is not None:
            self.conn.send(limited)
            return
        # An authenticated submission client may relay (RFC 6409); MX traffic may not.
        policy = svc.submission if svc.submission is not None and self.user else svc.policy
        try:
            decision = await policy.check_recipient(event.address)
        except OSError as exc:  # the user directory cannot be read (a database down)
            log.error("%s: %s: recipient lookup failed: %s", svc.name, txn.queue_id, exc)
            decision = RecipientDecision(LOOKUP_FAILED)
        if decision.accepted and self.screening is not None:
            grey = await self.screening.greylisted(self.user, txn.mail.address, event.address)
            if grey is not None:
                self.conn.send(grey)
                return
        if decision.accepted and self.milters is not None:
            refusal = await self.milters.rcpt(event.address, rcpt_parameters(event),
                                              decision.remote is None)
            if refusal is not None:
                self.conn.send(refusal)
                return
        if decision.accepted and svc.checks is not None and txn.auth is None:
            # From the first recipient accepted, not MAIL FROM: no DNS work for mail
            # that every RCPT refuses (a dictionary attack asks nothing of DNS).
            txn.auth = svc.checks.start(self.client_ip, self.helo, txn.mail.address)
            if txn.auth is not None:
                txn.forged_results = OurResultsRemover(svc.checks.authserv_id)
        if decision.accepted and decision.forward:
            targets = txn.forward.setdefault(decision.forward_domain, [])
            targets += [t for t in decision.forward if t not in targets]
        if decision.accepted and decision.remote is not None:
            txn.remote.append(Recipient(decision.remote, notify=event.notify, orcpt=event.orcpt))
        elif decision.accepted:
            txn.recipients.append((event.address, decision.mailboxes))
            if event.notify is not None and "SUCCESS" in event.notify:
                recipient = Recipient(event.address, notify=event.notify, orcpt=event.orcpt)
                txn.notify.append((recipient, len(decision.mailboxes)))
        else:
            log.info("%s: %s: reject: RCPT from [%s]: %s; from=<%s> to=<%s>",
                     self.service.name, txn.queue_id, self.client_ip, decision.reply,
                     txn.mail.address, event.address)
        self.conn.send(decision.reply)

    def _data_start(self, event: core.DataStart) -> None:
        txn = self.txn
        assert txn is not None, "the core emits DataStart only inside a transaction"
        txn.writer = self.service.mailboxes.receive(return_path(txn.mail.address))
        txn.hops = HopCounter()
        if self.service.submission is not None:
            txn.headers = HeaderCapture()
            if self.service.dkim is not None and self.user is not None:
                txn.signer = self.service.dkim.start()
        everyone = [rcpt for rcpt, _boxes in txn.recipients] + [r.address for r in txn.remote]
        info = TraceInfo(
            helo=self.helo,
            client_ip=self.client_ip,
            client_name=None,
            hostname=self.service.hostname,
            queue_id=txn.queue_id,
            esmtp=self.esmtp,
            tls_version=self.tls[0] if self.tls else None,
            tls_cipher=self.tls[1] if self.tls else None,
            authenticated=self.user is not None,
            smtputf8=txn.mail.smtputf8,
            recipient=everyone[0] if len(everyone) == 1 else None,
        )
        txn.writer.write(received_header(info, txn.started))
        self.in_data = True
        if not event.chunking:
            self.conn.send(Reply(354, None, "End data with <CR><LF>.<CR><LF>"))

    def _write(self, data: bytes) -> None:
        txn = self.txn
        if txn is None or txn.writer is None:
            return  # spool could not be opened; the error is reported at the end
        if txn.hops is not None and not txn.hops.done:
            txn.hops.feed(data)
        if txn.auth is not None:
            txn.auth.feed(data)
        stored = txn.return_paths.feed(data)
        if txn.forged_results is not None:
            stored = txn.forged_results.feed(stored)
        try:
            txn.writer.write(stored)
            if txn.signer is not None:
                txn.signer.feed(stored)
        except OSError as exc:
            log.error("%s: %s: write to spool failed: %s", self.service.name, txn.queue_id, exc)
            txn.writer.abort()
            txn.writer = None
            return
        if txn.headers is not None and txn.headers.feed(data):
            self._submission_headers(txn)

    def _submission_headers(self, txn: Transaction) -> None:
        """RFC 6409 8: keep From to check against the user at the end, add Message-ID
        and Date if missing."""
        assert txn.headers is not None and txn.writer is not None
        svc = self.service
        fields = txn.headers.message()
        txn.from_header = fields.get_all("From") or []
        extra = missing_headers(fields, svc.hostname, txn.started)
        if extra and not txn.writer.insert_head(extra):
            log.warning("%s: %s: header section too large to complete", svc.name, txn.queue_id)
        elif extra and txn.signer is not None:
            txn.signer.add_fields(extra)

    async def _auth(self, event: core.AuthStart | core.AuthResponse) -> None:
        """RFC 4954: SASL PLAIN or LOGIN, then a password check against the directory."""
        if isinstance(event, core.AuthStart):
            step = self._sasl_step(event.mechanism, event.initial_response)
        else:
            step = self._sasl_step(None, event.data)
        if isinstance(step, Reply):
            self.conn.send(step)  # the next 334 challenge, or a 501/504 refusal
            return
        try:
            user = await self._login(step.authcid, step.password, step.authzid)
        except OSError as exc:  # the user directory cannot be read (a database down)
            log.error("%s: [%s] password check failed: %s", self.service.name, self.client_ip,
                      exc)
            self._reply(AUTH_UNAVAILABLE)
            return
        if self.conn.closing:
            return  # the server stopped (421 sent) while the password was checked
        if user is None:
            self.conn.send(LOGINS_REFUSED if self.locked_out else sasl.AUTH_FAILED)
            return
        self.user = user
        mechanism = self._exchange.mechanism if self._exchange else "SASL"
        if self.milters is not None:
            self.milters.auth = {"{auth_type}": mechanism, "{auth_authen}": user}
        log.info("%s: [%s] authenticated as %s (%s)", self.service.name, self.client_ip, user,
                 mechanism)
        self.conn.auth_succeeded(user, sasl.AUTH_SUCCEEDED)

    def _reply(self, reply: Reply) -> None:
        """Answer the pending event, unless a shutdown closed the session meanwhile."""
        if not self.conn.closing:
            self.conn.send(reply)

    async def _starttls(self) -> None:
        if await self._start_tls(lambda: self.conn.send(STARTTLS_READY)):
            self.tls = self._tls_info()
            self.helo = ""
            if self.tls:
                log.info("%s: TLS established with [%s]: %s %s", self.service.name,
                         self.client_ip, *self.tls)

    # -- transaction bookkeeping --------------------------------------------

    def _abort_transaction(self, why: str) -> None:
        txn = self.txn
        if txn is None:
            return
        if txn.auth is not None:
            txn.auth.cancel()
            txn.auth = None
        if self.milters is not None:
            self.milters.abort()
        if txn.writer is not None:
            txn.writer.abort()
            txn.writer = None
            log.info("%s: %s: message discarded: %s", self.service.name, txn.queue_id, why)
        self._finish_transaction()

    def _finish_transaction(self) -> None:
        self.txn = None
        self.in_data = False
        if self.service.draining and not self.conn.closing:
            # The transaction we waited for is over: say goodbye after its reply.
            self.conn.shutdown(f"{self.service.hostname} Service shutting down")

    def close_for_shutdown(self) -> None:
        """SIGTERM, grace period over: tell the client 421 and close (RFC 5321 3.8)."""
        self._abort_transaction("server shutting down")
        if not self.conn.closing:
            self.conn.shutdown(f"{self.service.hostname} Service shutting down")
        out = self.conn.data_to_send()
        if out and not self.stream.is_closing():
            self.stream.write(out)
        self.stream.close()

