"""The remote courier: one delivery attempt of a queued message over SMTP to a domain's next hops.

For each domain the router names the hops (static route, MX hosts, implicit
MX). The courier tries them in order until one takes the message: a hop that
cannot be reached, or answers with a temporary error before the transaction
is decided, passes the attempt to the next hop (RFC 5321 5.1); a hop that
decides (a reply to each RCPT, then to DATA) ends it. All recipients of one
domain go in one transaction (RFC 5321 3.3 allows many RCPTs per MAIL).

The courier never sleeps and never retries later: every recipient comes back
delivered, temporary or permanent, and the queue owns time. It does keep a
finished session open for a few seconds, so the queue's next message to the
same domain skips the TCP, TLS and EHLO round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from postroom.canonical import domain_of
from postroom.delivery.routing import Failure, Hops, Local, Router
from postroom.delivery.smtp_errors import SMTPError, status_of
from postroom.delivery.smtp_out import (
    ClientSession,
    Hop,
    OutRecipient,
    TransactionResult,
    peer_of,
)
from postroom.gathering import gather_few
from postroom.net.smtp import COMMAND_TIMEOUT, CONNECT_TIMEOUT
from postroom.protocol.replies import Reply
from postroom.queue.content import Content
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.result import DeliveryResult, Outcome

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 5.0  # seconds an unused session stays open (servers wait 5 min: RFC 5321 4.5.3.2.7)
MAX_MESSAGES_PER_SESSION = 100  # then a fresh connection, as Postfix does, to spread load
QUIT_TIMEOUT = 15.0  # seconds for a whole quit(), however the session bounds its own wait


@dataclass
class _Idle:
    """A session that finished a transaction and waits for the next message to its domain."""

    hop: Hop
    session: ClientSession
    messages: int  # transactions it has carried
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Outgoing:
    """One message on its way to one domain: what every hop tried is given."""

    envelope: Envelope
    recipients: list[OutRecipient]
    content: Content


@dataclass(frozen=True)
class _HopFailed:
    """Why one hop could not take the message; the last one is what the recipients hear.
    `permanent`: the hop refused the whole transaction for good, which ends the attempt."""

    dsn_status: str
    text: str
    remote_mta: str | None = None
    permanent: bool = False


def _status(reply: Reply, klass: int) -> str:
    """The reply's RFC 3463 code when its class agrees with the reply code (RFC 3463 2)."""
    status = status_of(reply)
    return status if status.startswith(f"{klass}.") else f"{klass}.0.0"


def _connection_failure(hop: Hop, error: Exception, connecting: bool) -> _HopFailed:
    """RFC 3463 X.4.1 "no answer from host" before a session, X.4.2 "bad connection" during.

    The client session reports its own failures as SMTPError; this covers what
    escapes it (an OSError reading the message, a connection reset).
    """
    where = ("connect to " if connecting else "lost connection with ") + peer_of(hop)
    if isinstance(error, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(error, TimeoutError):
        why = "timed out"
    elif isinstance(error, EOFError):
        why = "connection closed by the server"
    elif isinstance(error, ssl.SSLError):
        why = f"TLS failed: {error.reason or error}"
    else:
        why = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return _HopFailed("4.4.1" if connecting else "4.4.2", f"{where}: {why}")


def _smtp_failure(error: SMTPError, peer: str | None) -> _HopFailed:
    # The session's text already names the host and the command, Postfix-style.
    status = error.status
    if error.reply is not None:
        status = _status(error.reply, 4 if error.temporary else 5)
    return _HopFailed(status, error.text, peer if error.reply is not None else None)


def _result(recipient: Recipient, transaction: TransactionResult, peer: str) -> DeliveryResult:
    """One recipient's result of a transaction the hop `peer` decided."""
    address = recipient.address
    reply = transaction.recipients.get(address)
    if reply is None:  # the client core answers for every recipient; stay safe anyway
        return DeliveryResult(address, "temporary", "4.4.2", f"{peer}: no reply", peer)
    if reply.code >= 500:
        return DeliveryResult(address, "permanent", _status(reply, 5), str(reply), peer)
    if reply.code >= 400:
        return DeliveryResult(address, "temporary", _status(reply, 4), str(reply), peer)
    # RFC 3461 5.2.2: NOTIFY=SUCCESS through a hop without DSN earns a "relayed" DSN.
    wanted_success = recipient.notify is not None and any(
        n.upper() == "SUCCESS" for n in recipient.notify
    )
    return DeliveryResult(
        address, "delivered", "2.0.0", str(reply), peer,
        relayed_without_dsn=wanted_success and not transaction.dsn_offered,
    )


class RemoteCourier:
    """Delivers queued messages to remote domains over SMTP (see the module docstring)."""

    def __init__(
        self,
        router: Router,
        helo_name: str,
        tls_context: ssl.SSLContext,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
        max_idle_sessions_per_domain: int = 2,
        idle_timeout: float = IDLE_TIMEOUT,
        max_messages_per_session: int = MAX_MESSAGES_PER_SESSION,
    ) -> None:
        self._router = router
        self._helo = helo_name
        self._tls_context = tls_context
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._max_idle = max_idle_sessions_per_domain
        self._idle_timeout = idle_timeout
        self._max_messages = max_messages_per_session
        self._idle: dict[str, list[_Idle]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- the courier interface

    async def deliver(
        self, envelope: Envelope, recipients: list[Recipient], content: Content
    ) -> list[DeliveryResult]:
        """Try once to deliver the message to `recipients`; one result each, in order.

        Recipients are meant to share one domain; several domains are routed
        and delivered side by side, one transaction each.
        """
        groups: dict[str, list[Recipient]] = {}
        results: dict[int, DeliveryResult] = {}  # by id() of the recipient
        for recipient in recipients:
            try:
                groups.setdefault(domain_of(recipient.address), []).append(recipient)
            except ValueError:
                results[id(recipient)] = DeliveryResult(
                    recipient.address, "permanent", "5.1.3",
                    f"<{recipient.address}> is not a valid address",
                )
        for group in await gather_few(
            [self._deliver_domain(envelope, d, g, content) for d, g in groups.items()]
        ):
            results.update((id(r), result) for r, result in group)
        return [results[id(r)] for r in recipients]

    async def close(self) -> None:
        """QUIT every idle session; sessions finishing later are closed, not kept."""
        self._closed = True
        idle = [entry for entries in self._idle.values() for entry in entries]
        self._idle.clear()
        for entry in idle:
            if entry.timer is not None:
                entry.timer.cancel()
        await asyncio.gather(*(self._quit(entry.session) for entry in idle))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- one domain

    async def _deliver_domain(
        self, envelope: Envelope, domain: str, recipients: list[Recipient], content: Content
    ) -> list[tuple[Recipient, DeliveryResult]]:
        route = await self._router.route(domain)
        if isinstance(route, Failure):
            outcome: Outcome = "permanent" if route.permanent else "temporary"
            return [
                (r, DeliveryResult(r.address, outcome, route.dsn_status, route.text))
                for r in recipients
            ]
        if isinstance(route, Local):
            # The queue should have given these to the local courier; waiting lets an
            # administrator fix the configuration without losing the mail.
            text = f"{domain} is a local domain, not delivered by SMTP"
            return [(r, DeliveryResult(r.address, "temporary", "4.3.5", text)) for r in recipients]
        assert isinstance(route, Hops)
        message = _Outgoing(
            envelope, [OutRecipient(r.address, r.notify, r.orcpt) for r in recipients], content
        )
        failed: _HopFailed | None = None
        idle = self._take_idle(domain, route.hops)
        attempts: list[tuple[Hop, _Idle | None]] = [(idle.hop, idle)] if idle else []
        attempts += [(hop, None) for hop in route.hops]
        for hop, reused in attempts:
            tried = await self._try_hop(domain, hop, reused, message)
            if isinstance(tried, tuple):
                peer, transaction = tried
                return [(r, _result(r, transaction, peer)) for r in recipients]
            failed = tried
            if failed.permanent:
                return [(r, DeliveryResult(r.address, "permanent", failed.dsn_status, failed.text,
                                           failed.remote_mta)) for r in recipients]
            # A reused session that went stale is routine; the hop is tried afresh.
            level = logging.DEBUG if reused is not None else logging.INFO
            log.log(level, "%s: %s", envelope.queue_id, failed.text)
        if failed is None:  # pragma: no cover - the router never returns Hops([])
            failed = _HopFailed("4.4.4", f"no next hop for {domain}")
        # A permanent error from a hop that was skipped (5xx greeting) becomes a
        # temporary result: other hops, or this one later, may still take the mail.
        status = failed.dsn_status
        status = "4" + status[1:] if status.startswith("5") else status
        return [
            (r, DeliveryResult(r.address, "temporary", status, failed.text, failed.remote_mta))
            for r in recipients
        ]

    async def _try_hop(
        self, domain: str, hop: Hop, reused: _Idle | None, message: _Outgoing
    ) -> tuple[str, TransactionResult] | _HopFailed:
        """One hop: connect (or reuse), run the transaction; a _HopFailed that is not
        permanent means try the next."""
        if reused is not None:
            session, messages = reused.session, reused.messages
        else:
            messages = 0
            try:
                session = await ClientSession.connect(
                    hop,
                    helo=self._helo,
                    tls_context=self._tls_context,
                    connect_timeout=self._connect_timeout,
                    command_timeout=self._command_timeout,
                )
            except SMTPError as e:
                # No connection, a 4xx or 5xx greeting or EHLO, TLS required and not
                # offered: the next MX may do better (RFC 5321 5.1; Postfix skips
                # hosts that greet with 5xx).
                return _smtp_failure(e, peer_of(hop))
            except (OSError, EOFError) as e:  # refused, unreachable, TLS, timeout, hang-up
                return _connection_failure(hop, e, connecting=True)
        envelope = message.envelope
        try:
            with message.content.reader() as stream:  # each hop reads from the start
                transaction = await session.send(
                    sender=envelope.sender,
                    recipients=message.recipients,
                    message=stream,
                    size=message.content.size,
                    body=envelope.body,
                    smtputf8=envelope.smtputf8,
                    ret=envelope.ret,
                    envid=envelope.envid,
                )
        except SMTPError as e:
            if e.temporary:
                self._discard(session)
                return _smtp_failure(e, session.peer)
            # Refused before sending (over the hop's SIZE, SMTPUTF8 not offered, a
            # sender SMTP cannot carry): another MX of the domain would say the same.
            # Such a refusal leaves the session fit for the next message.
            self._release(domain, hop, session, messages)
            return dataclasses.replace(_smtp_failure(e, session.peer), remote_mta=session.peer,
                                       permanent=True)
        except (OSError, EOFError) as e:
            # A reused session the server closed while idle fails here at once; the
            # fresh connection to the same hop comes later in the list.
            self._discard(session)
            return _connection_failure(hop, e, connecting=False)
        self._release(domain, hop, session, messages + 1)
        return session.peer, transaction

    # -- idle sessions

    def _take_idle(self, domain: str, hops: Sequence[Hop]) -> _Idle | None:
        """An idle session to one of `hops`, out of the pool; stale ones are closed."""
        entries = self._idle.get(domain)
        found: _Idle | None = None
        while entries and found is None:
            entry = entries.pop()
            if entry.timer is not None:
                entry.timer.cancel()
            if entry.hop in hops:
                found = entry
            else:  # DNS changed since: that host is no longer a next hop
                self._discard(entry.session)
        if not entries:
            self._idle.pop(domain, None)
        return found

    def _release(self, domain: str, hop: Hop, session: ClientSession, messages: int) -> None:
        """Keep a session that is still open for the next message, or close it."""
        entries = self._idle.setdefault(domain, [])
        if (
            self._closed
            or session.closed
            or messages >= self._max_messages
            or len(entries) >= self._max_idle
        ):
            if not entries:
                self._idle.pop(domain, None)
            self._discard(session)
            return
        entry = _Idle(hop, session, messages)
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(self._idle_timeout, self._expire, domain, entry)
        entries.append(entry)

    def _expire(self, domain: str, entry: _Idle) -> None:
        entries = self._idle.get(domain, [])
        if entry in entries:
            entries.remove(entry)
            if not entries:
                self._idle.pop(domain, None)
            self._discard(entry.session)

    def _discard(self, session: ClientSession) -> None:
        """QUIT in the background; the delivery result does not wait for it."""
        task = asyncio.get_running_loop().create_task(self._quit(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit(self, session: ClientSession) -> None:
        # A session being dropped owes nobody a result: its errors only matter to it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.quit(), QUIT_TIMEOUT)
