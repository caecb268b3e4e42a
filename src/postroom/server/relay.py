"""The relay as one service of the server: the durable queue, its scheduler and the couriers.

Submission hands mail for other hosts to `Relay.add` (durable before the
250), then `wake`s it; every SMTP session hands it the success reports local
recipients asked for (`delivered`), which are queued mail too. The scheduler
(postroom.queue) owns time and retries; it asks `deliver` to try a group of
recipients once, and `deliver` sends each recipient to the courier for its
domain: local domains to the Maildir courier (bounces to our own users,
`postroom sendmail` mail), all others to the SMTP courier, which finds the
next hop (static route, MX, implicit MX).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from postroom.batch import BatchThread
from postroom.canonical import domain_of
from postroom.config import Config, postmaster_address
from postroom.delivery.local import LocalCourier
from postroom.delivery.remote import RemoteCourier
from postroom.delivery.routing import Router, RouterOptions
from postroom.gathering import gather_few
from postroom.mailauth.keys import KeyRing
from postroom.mailauth.sign import Signer
from postroom.mailauth.srs import SRS, SRSError, is_srs, load_secret
from postroom.queue.content import Content
from postroom.queue.dsn import Action, Report, queue_dsn
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.pgqueue import PGQueueStore
from postroom.queue.result import DeliveryResult
from postroom.queue.rules import Rules
from postroom.queue.scheduler import Scheduler, SchedulerOptions
from postroom.queue.store import QueueError
from postroom.queueopen import open_queue, primary_pid
from postroom.server import metrics
from postroom.server.forwarding import Forwarding
from postroom.server.metrics import outcome_counts
from postroom.store.api import Expansion, Mailboxes

log = logging.getLogger("postroom.relay")


def client_tls_context() -> ssl.SSLContext:
    """TLS for outgoing SMTP: opportunistic, as RFC 3207 4.1 and Postfix's "may" level
    use it: it encrypts against passive listeners; without DANE or MTA-STS there is
    no name to verify the next hop's certificate against."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def router_options(config: Config) -> RouterOptions:
    """Where relayed mail goes, from the config: [routes], [dns], [relay] mx_port, and
    this host's own name and listeners (which count as itself, RFC 5321 5.1)."""
    own = []
    for endpoint in config.listen.enabled().values():
        try:
            own.append((str(ipaddress.ip_address(endpoint.host)), endpoint.port))
        except ValueError:
            continue  # a host name: the router compares addresses only
    return RouterOptions(
        routes=config.routes, nameservers=config.dns.nameservers,
        mx_port=config.relay.mx_port, own_hostname=config.hostname, own_endpoints=own,
    )


def scheduler_options(config: Config, signer: Signer | None = None) -> SchedulerOptions:
    """The queue's settings, from the config's [queue], hostname and postmaster."""
    rules = Rules(
        retry_after=tuple(config.queue.retry_after),
        give_up_after=config.queue.give_up_after,
        delay_warning_after=config.queue.delay_warning_after or None,  # 0: never
        postmaster=postmaster_address(config),
    )
    return SchedulerOptions(
        hostname=config.hostname, rules=rules,
        max_per_destination=config.queue.max_per_destination,
        sign_notice=signer.sign if signer is not None else None,
    )


class Relay:
    """Queue + scheduler + couriers; `add`/`wake` are what SMTP sessions call."""

    def __init__(
        self,
        config: Config,
        store: Mailboxes,
        is_local_domain: Callable[[str], bool],
        expand: Callable[[str], Awaitable[Expansion | None]],
        *,
        notify_primary: Callable[[str], None] | None = None,
    ) -> None:
        """`notify_primary`: set in a worker process, whose relay only queues; the
        primary process's scheduler delivers, told of each new queue ID by this."""
        self._is_local_domain = is_local_domain
        self._notify_primary = notify_primary
        self._hostname = config.hostname
        # DKIM: submission sessions sign with it, the queue signs its notices.
        self.signer = Signer(KeyRing(config.data_dir)) if config.dkim.sign else None
        # Aliases to other hosts: SRS senders, ARC seals with the same keys.
        self.forwarding = Forwarding(SRS(load_secret(config.data_dir)),
                                     self.signer.keyring if self.signer else None,
                                     config.hostname)
        self.queue = open_queue(config, primary_pid=primary_pid(notify_primary is not None))
        self.router = Router(router_options(config), is_local_domain)
        # Keep as many idle sessions per destination as may deliver to it at once:
        # a new session costs a TCP and a TLS handshake and two EHLOs.
        self.remote = RemoteCourier(
            self.router, config.hostname, client_tls_context(),
            command_timeout=config.smtp.command_timeout,
            max_idle_sessions_per_domain=config.queue.max_per_destination,
        )
        self.local = LocalCourier(store, expand)
        self.scheduler = Scheduler(self.queue, self.deliver,
                                   scheduler_options(config, self.signer))
        self._task: asyncio.Task[None] | None = None
        # Group commit for the queue (QueueStore.add_many), as store/mailboxes.py
        # does for Maildirs: four syncs per message become a few per batch.
        self._batcher: BatchThread[tuple[Envelope, Iterable[bytes]], None] = BatchThread(
            "postroom-queue", self.queue.add_many
        )

    # -- what SMTP sessions call (server.smtp.Outbound) --------------------------

    async def add(self, envelope: Envelope, chunks: Iterable[bytes]) -> None:
        """Queue durably, batched with whatever other sessions queue meanwhile.
        `chunks` is iterated in the queue thread (it may read a spool file)."""
        await self._batcher.submit((envelope, chunks))

    def queued(self, envelope: Envelope) -> None:
        """A session of this process queued `envelope` (add returned): in the primary
        the scheduler takes this very envelope, with no read from disk; a worker
        tells the primary its queue ID."""
        if self._notify_primary is not None:
            self._notify_primary(envelope.queue_id)
        else:
            self.scheduler.wake(envelope.queue_id, envelope=envelope)

    def wake(self, queue_id: str | None) -> None:
        """A worker, `postroom sendmail` or `postroom queue` queued or changed `queue_id`
        (server/workers.py, the control socket): read it and try it now; None: try
        every message now (`postroom queue flush`)."""
        self.scheduler.wake(queue_id)

    # -- what SMTP sessions call for local recipients ---------------------------------

    async def delivered(
        self, envelope: Envelope, recipients: list[tuple[Recipient, int]], original: bytes | Path
    ) -> None:
        """Queue the success reports (RFC 3464) that local recipients asked for with
        NOTIFY=SUCCESS (RFC 3461 4.1), ORCPT kept: "delivered", or "expanded" for an
        alias that reached several mailboxes. The mail is already filed, so a report
        that cannot be queued is only logged."""
        now = time.time()
        by_action: dict[Action, list[tuple[Recipient, DeliveryResult]]] = {}
        for recipient, mailboxes in recipients:
            recipient.state, recipient.done_at = "delivered", now
            text = "delivered to maildir" + (f" ({mailboxes})" if mailboxes > 1 else "")
            result = DeliveryResult(recipient.address, "delivered", "2.0.0", text,
                                    expanded=mailboxes > 1)
            by_action.setdefault("expanded" if mailboxes > 1 else "delivered", []).append(
                (recipient, result)
            )
        about = dataclasses.replace(envelope, recipients=[r for r, _ in recipients])
        for action, items in by_action.items():
            try:
                report = Report(about, items, action, self._hostname, now)
                notice = await asyncio.to_thread(
                    queue_dsn, self.queue, report, original,
                    sign=self.signer.sign if self.signer is not None else None)
            except (OSError, QueueError) as e:
                log.error("%s: cannot queue the %s notice: %s", envelope.queue_id, action, e)
                continue
            if notice is not None:
                log.info("%s: sender success notification: %s", envelope.queue_id,
                         notice.queue_id)
                self.queued(notice)

    # -- what the scheduler calls ---------------------------------------------------

    async def deliver(
        self, envelope: Envelope, recipients: list[Recipient], content: Content
    ) -> list[DeliveryResult]:
        """One attempt for these recipients: local ones to Maildir, others by SMTP."""
        local: list[int] = []
        remote: list[int] = []
        recipients = list(recipients)
        for i, recipient in enumerate(recipients):
            try:
                domain = domain_of(recipient.address)
            except ValueError:
                domain = ""
            is_local = bool(domain) and self._is_local_domain(domain)
            if is_local and is_srs(recipient.address.rpartition("@")[0]):
                # A report of ours about mail we forwarded (server.forwarding): it goes
                # on to the original sender, as a bounce from outside would.
                try:
                    recipients[i] = dataclasses.replace(
                        recipient, address=self.forwarding.srs.reverse(recipient.address))
                    is_local = False
                except SRSError:
                    pass  # the local courier says there is no such user
            (local if is_local else remote).append(i)
        results: dict[int, DeliveryResult] = {}

        remote_seconds: list[float] = []

        async def run(courier: LocalCourier | RemoteCourier, indexes: list[int]) -> None:
            began = time.monotonic()
            done = await courier.deliver(envelope, [recipients[i] for i in indexes], content)
            results.update(zip(indexes, done, strict=True))
            if courier is self.remote:
                remote_seconds.append(time.monotonic() - began)

        await gather_few([run(courier, indexes)
                          for courier, indexes in ((self.local, local), (self.remote, remote))
                          if indexes])
        ordered = [results[i] for i in range(len(recipients))]
        metrics.recorder.relay_attempt(
            outcome_counts(ordered, set(remote)), remote_seconds[0] if remote_seconds else None)
        return ordered

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._notify_primary is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self.scheduler.run())
            if isinstance(self.queue, PGQueueStore):  # a dead node's mail, free to take
                def take_free() -> None:
                    loop.call_soon_threadsafe(self.scheduler.rescan)

                self.queue.on_free = take_free

    def rescan(self) -> None:
        """Read the whole queue folder again (the control socket's "rescan")."""
        self.scheduler.rescan()

    def recover(self) -> None:
        """A worker's notifications may have been lost (SIGUSR1, server/workers.py): look
        for the messages the scheduler has not heard of."""
        self.scheduler.recover()

    async def hand_over(self, successor: Relay) -> None:
        """A reload made `successor` (server.reload): this relay's scheduler stops once its
        deliveries in flight have finished, and what sessions still holding this relay
        queue wakes the successor's. `stop` closes the rest when those sessions end."""
        self._notify_primary = successor.wake
        self.scheduler.stop()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # noqa: BLE001 - logged; the successor takes over anyway
                log.exception("queue: scheduler failed while handing over")
            self._task = None

    async def stop(self) -> None:
        """Start nothing new; let deliveries in flight finish; close idle SMTP sessions."""
        self.scheduler.stop()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # noqa: BLE001 - logged; stopping must go on
                log.exception("queue: scheduler failed while stopping")
        await self.remote.close()
        self._batcher.close()
        if isinstance(self.queue, PGQueueStore):
            self.queue.close()
