"""`postroom serve`: builds the service graph from a Config, binds listeners, runs until SIGTERM.

Start-up problems a person can fix (a port already in use, an unreadable
certificate, another server on the same data folder) become one-line
`ConfigError`s naming the config key; the CLI prints them without a
traceback. SIGTERM and SIGINT stop accepting new connections, let
transactions in progress finish (up to a grace period), tell idle clients 421
and exit 0. SIGHUP reloads the configuration (server.reload); workers that die
are started again (server.supervisor).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gc
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from postroom.config import Config, ConfigError
from postroom.control import (
    CONTROL_SOCKET,
    PID_FILE,
    AlreadyRunning,
    ServerLock,
    serve_control,
)
from postroom.defense import anvil
from postroom.defense.gate import build_defense, limits_of
from postroom.server import heap, metrics, notify, privileges
from postroom.server.acceptor import DeferredServer
from postroom.server.acme import CertificateKeeper
from postroom.server.descriptors import Descriptors, raise_open_files_limit
from postroom.server.endpoint import serve_endpoint
from postroom.server.journal import JournalFormatter, under_journal
from postroom.server.passwords import PasswordChecks
from postroom.server.relay import Relay
from postroom.server.reload import Reloader, Switch, finish_sessions
from postroom.server.services import (
    IMPLICIT_TLS,
    SUBMISSION_LISTENERS,
    build_services,
    out_of_descriptors,
    session_factory,
)
from postroom.server.session import Service
from postroom.server.supervisor import RETIRE_SIGNAL, RETIRED, Supervisor, fork_from_loop
from postroom.server.tls import CertificateHolder
from postroom.server.workers import (
    WakeChannel,
    fork_workers,
    reap_children,
    signal_children,
    worker_count,
)
from postroom.store.api import Mailboxes, PasswordGate, Store
from postroom.store.factory import open_store
from postroom.tlscert import TLSFileError, ensure_certificate

log = logging.getLogger("postroom.master")

# Connections the kernel completes and holds for each listener until a process
# accepts them (listen(2)'s backlog). One postroom process serves many sessions
# on one event loop, and a burst waits here for the loop's next turn: a full
# queue drops SYNs (a second's delay each) and, once SYN cookies are in play,
# drops handshakes whose clients then wait for a greeting that never comes. So
# this asks for the most a backlog can be (a 16-bit count on older kernels) and
# the kernel silently caps it at the sysctl net.core.somaxconn (4096 by default
# since Linux 5.4), as Go's net package listens with somaxconn. Postfix asks for
# its process limit (100 by default: master_listen.c), each smtpd taking one client.
LISTEN_BACKLOG = 65535

# How long SIGTERM waits for transactions in progress before closing them.
DRAIN_GRACE_SECONDS = 30.0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# SIGHUP: reload (server.reload); SIGUSR1: rescan the queue folder; RETIRE_SIGNAL: a
# worker of a previous config finishes its sessions and exits (server.supervisor).
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1, RETIRE_SIGNAL)
# How often the mailboxes are swept for what killed deliveries left (Maildir tmp/
# folders), after the sweep at start (Dovecot's MAILDIR_TMP_SCAN_SECS is 8 hours too).
MAILBOX_SWEEP_SECONDS = 8 * 3600.0


# Log output to a file or pipe is buffered and flushed this often (not a write(2) a line).
LOG_FLUSH_SECONDS = 0.2
LOG_TIME = "%Y-%m-%dT%H:%M:%S"  # local time, as logging's %(asctime)s shows it


class BufferedLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler whose emit() leaves the line in the stream's buffer: flush() is
    called every LOG_FLUSH_SECONDS and at exit (logging.shutdown), not after each record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:  # pragma: no cover - as logging.StreamHandler does
            raise
        except Exception:  # noqa: BLE001 - a log line must never stop the server
            self.handleError(record)


class LineFormatter(logging.Formatter):
    """"TIME NAME[PID]: MESSAGE", the time text made once a second, not once a line;
    records with an exception or a stack are left to logging.Formatter."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s[%(process)d]: %(message)s", LOG_TIME)
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        second = int(record.created)
        if second != self._second:  # emit() holds the handler's lock: one thread here
            self._stamp = time.strftime(LOG_TIME, self.converter(second))
            self._second = second
        return f"{self._stamp} {record.name}[{record.process}]: {record.getMessage()}"


def setup_logging() -> logging.Handler:
    """One line per event on standard error, Postfix-like: time, program, text; at once
    on a terminal, buffered (see LOG_FLUSH_SECONDS) to a file or pipe."""
    # The format shows no source line, thread or process name: skip collecting them
    # (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = logging.StreamHandler(sys.stderr)
    else:
        stream = open(  # noqa: SIM115 - lives as long as the process
            sys.stderr.fileno(), "w", buffering=256 * 1024, encoding="utf-8",
            errors="backslashreplace", closefd=False,
        )
        handler = BufferedLogHandler(stream)
    # Under systemd the journal stamps the lines (hook: server.journal).
    handler.setFormatter(JournalFormatter() if under_journal() else LineFormatter())
    root = logging.getLogger("postroom")
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("POSTROOM_LOG_LEVEL", "INFO").upper())
    root.propagate = False
    return handler


async def every(seconds: float, job: Callable[[], Awaitable[object] | object]) -> None:
    """Run `job` every `seconds` (awaiting what it returns, if anything) until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        done = job()
        if inspect.isawaitable(done):
            await done


def install_event_loop_policy() -> str:
    """uvloop when installed: the same asyncio API on libuv, noticeably faster."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def bind(host: str, port: int, key: str, config: Config, section: str = "listen."
         ) -> socket.socket:
    """A listening socket, or a ConfigError that names the key (port in use, bad address)."""
    where = config.source
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{where}: {section}{key}: cannot resolve {host!r}: {exc}") from exc
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use (is another server running?)"
        elif exc.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        else:
            reason = exc.strerror or str(exc)
        raise ConfigError(f"{where}: {section}{key}: cannot listen on {host}:{port}: {reason}") \
            from exc
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


@dataclass
class Running:
    """A started postroom: its listening servers and the services behind them."""

    config: Config
    servers: dict[str, asyncio.base_events.Server | DeferredServer]
    services: dict[str, Service]
    relay: Relay
    store: Store
    password_checks: PasswordChecks
    descriptors: Descriptors
    sweeper: asyncio.Task[None] | None = None  # the primary's periodic tmp/ sweep
    counts: anvil.Link | None = None  # the counts shared by all processes (defense.anvil)
    certificates: CertificateHolder | None = None  # the listeners' TLS (server.tls)
    acme: CertificateKeeper | None = None  # the primary's, with [tls] acme
    endpoint: asyncio.base_events.Server | None = None  # the primary's, with [metrics] listen
    # What each listener's server calls per connection; a reload re-points them.
    switches: dict[str, Switch] = field(default_factory=dict)
    sockets: list[tuple[str, socket.socket]] = field(default_factory=list)  # by listener
    replaced_by: Running | None = None  # set by a reload (server.reload)

    def successor(self, config: Config, servers: dict[str, asyncio.base_events.Server |
                  DeferredServer], switches: dict[str, Switch], services: dict[str, Service],
                  relay: Relay, store: Store, sockets: list[tuple[str, socket.socket]],
                  certificates: CertificateHolder) -> Running:
        """The Running of a reloaded config (server.reload): same descriptors, password
        checks, shared counts, ACME keeper and metrics endpoint; the mailbox sweep moves
        to the new store."""
        sweeper = None
        if self.sweeper is not None:
            self.sweeper.cancel()
            sweep = functools.partial(sweep_mailboxes, store.mailboxes)
            sweeper = asyncio.get_running_loop().create_task(every(MAILBOX_SWEEP_SECONDS, sweep))
        self.replaced_by = Running(
            config, servers, services, relay, store, self.password_checks, self.descriptors,
            sweeper, counts=self.counts, certificates=certificates, acme=self.acme,
            endpoint=self.endpoint, switches=switches, sockets=sockets)
        return self.replaced_by

    def newest(self) -> Running:
        """The Running in force: this one, or the one that a reload put in its place
        (for what outlives a reload holding the first: the metrics endpoint)."""
        running = self
        while running.replaced_by is not None:
            running = running.replaced_by
        return running

    def address(self, listener: str) -> tuple[str, int]:
        """The bound (host, port) of a listener: tests bind port 0 and ask here."""
        sock = self.servers[listener].sockets[0]
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    def reload_certificate(self) -> bool:
        """Read tls.cert and tls.key again: new handshakes on every listener of this
        process get the new pair, sessions already encrypted keep theirs. False (and
        the pair in use kept) when the files cannot be used."""
        return self.certificates is not None and self.certificates.reload_certificate()

    async def stop(self, grace: float = DRAIN_GRACE_SECONDS) -> None:
        """Stop accepting, let transactions finish (up to `grace`), close the rest."""
        log.info("stopping: no new connections; waiting for transactions in progress")
        for server in self.servers.values():
            server.close()
        if self.acme is not None:
            await self.acme.stop()
        if self.endpoint is not None:
            self.endpoint.close()
        await asyncio.gather(*(drain(service, grace) for service in self.services.values()))
        if self.sweeper is not None:
            self.sweeper.cancel()
        await self.relay.stop()
        await self.store.stop()
        self.store.close()
        self.descriptors.close()
        self.password_checks.close()
        if self.counts is not None:
            self.counts.close()
        log.info("stopped")


def load_tls(config: Config) -> CertificateHolder:
    """The listeners' certificate, the self-signed pair made first if it is due; else a
    one-line ConfigError naming tls.cert or tls.key, the file and the fault."""
    cert, key = config.tls.cert, config.tls.key
    try:
        if config.tls.generate and ensure_certificate(cert, key, config.hostname):
            log.info("made a self-signed certificate for %s in %s", config.hostname, cert)
        return CertificateHolder(cert, key)
    except TLSFileError as e:
        raise ConfigError(f"{config.source}: tls.{e.setting}: {e}") from None


def bind_challenge(config: Config) -> socket.socket:
    """The ACME HTTP-01 challenge listener's socket ([tls] acme must be set)."""
    assert config.tls.acme is not None
    endpoint = config.tls.acme.challenge_listen
    return bind(endpoint.host, endpoint.port, "tls.acme.challenge_listen", config,
                section="")


def bind_metrics(config: Config) -> socket.socket:
    """The metrics endpoint's socket ([metrics] listen must be set)."""
    endpoint = config.metrics.listen
    assert endpoint is not None
    return bind(endpoint.host, endpoint.port, "metrics.listen", config, section="")


def bind_listeners(config: Config) -> list[tuple[str, socket.socket]]:
    """Every configured listener's socket, bound and listening (ConfigError otherwise)."""
    sockets: list[tuple[str, socket.socket]] = []
    try:
        for key_name, endpoint in config.listen.enabled().items():
            sockets.append((key_name, bind(endpoint.host, endpoint.port, key_name, config)))
    except ConfigError:
        for _name, sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise ConfigError(f"{config.source}: listen: no listener to serve; set listen.smtp")
    return sockets


@dataclass(frozen=True)
class Process:
    """This process's part in a running server (server.workers). The default is one
    process alone that binds its own listeners, as the tests and the demo run it."""

    sockets: list[tuple[str, socket.socket]] | None = None  # bound once, before the fork
    worker: bool = False  # a worker queues mail and tells the primary, which relays it
    channel: WakeChannel | None = None  # how a worker tells the primary (server.workers)
    children: tuple[int, ...] = ()  # the primary's workers, stopped with it
    lock: ServerLock | None = None  # the primary's: it answers on its control socket
    password_checks: PasswordChecks | None = None  # made before the fork: one bound for all
    acme_socket: socket.socket | None = None  # the primary's ACME challenge listener
    metrics_socket: socket.socket | None = None  # the primary's metrics endpoint
    log_handler: logging.Handler | None = None  # flushed every LOG_FLUSH_SECONDS
    # The counts all processes share (defense.anvil): the primary's listening socket,
    # made before the fork, and its address, which the workers connect to.
    anvil_listener: socket.socket | None = None
    anvil_address: str | bytes | None = None
    # The primary's: fork a worker for (config, sockets) from its running loop; its pid.
    spawn: Callable[[Config, list[tuple[str, socket.socket]]], int] | None = None

    @property
    def accept_last(self) -> tuple[str, ...]:
        """Listeners that take only what other processes leave waiting (server.acceptor):
        with workers, the primary relays what they queue and takes submission last."""
        return SUBMISSION_LISTENERS if not self.worker and self.children else ()


async def start(config: Config, process: Process = Process()) -> Running:
    """Start accepting connections on the process's sockets (bound here when not given)."""
    certificates = load_tls(config)
    tls_context = certificates.context
    sockets = process.sockets if process.sockets is not None else bind_listeners(config)
    checks = process.password_checks or PasswordChecks()
    store = open_store_or_say(config, password_gate=checks.check)
    store.start()  # the backend's background work (PostgreSQL: change notices, leases)
    primary = not process.worker
    notify = process.channel.send if process.worker and process.channel else None
    if primary:
        # The primary alone sweeps the mailboxes (the workers share them): once now,
        # then every MAILBOX_SWEEP_SECONDS.
        await sweep_mailboxes(store.mailboxes)
    relay = Relay(config, store.mailboxes, store.directory.is_local_domain,
                  store.directory.expand, notify_primary=notify)
    counts = anvil.link(limits_of(config.limits, config.pop3.auth_failure_delay),
                        process.anvil_listener, process.anvil_address)
    services = build_services(config, [name for name, _sock in sockets], tls_context, store,
                              relay, build_defense(config, counts.counters))
    loop = asyncio.get_running_loop()
    descriptors = Descriptors()
    servers: dict[str, asyncio.base_events.Server | DeferredServer] = {}
    switches: dict[str, Switch] = {}
    for key_name, sock in sockets:
        service = services[key_name]
        implicit = tls_context if key_name in IMPLICIT_TLS else None
        factory = switches[key_name] = Switch(session_factory(service, implicit))  # reload
        descriptors.listen(key_name, sock, None if implicit else out_of_descriptors(service))
        if key_name in process.accept_last:
            servers[key_name] = DeferredServer(sock, factory, descriptors.accept_failed)
        else:
            # The loop calls listen(2) again, with its own default (100) unless told.
            servers[key_name] = await loop.create_server(factory, sock=sock,
                                                         backlog=LISTEN_BACKLOG)
        log.info("listening for %s on %s:%d%s%s", key_name, *sock.getsockname()[:2],
                 " (implicit TLS)" if implicit else "",
                 " (taking what the workers leave)" if key_name in process.accept_last else "")
    descriptors.install(loop)
    relay.start()
    sweep = functools.partial(sweep_mailboxes, store.mailboxes)
    sweeper = loop.create_task(every(MAILBOX_SWEEP_SECONDS, sweep)) if primary else None
    running = Running(config, servers, services, relay, store, checks, descriptors, sweeper,
                      counts=counts, certificates=certificates, switches=switches,
                      sockets=list(sockets))
    if primary and config.tls.acme is not None:  # ACME: the primary alone (server.acme)
        running.acme = CertificateKeeper(config, certificates.reload_certificate)
        await running.acme.start(process.acme_socket or bind_challenge(config))
    if primary and config.metrics.listen is not None:  # the endpoint: the primary alone
        metrics.enable(config.data_dir)  # done before the fork by run(); tests start here
        sock = process.metrics_socket or bind_metrics(config)
        running.endpoint = await serve_endpoint(sock, running)
        log.info("serving metrics on http://%s:%d/metrics and /health",
                 *sock.getsockname()[:2])
    return running


def open_store_or_say(config: Config, password_gate: PasswordGate | None = None) -> Store:
    """The configured store; ConfigError, one line, when it cannot be reached (a
    PostgreSQL server that is down or refuses us)."""
    try:
        return open_store(config.store, password_gate=password_gate)
    except OSError as exc:
        raise ConfigError(f"{config.source}: store.url: {exc}") from None


async def sweep_mailboxes(mailboxes: Mailboxes) -> None:
    """Remove what deliveries killed midway left (never acknowledged, so nothing lost)."""
    try:
        removed = await mailboxes.sweep()
    except OSError as exc:
        log.warning("sweeping the mailboxes failed: %s", exc)
        return
    if removed:
        log.info("removed %d file(s) that deliveries killed midway left in the mailboxes",
                 removed)


async def serve(config: Config, process: Process) -> int:
    """Run until SIGTERM/SIGINT. The primary (not a worker) also answers on the control
    socket of its lock, runs the relay scheduler, restarts workers that die
    (server.supervisor), reloads on SIGHUP (server.reload), and at the end stops the
    workers and waits for them. A worker retires on RETIRE_SIGNAL: it stops accepting
    and exits once its sessions have ended."""
    loop = asyncio.get_running_loop()
    handler = process.log_handler
    flusher = (loop.create_task(every(LOG_FLUSH_SECONDS, handler.flush))
               if handler is not None else None)
    running = await start(config, process)
    primary = not process.worker
    supervisor = (Supervisor(process.children, functools.partial(process.spawn, config,
                                                                 running.sockets))
                  if primary and process.spawn is not None else None)
    reloader = Reloader(running, running.sockets, process.accept_last,
                        _replace_workers(supervisor, process) if supervisor else None)
    if process.channel is not None and primary:
        def from_worker(message: str) -> None:
            word, _, pid = message.partition(" ")
            if word == RETIRED and supervisor is not None and pid.isdigit():
                supervisor.stopped_accepting(int(pid))
            else:  # a queue ID
                reloader.running.relay.wake(message)

        process.channel.listen(loop.add_reader, from_worker)
    stop = asyncio.Event()
    retire = asyncio.Event()  # a worker of a previous config (server.supervisor)

    def stop_on(sig: signal.Signals) -> None:
        stop.set()

    reloads: set[asyncio.Task[str | None]] = set()

    def reload_on_hup() -> None:
        if not stop.is_set():
            log.info("SIGHUP: reloading the configuration")
            task = loop.create_task(reloader.reload())
            reloads.add(task)  # a strong reference until it is done
            task.add_done_callback(reloads.discard)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop_on, sig)
    if primary:
        loop.add_signal_handler(signal.SIGHUP, reload_on_hup)
    else:  # the primary reloads and replaces its workers; a worker has nothing to do
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        def retire_on() -> None:
            retire.set()
            stop.set()

        loop.add_signal_handler(RETIRE_SIGNAL, retire_on)
    control: asyncio.AbstractServer | None = None
    # A worker whose channel to the primary is full (server.workers) signals it.
    loop.add_signal_handler(signal.SIGUSR1,
                            (lambda: reloader.running.relay.recover()) if primary else lambda: None)
    if supervisor is not None:
        supervisor.install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # held back by run()
    if primary:
        if process.lock is not None:  # `postroom queue` and `postroom sendmail` ask here
            control = await serve_control(
                process.lock, lambda: reloader.running.relay.rescan(), stop.is_set,
                lambda queue_id: reloader.running.relay.wake(queue_id), reload=reloader.reload)
        log.info("postroom ready: hostname=%s, data=%s, processes=%d", config.hostname,
                 config.data_dir, 1 + len(process.children))
        notify.ready(f"serving: {', '.join(running.servers)}")
    try:
        await stop.wait()
        if retire.is_set():
            await _retire_worker(reloader.running, process.channel)
            return 0
        if primary:
            notify.stopping()
        stopping = [reloader.stop(), reloader.running.stop()]
        if supervisor is not None:
            stopping.append(supervisor.stop(signal.SIGTERM))
        else:
            signal_children(process.children, signal.SIGTERM)
        await asyncio.gather(*stopping)
        if process.children and supervisor is None:
            await asyncio.to_thread(reap_children, process.children)
    finally:
        if control is not None:
            control.close()
        if flusher is not None:
            flusher.cancel()
    return 0


def _replace_workers(supervisor: Supervisor, process: Process,
                     ) -> Callable[[Config, list[tuple[str, socket.socket]]], Awaitable[None]]:
    """What a reload does to the workers: new ones with the new config, the old retire."""
    spawn = process.spawn
    assert spawn is not None

    async def replace(config: Config, sockets: list[tuple[str, socket.socket]]) -> None:
        supervisor.set_spawn(functools.partial(spawn, config, sockets))
        await supervisor.replace(worker_count(config.workers) - 1)

    return replace


async def _retire_worker(running: Running, channel: WakeChannel | None) -> None:
    """A worker of a previous config: stop accepting (and tell the primary), let every
    session end as it would (a SIGTERM meanwhile drains them as a stop does), then exit."""
    for server in running.servers.values():
        server.close()
    if channel is not None:
        channel.send(f"{RETIRED} {os.getpid()}")
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, interrupted.set)
    if not await finish_sessions(running.services.values(), interrupted):
        await asyncio.gather(*(drain(service) for service in running.services.values()))
    await running.relay.stop()
    running.store.close()
    running.descriptors.close()
    running.password_checks.close()


async def drain(service: Service, grace: float = DRAIN_GRACE_SECONDS) -> None:
    """Let transactions (SMTP) and Update states (POP3) finish, then close the rest."""
    service.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while any(s.busy for s in service.sessions) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for session in list(service.sessions):
        session.close_for_shutdown()
    while service.sessions and loop.time() < deadline + 5:
        await asyncio.sleep(0.05)


def run(config: Config, user: str | None = None) -> int:
    """Entry point of `postroom serve`: one per data folder (control.ServerLock).
    Started as root, it runs as `user` (or [run] user) once bound (server.privileges)."""
    account = privileges.resolve(config, user)
    # Checked first, in this process, before any worker is forked: a certificate
    # that cannot be used stops the start with the one line of a ConfigError.
    load_tls(config)
    if config.store.url:  # reached before forking: a server that is down is one line
        open_store_or_say(config).close()
    handler = setup_logging()
    try:
        lock = ServerLock.acquire(config.data_dir)
    except AlreadyRunning as exc:
        raise ConfigError(str(exc)) from None
    with lock:  # until the last delivery of the drain has ended
        return _run_locked(config, handler, lock, account)


def _switch_user(config: Config, account: privileges.Account | None) -> None:
    """After binding: become the unprivileged account, or say why root stays root."""
    if account is None:
        if os.geteuid() == 0:
            log.warning("running as root: run.user is root (not recommended)")
        return
    privileges.give([config.data_dir / PID_FILE, config.data_dir / CONTROL_SOCKET], account)
    privileges.drop(account)
    privileges.check(config, account)
    log.info("listeners bound; now running as %s (uid %d, gid %d)", account.owner,
             account.uid, account.gid)


def _run_locked(config: Config, handler: logging.Handler, lock: ServerLock,
                account: privileges.Account | None = None) -> int:
    flavour = install_event_loop_policy()
    processes = worker_count(config.workers)
    log.info("starting postroom (event loop: %s, processes: %d)", flavour, processes)
    # Raised once, before forking: every process inherits the limit.
    log.info("open files limit: %d", raise_open_files_limit())
    heap.fix_thresholds()  # and the malloc thresholds (server.heap)
    # Until serve() handles them, these signals wait (pending): by default each would
    # end the process at once, with no drain and no log line. The workers inherit this.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    # Bound once, before forking: every process accepts on the same sockets.
    sockets = bind_listeners(config)
    acme_socket = bind_challenge(config) if config.tls.acme is not None else None
    metrics_socket = bind_metrics(config) if config.metrics.listen is not None else None
    _switch_user(config, account)  # hook: server.privileges
    if metrics_socket is not None:
        # Before the fork, as the server's user: every process counts into files of
        # its own in this folder.
        metrics.enable(config.data_dir)
    channel = WakeChannel() if processes > 1 else None
    checks = PasswordChecks()  # one bound for every process (server/passwords.py)
    counts = anvil.listen() if processes > 1 else None  # one Anvil for every process
    counts_at = counts.getsockname() if counts is not None else None
    handler.flush()  # or the children would write the parent's buffered lines again

    def worker_main(config: Config, sockets: list[tuple[str, socket.socket]],
                    ) -> Callable[[], int]:
        def child() -> int:
            lock.in_worker()
            for primary_only in (counts, acme_socket, metrics_socket):
                if primary_only is not None:
                    primary_only.close()  # the primary's to answer on
            privileges.drop_bind_capability()
            os.environ.pop(notify.NOTIFY_ENV, None)  # the primary alone talks to systemd
            # The parent forwards SIGTERM/SIGINT; a terminal's Ctrl-C reaches the whole
            # process group, and draining twice is harmless.
            return asyncio.run(serve(config, Process(sockets, worker=True, channel=channel,
                                                     password_checks=checks,
                                                     log_handler=handler,
                                                     anvil_address=counts_at)))
        return child

    def spawn(config: Config, sockets: list[tuple[str, socket.socket]]) -> int:
        """A worker forked later, from the running primary (server.supervisor)."""
        keep = [sock.fileno() for _name, sock in sockets] + [lock.fileno()]
        if channel is not None:
            keep.append(channel.worker_end.fileno())
        return fork_from_loop(keep, worker_main(config, sockets), HANDLED_SIGNALS,
                              handler.flush)

    # What exists by now (modules, configuration, certificates) lives as long as
    # the process: frozen, the cyclic collector's full passes stop walking it
    # again and again under load, and the forked workers keep sharing those
    # pages instead of copying each one the collector touches.
    gc.collect()
    gc.freeze()
    children = fork_workers(processes - 1, sockets, worker_main(config, sockets))
    try:
        return asyncio.run(serve(config, Process(sockets, channel=channel,
                                                 children=tuple(children), lock=lock,
                                                 password_checks=checks, log_handler=handler,
                                                 anvil_listener=counts,
                                                 acme_socket=acme_socket,
                                                 metrics_socket=metrics_socket,
                                                 spawn=spawn if processes > 1 else None)))
    except KeyboardInterrupt:
        return 130
    finally:
        handler.flush()
