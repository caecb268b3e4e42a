"""The services behind the listeners, built from the config; the session a connection gets."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import ssl
from collections.abc import Callable

from postroom.config import Config, postmaster_address
from postroom.defense.gate import Defense
from postroom.policy.relay import RecipientPolicy
from postroom.policy.submission import SubmissionPolicy
from postroom.protocol.pop3_server import Pop3Reply
from postroom.protocol.replies import Reply
from postroom.protocol.sasl import SUPPORTED_MECHANISMS
from postroom.protocol.smtp_server import SMTPServerConfig
from postroom.server import heap, metrics
from postroom.server.diskspace import FreeSpace
from postroom.server.limits import ConnectionLimiter
from postroom.server.mailchecks import mail_checks
from postroom.server.pop3 import POP3Service, POP3Session
from postroom.server.relay import Relay
from postroom.server.session import Service, Session, count_tls
from postroom.server.smtp import SMTPService, SMTPSession
from postroom.server.stream import Stream
from postroom.store.api import Store

log = logging.getLogger("postroom.master")

SUBMISSION_LISTENERS = ("submission", "submissions")  # RFC 6409: AUTH, then relay
IMPLICIT_TLS = ("submissions", "pop3s")  # RFC 8314: TLS from the first byte
# Allowed for the TLS handshake of an implicit-TLS listener (RFC 8314).
TLS_HANDSHAKE_SECONDS = 60.0


def build_services(config: Config, names: list[str], tls_context: ssl.SSLContext | None,
                   store: Store, relay: Relay, defense: Defense) -> dict[str, Service]:
    """The service behind each listener: SMTP ones share one connection budget, POP3
    ones another, and all of them the defences (limits and failed logins)."""
    smtp_limiter = ConnectionLimiter(
        config.smtp.max_connections, config.smtp.max_connections_per_client
    )
    pop3_limiter = ConnectionLimiter(
        config.pop3.max_connections, config.pop3.max_connections_per_client
    )
    services: dict[str, Service] = {}
    for name in names:
        if name in ("smtp", *SUBMISSION_LISTENERS):
            smtp_service = _smtp_service(name, config, tls_context, store, smtp_limiter,
                                         defense, relay)
            if name in SUBMISSION_LISTENERS:  # DKIM signing hook (postroom.mailauth.sign)
                smtp_service.dkim = relay.signer
            smtp_service.forwarding = relay.forwarding
            services[name] = smtp_service
        else:  # "pop3" (STLS) or "pop3s" (implicit TLS)
            services[name] = POP3Service(
                name=name, hostname=config.hostname, directory=store.directory,
                mailboxes=store.mailboxes, limiter=pop3_limiter, defense=defense,
                tls_context=tls_context, implicit_tls=name in IMPLICIT_TLS,
                allow_plaintext_auth=config.pop3.allow_plaintext_auth,
                idle_timeout=config.pop3.idle_timeout, apop=config.pop3.apop)
    for limiter in (smtp_limiter, pop3_limiter):
        limiter.on_stress = _stress_sessions(limiter, services)
    return services


def _smtp_service(
    name: str,
    config: Config,
    tls_context: ssl.SSLContext | None,
    store: Store,
    limiter: ConnectionLimiter,
    defense: Defense,
    relay: Relay,
) -> SMTPService:
    """The `smtp` listener (MX: local recipients only) or a submission one (AUTH, relay)."""
    smtp = config.smtp
    primary = postmaster_address(config).partition("@")[2]  # <Postmaster> (RFC 5321 4.1.1.3)
    policy = RecipientPolicy(store.directory, primary_domain=primary,
                             srs=relay.forwarding.srs)  # forwarding hook (server.forwarding)
    submission = name in SUBMISSION_LISTENERS
    core_config = SMTPServerConfig(
        hostname=config.hostname,
        max_message_size=smtp.max_message_size,
        max_recipients=smtp.max_recipients,
        max_errors=smtp.max_errors,
        bare_newline=smtp.bare_newline,
        starttls=tls_context is not None and name not in IMPLICIT_TLS,
        tls_active=name in IMPLICIT_TLS,
        # RFC 4954 4 and RFC 6409 4.3: submission requires AUTH, offered under TLS.
        auth_mechanisms=SUPPORTED_MECHANISMS if submission else (),
        auth_plaintext=smtp.allow_plaintext_auth,
        auth_required=submission,
    )
    return SMTPService(
        name=name,
        hostname=config.hostname,
        directory=store.directory,
        limiter=limiter,
        defense=defense,
        tls_context=tls_context,
        core_config=core_config,
        policy=policy,
        mailboxes=store.mailboxes,
        outbound=relay,
        free_space=FreeSpace((config.mail_dir, config.queue_dir), smtp.min_free_space),
        submission=SubmissionPolicy(policy, store.directory,
                                    smtp.check_from_header) if submission else None,
        command_timeout=smtp.command_timeout,
        data_timeout=smtp.data_timeout,
        max_received=smtp.max_received_headers,
        junk_folder=config.dmarc.junk_folder,
        checks=mail_checks(config) if name == "smtp" else None,
        milters=config.milters.for_listener(name),
        mx=name == "smtp",
    )


def _stress_sessions(limiter: ConnectionLimiter, services: dict[str, Service],
                     ) -> Callable[[], None]:
    """What `limiter` does when it reaches stress: every session it counts that waits
    for a request gets at most the stress timeout for it (server.limits)."""

    def shorten() -> None:
        limit = limiter.timeout(math.inf)  # STRESS_TIMEOUT
        for service in services.values():
            if service.limiter is limiter:
                sessions: list[Session] = list(service.sessions)
                for session in sessions:
                    session.under_stress(limit)

    return shorten


def out_of_descriptors(service: Service) -> bytes:
    """What a client that cannot be served for want of descriptors is told at once."""
    if isinstance(service, SMTPService):  # RFC 5321 3.8, RFC 3463 X.3.2
        return Reply(421, "4.3.2", f"{service.hostname} Service not available: out of "
                     "resources, try again later").to_bytes()
    return Pop3Reply(False, "out of resources, try again later", "SYS/TEMP").to_bytes()


class _SessionStream(Stream):
    """A Stream that starts its session's task as soon as the connection is made.

    On an implicit-TLS listener (RFC 8314) the stream begins TLS at once and
    the session starts when the handshake is done.
    """

    def __init__(self, service: Service, tasks: set[asyncio.Task[None]],
                 implicit_tls: ssl.SSLContext | None) -> None:
        super().__init__()
        self._service = service
        self._tasks = tasks
        self._implicit_tls = implicit_tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        metrics.recorder.connection(self._service.name)
        if self._implicit_tls is not None:
            self.begin_tls(self._implicit_tls)
        task = asyncio.get_running_loop().create_task(self._run())
        self._tasks.add(task)  # a strong reference, or the task may vanish mid-run
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        metrics.recorder.session(self._service.name, +1)
        try:
            await self._session()
        finally:
            metrics.recorder.session(self._service.name, -1)

    async def _session(self) -> None:
        if self._implicit_tls is not None:
            try:
                await self.handshake(TLS_HANDSHAKE_SECONDS)
            except (TimeoutError, ConnectionError, ssl.SSLError) as exc:
                log.debug("%s: TLS handshake failed with %s: %s", self._service.name,
                          self.get_extra_info("peername"), exc)
                self.abort()
                return
            count_tls(self._service.name, self)
        service = self._service
        if isinstance(service, SMTPService):
            await SMTPSession(service, self).run()
        else:
            assert isinstance(service, POP3Service)
            session = POP3Session(service, self)
            await session.run()
            if session.held >= heap.RELEASE_AFTER_MESSAGES:
                # The session's objects sit in reference cycles (its task, its
                # stream's callbacks): collected now, not at some later collection.
                del session
                gc.collect()
                heap.release()


def session_factory(service: Service, implicit_tls: ssl.SSLContext | None,
                    ) -> Callable[[], Stream]:
    tasks: set[asyncio.Task[None]] = set()
    return lambda: _SessionStream(service, tasks, implicit_tls)
