"""Reload without downtime: SIGHUP or `postroom reload` puts a new config in force for new sessions.

In the primary, a reload
1. reads the config file again and checks it as a start does: the same
   one-line ConfigError for a bad key, an unusable certificate, a postmaster
   outside the local domains or a port that cannot be bound. Refused, it
   changes nothing: the config in force stays, every listener stays open;
2. binds the listeners the new config adds or moves (those it keeps are the
   same sockets: no connection is refused meanwhile);
3. builds the services again (certificate, user directory, domains, aliases,
   relay) and points each listener's Switch at them, so the next connection
   gets the new config; listeners the config dropped stop accepting;
4. starts the workers of the new config (server.supervisor) and tells the
   old ones to retire: they stop accepting and exit when their last session
   ends;
5. keeps the old services until their last session has ended, so sessions
   in progress finish under the config they started with. The old relay's
   scheduler stops first (its deliveries in flight finish) and the new one
   starts then: one scheduler delivers at a time.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from postroom.canonical import domain_of
from postroom.config import Config, ConfigError, load_config
from postroom.defense.gate import build_defense, limits_of
from postroom.server import notify
from postroom.server.acceptor import DeferredServer
from postroom.server.acme import acme_request
from postroom.server.relay import Relay
from postroom.server.services import (
    IMPLICIT_TLS,
    build_services,
    out_of_descriptors,
    session_factory,
)
from postroom.server.session import Service
from postroom.server.stream import Stream
from postroom.store.factory import open_store

if TYPE_CHECKING:
    from postroom.server.main import Running

log = logging.getLogger("postroom.master")

# How often a retiring generation looks whether its last session has ended.
FINISH_POLL_SECONDS = 0.1

Sockets = list[tuple[str, socket.socket]]


class Switch:
    """The protocol factory a listener's server calls for each connection; a reload points
    it at the new config's services (sessions already made keep theirs)."""

    __slots__ = ("factory",)

    def __init__(self, factory: Callable[[], Stream]) -> None:
        self.factory = factory

    def __call__(self) -> Stream:
        return self.factory()


async def finish_sessions(services: Iterable[Service], interrupted: asyncio.Event) -> bool:
    """Wait until every session of `services` has ended as it would have (no 421):
    True, or False as soon as `interrupted` is set (a stop: then drain them)."""
    services = list(services)
    while any(service.sessions for service in services):
        if interrupted.is_set():
            return False
        try:
            await asyncio.wait_for(interrupted.wait(), FINISH_POLL_SECONDS)
        except TimeoutError:
            pass
    return True


def check_postmaster(config: Config, has_domain: Callable[[str], bool]) -> None:
    """As `postroom serve` checks at start: postmaster's mail must have a mailbox here."""
    admin_domain = domain_of(config.postmaster)
    if not has_domain(admin_domain):
        raise ConfigError(
            f"{config.source}: postmaster: {config.postmaster} is not in a local domain; "
            f"add the domain (postroom domain add {admin_domain}) or list it in `domains`"
        )


class Reloader:
    """The primary's config in force and how it is replaced (see the module's steps).

    `spawn_workers(config, sockets)` starts the workers of a new config and retires
    the old ones (server.supervisor); None when the primary serves alone.
    """

    def __init__(self, running: Running, sockets: Sockets, accept_last: tuple[str, ...],
                 spawn_workers: Callable[[Config, Sockets], Awaitable[None]] | None) -> None:
        self.running = running
        self.sockets = sockets
        self._accept_last = accept_last
        self._spawn_workers = spawn_workers
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._old: set[asyncio.Task[None]] = set()
        self.generation = 1

    async def reload(self) -> str | None:
        """Read and apply the config again: None when it is in force, else the one-line
        error that refused it (the old config stays)."""
        async with self._lock:
            if self._stopping.is_set():
                return "the server is stopping"
            notify.reloading()
            old = self.running.config
            try:
                config = load_config(old.data_dir, old.config_path)
                await self._apply(config)
            except ConfigError as exc:
                log.error("reload refused, the configuration in force stays: %s", exc)
                notify.ready("serving; the last reload was refused")
                return str(exc)
            self.generation += 1
            log.info("reload: configuration %d in force for new connections (%s)",
                     self.generation, config.source)
            notify.ready(f"serving configuration {self.generation}")
            return None

    async def _apply(self, config: Config) -> None:
        from postroom.server.main import LISTEN_BACKLOG, bind, load_tls

        old = self.running
        certificates = load_tls(config)
        tls = certificates.context
        kept = {endpoint: (name, sock) for (name, sock), endpoint in zip(
            self.sockets, (old.config.listen.enabled()[n] for n, _ in self.sockets),
            strict=True)}
        sockets: Sockets = []
        opened: list[socket.socket] = []
        store = None
        try:
            for name, endpoint in config.listen.enabled().items():
                if endpoint in kept:
                    sockets.append((name, kept[endpoint][1]))
                else:
                    sock = bind(endpoint.host, endpoint.port, name, config)
                    opened.append(sock)
                    sockets.append((name, sock))
            if not sockets:
                raise ConfigError(f"{config.source}: listen: no listener to serve; "
                                  "set listen.smtp")
            store = open_store(config.store, password_gate=old.password_checks.check)
            check_postmaster(config, store.users.has_domain)
        except BaseException:
            for sock in opened:
                sock.close()
            if store is not None:
                store.close()
            raise
        # From here on nothing is refused: the new config goes in force.
        relay = Relay(config, store.mailboxes, store.directory.is_local_domain,
                      store.directory.expand)
        assert old.counts is not None, "start() links every process to the counts"
        old.counts.retune(limits_of(config.limits, config.pop3.auth_failure_delay))
        defense = build_defense(config, old.counts.counters)
        services = build_services(config, [name for name, _ in sockets], tls, store, relay,
                                  defense)
        if old.acme is not None and config.tls.acme is not None:
            # The keeper (primary only) renews for the new names, into the new holder.
            old.acme.request = acme_request(config)
            old.acme.installed = certificates.reload_certificate
        loop = asyncio.get_running_loop()
        names_by_fd = {sock.fileno(): name for name, sock in self.sockets}
        servers: dict[str, asyncio.base_events.Server | DeferredServer] = {}
        switches: dict[str, Switch] = {}
        for index, (name, sock) in enumerate(sockets):
            service = services[name]
            implicit = tls if name in IMPLICIT_TLS else None
            factory = session_factory(service, implicit)
            reply = None if implicit else out_of_descriptors(service)
            was = names_by_fd.get(sock.fileno())
            if was == name:
                switches[name] = old.switches[name]
                switches[name].factory = factory
                servers[name] = old.servers[name]
                old.descriptors.listen(name, sock, reply)
                continue
            if was is not None:  # the endpoint of another listener: a copy, as that closes
                sock = sock.dup()
                sock.setblocking(False)
                sockets[index] = (name, sock)
            switches[name] = switch = Switch(factory)
            old.descriptors.listen(name, sock, reply)
            if name in self._accept_last:
                servers[name] = DeferredServer(sock, switch, old.descriptors.accept_failed)
            else:
                servers[name] = await loop.create_server(switch, sock=sock,
                                                         backlog=LISTEN_BACKLOG)
            log.info("reload: listening for %s on %s:%d", name, *sock.getsockname()[:2])
        for name, server in old.servers.items():
            if servers.get(name) is not server:
                log.info("reload: no longer listening for %s on %s:%d", name,
                         *server.sockets[0].getsockname()[:2])
                server.close()
        old_services = dict(old.services)
        self.running = old.successor(config, servers, switches, services, relay, store, sockets,
                                     certificates)
        self.sockets = sockets
        if self._spawn_workers is not None:
            await self._spawn_workers(config, sockets)
        task = loop.create_task(self._retire(old, old_services, relay))
        self._old.add(task)
        task.add_done_callback(self._old.discard)

    async def _retire(self, old: Running, services: dict[str, Service], successor: Relay,
                      ) -> None:
        """The previous config's services: the relay hands over, the sessions end, closed."""
        from postroom.server.main import drain

        await old.relay.hand_over(successor)
        if not self._stopping.is_set():
            successor.start()
        if not await finish_sessions(services.values(), self._stopping):
            await asyncio.gather(*(drain(service) for service in services.values()))
        await old.relay.stop()
        old.store.close()

    async def stop(self) -> None:
        """The server stops: previous configs' sessions are drained as the current ones."""
        self._stopping.set()
        if self._old:
            await asyncio.gather(*self._old, return_exceptions=True)
