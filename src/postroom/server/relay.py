"""The relay as one service of the server: the durable queue, its scheduler and the couriers.

Submission hands mail for other hosts to `Relay.add` (durable before the
250), then `wake`s it. The scheduler (postroom.queue) owns time and retries;
it asks `deliver` to try a group of recipients once, and `deliver` sends each
recipient to the courier for its domain: local domains to the Maildir courier
(bounces to our own users, `postroom sendmail` mail), all others to the SMTP
courier, which finds the next hop (static route, MX, implicit MX).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from postroom.addresses import domain_of
from postroom.config import Config
from postroom.delivery.local import LocalCourier
from postroom.delivery.outcome import DeliveryResult
from postroom.delivery.remote import RemoteCourier
from postroom.delivery.routing import Router
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.scheduler import Scheduler
from postroom.queue.store import QueueStore
from postroom.store.maildir import MailStore
from postroom.store.users import Expansion

log = logging.getLogger("postroom.relay")


def client_tls_context() -> ssl.SSLContext:
    """TLS for outgoing SMTP: opportunistic, as RFC 3207 4.1 and Postfix's "may" level
    use it: it encrypts against passive listeners; without DANE or MTA-STS there is
    no name to verify the next hop's certificate against."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _QueueBatcher:
    """One thread that queues messages in batches (QueueStore.add_many): the same
    group commit as server/committer.py does for Maildirs, for the queue's four
    syncs per message (message, its folder, envelope, its folder)."""

    def __init__(self, store: QueueStore) -> None:
        self._store = store
        self._jobs: list[tuple[Envelope, Iterable[bytes], asyncio.AbstractEventLoop,
                               asyncio.Future[None]]] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    async def add(self, envelope: Envelope, chunks: Iterable[bytes]) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._ready:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="postroom-queue",
                                                daemon=True)
                self._thread.start()
            self._jobs.append((envelope, chunks, loop, future))
            self._ready.notify()
        await future

    def close(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._stopping:
                    self._ready.wait()
                batch, self._jobs = self._jobs, []
                if not batch and self._stopping:
                    return
            try:
                errors = self._store.add_many([(env, chunks) for env, chunks, _l, _f in batch])
            except OSError as exc:  # the folder itself failed (fsync, lock)
                errors = [exc] * len(batch)
            for (_env, _chunks, loop, future), error in zip(batch, errors, strict=True):
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(_settle, future, error)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class Relay:
    """Queue + scheduler + couriers; `add`/`wake` are what SMTP sessions call."""

    def __init__(
        self,
        config: Config,
        store: MailStore,
        is_local_domain: Callable[[str], bool],
        expand: Callable[[str], Expansion | None],
        *,
        notify_primary: Callable[[str], None] | None = None,
    ) -> None:
        """`notify_primary`: set in a worker process, whose relay only queues; the
        primary process's scheduler delivers, told of each new queue ID by this."""
        self._is_local_domain = is_local_domain
        self._notify_primary = notify_primary
        self.queue = QueueStore(config.queue_dir)
        own = []
        for endpoint in config.listen.enabled().values():
            try:
                own.append((str(ipaddress.ip_address(endpoint.host)), endpoint.port))
            except ValueError:
                continue  # a host name: the router compares addresses only
        self.router = Router(
            config.routes,
            config.dns.nameservers,
            config.relay.mx_port,
            is_local_domain,
            own_hostname=config.hostname,
            own_endpoints=own,
        )
        # Keep as many idle sessions per destination as may deliver to it at once:
        # a new session costs a TCP and a TLS handshake and two EHLOs.
        self.remote = RemoteCourier(
            self.router, config.hostname, client_tls_context(),
            command_timeout=config.smtp.command_timeout,
            max_idle_sessions_per_domain=config.queue.max_per_destination,
        )
        self.local = LocalCourier(store, expand)
        self.scheduler = Scheduler(
            self.queue, self.deliver, config,
            bounce_sender_hostname=config.hostname,
            max_per_destination=config.queue.max_per_destination,
            delay_warning_after=config.queue.delay_warning_after or None,
        )
        self._task: asyncio.Task[None] | None = None
        self._batcher = _QueueBatcher(self.queue)

    # -- what SMTP sessions call (server.smtp.Outbound) --------------------------

    async def add(self, envelope: Envelope, chunks: Iterable[bytes]) -> None:
        """Queue durably, batched with whatever other sessions queue meanwhile.
        `chunks` is iterated in the queue thread (it may read a spool file)."""
        await self._batcher.add(envelope, chunks)

    def wake(self, queue_id: str) -> None:
        if self._notify_primary is not None:
            self._notify_primary(queue_id)
        else:
            self.scheduler.wake(queue_id)

    # -- what the scheduler calls ---------------------------------------------------

    async def deliver(
        self, envelope: Envelope, recipients: list[Recipient], message_path: Path
    ) -> list[DeliveryResult]:
        """One attempt for these recipients: local ones to Maildir, others by SMTP."""
        local: list[int] = []
        remote: list[int] = []
        for i, recipient in enumerate(recipients):
            try:
                domain = domain_of(recipient.address)
            except ValueError:
                domain = ""
            (local if domain and self._is_local_domain(domain) else remote).append(i)
        results: dict[int, DeliveryResult] = {}

        async def run(courier: LocalCourier | RemoteCourier, indexes: list[int]) -> None:
            if indexes:
                done = await courier.deliver(envelope, [recipients[i] for i in indexes],
                                             message_path)
                results.update(zip(indexes, done, strict=True))

        await asyncio.gather(run(self.local, local), run(self.remote, remote))
        return [results[i] for i in range(len(recipients))]

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._notify_primary is None:
            self._task = asyncio.get_running_loop().create_task(self.scheduler.run())

    def rescan(self) -> None:
        """The CLI or `postroom sendmail` changed the queue folder (SIGUSR1)."""
        self.scheduler.rescan()

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
