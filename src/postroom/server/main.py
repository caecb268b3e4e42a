"""`postroom serve`: builds the service graph from a Config, binds listeners, runs until SIGTERM.

Start-up problems a person can fix (a port already in use, an unreadable
certificate, another server on the same data folder) become one-line
`ConfigError`s naming the config key; the CLI prints them without a
traceback. SIGTERM and SIGINT stop accepting new connections, let
transactions in progress finish (up to a grace period), tell idle clients 421
and exit 0. SIGHUP does the same, with a line saying so (there is no reload).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import math
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from postroom.config import Config, ConfigError, postmaster_address
from postroom.control import AlreadyRunning, ServerLock, serve_control
from postroom.policy.auth import AuthThrottle
from postroom.policy.relay import RecipientPolicy
from postroom.policy.submission import SubmissionPolicy
from postroom.protocol.pop3_server import Pop3Reply
from postroom.protocol.replies import Reply
from postroom.protocol.sasl import SUPPORTED_MECHANISMS
from postroom.protocol.smtp_server import SMTPServerConfig
from postroom.server.acceptor import DeferredServer
from postroom.server.descriptors import Descriptors
from postroom.server.diskspace import FreeSpace
from postroom.server.limits import ConnectionLimiter
from postroom.server.passwords import PasswordChecks
from postroom.server.pop3 import POP3Service, POP3Session
from postroom.server.relay import Relay
from postroom.server.smtp import SMTPService, SMTPSession
from postroom.server.stream import Stream
from postroom.server.workers import (
    WakeChannel,
    fork_workers,
    reap_children,
    signal_children,
    worker_count,
)
from postroom.store.api import Mailboxes, Store
from postroom.store.factory import open_store
from postroom.tlscert import TLSFileError, ensure_certificate, server_context

log = logging.getLogger("postroom.master")

# The kernel's accept queue: smtp-source style bursts open many sessions at once,
# and a short queue turns them into SYN retransmits (seconds of delay each).
LISTEN_BACKLOG = 1024

# How long SIGTERM waits for transactions in progress before closing them.
DRAIN_GRACE_SECONDS = 30.0

# SIGHUP would mean "reload"; until there is one it stops the server as SIGTERM does.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGUSR1)  # SIGUSR1: rescan the queue folder
# How often the mailboxes are swept for what killed deliveries left (Maildir tmp/
# folders), after the sweep at start (Dovecot's MAILDIR_TMP_SCAN_SECS is 8 hours too).
MAILBOX_SWEEP_SECONDS = 8 * 3600.0

SUBMISSION_LISTENERS = ("submission", "submissions")  # RFC 6409: AUTH, then relay
# Allowed for the TLS handshake of an implicit-TLS listener (RFC 8314).
TLS_HANDSHAKE_SECONDS = 60.0
IMPLICIT_TLS = ("submissions", "pop3s")  # RFC 8314: TLS from the first byte


# Log output to a file or pipe is buffered and flushed this often: a write(2) per
# line was a large share of the server's time at thousands of lines a second.
LOG_FLUSH_SECONDS = 0.2
LOG_TIME = "%Y-%m-%dT%H:%M:%S"  # local time, as logging's %(asctime)s shows it


class BufferedLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler whose emit() leaves the line in the stream's buffer.

    logging.StreamHandler flushes after every record, which is a write(2) per
    line (five per message received) however large the buffer. Here flush()
    is called by `flush_logs_periodically` and at exit (logging.shutdown).
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:  # pragma: no cover - as logging.StreamHandler does
            raise
        except Exception:  # noqa: BLE001 - a log line must never stop the server
            self.handleError(record)


class LineFormatter(logging.Formatter):
    """"TIME NAME[PID]: MESSAGE", with the time text made once a second.

    logging.Formatter runs strftime for every line; a busy server writes
    thousands of lines a second, all with the same few time stamps. Records
    with an exception or a stack are left to logging.Formatter.
    """

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
    """One line per event on standard error, Postfix-like: time, program, text.

    On a terminal every line shows at once; to a file or pipe lines are
    buffered and `flush_logs_periodically` writes them out every
    LOG_FLUSH_SECONDS (and at exit).
    """
    # No record needs the caller's file and line, thread or multiprocessing name
    # (the format has none of them): skip collecting them on every call (the
    # logging HOWTO's "Optimization" section).
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
    handler.setFormatter(LineFormatter())
    root = logging.getLogger("postroom")
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("POSTROOM_LOG_LEVEL", "INFO").upper())
    root.propagate = False
    return handler


async def flush_logs_periodically(handler: logging.Handler) -> None:
    while True:
        await asyncio.sleep(LOG_FLUSH_SECONDS)
        handler.flush()


def install_event_loop_policy() -> str:
    """uvloop when installed: the same asyncio API on libuv, noticeably faster."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def build_smtp_service(
    name: str,
    config: Config,
    tls_context: ssl.SSLContext | None,
    store: Store,
    limiter: ConnectionLimiter,
    throttle: AuthThrottle,
    relay: Relay,
) -> SMTPService:
    """The `smtp` listener (MX: local recipients only) or a submission one (AUTH, relay)."""
    smtp = config.smtp
    primary = postmaster_address(config).partition("@")[2]  # <Postmaster> (RFC 5321 4.1.1.3)
    policy = RecipientPolicy(store.directory, primary_domain=primary)
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
        core_config=core_config,
        policy=policy,
        mailboxes=store.mailboxes,
        limiter=limiter,
        tls_context=tls_context,
        command_timeout=smtp.command_timeout,
        data_timeout=smtp.data_timeout,
        max_received=smtp.max_received_headers,
        submission=SubmissionPolicy(policy, store.directory,
                                    smtp.check_from_header) if submission else None,
        verify_password=store.directory.verify_password if submission else None,
        throttle=throttle,
        outbound=relay if submission else None,
        notices=relay,
        free_space=FreeSpace((config.mail_dir, config.queue_dir), smtp.min_free_space),
    )


def bind(host: str, port: int, key: str, config: Config) -> socket.socket:
    """A listening socket, or a ConfigError that names the key (port in use, bad address)."""
    where = config.source
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{where}: listen.{key}: cannot resolve {host!r}: {exc}") from exc
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
            reason = "permission denied (ports below 1024 need root)"
        else:
            reason = exc.strerror or str(exc)
        raise ConfigError(f"{where}: listen.{key}: cannot listen on {host}:{port}: {reason}") \
            from exc
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


# Anything with these is a service `drain` can stop: SMTPService, POP3Service.
AnyService = SMTPService | POP3Service


@dataclass
class Running:
    """A started postroom: its listening servers and the services behind them."""

    config: Config
    servers: dict[str, asyncio.base_events.Server | DeferredServer]
    services: dict[str, AnyService]
    relay: Relay
    store: Store
    password_checks: PasswordChecks
    descriptors: Descriptors | None = None
    sweeper: asyncio.Task[None] | None = None  # the primary's periodic tmp/ sweep

    @property
    def smtp(self) -> SMTPService:
        service = self.services["smtp"]
        assert isinstance(service, SMTPService)
        return service

    def address(self, listener: str) -> tuple[str, int]:
        """The bound (host, port) of a listener: tests bind port 0 and ask here."""
        sock = self.servers[listener].sockets[0]
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    async def stop(self, grace: float = DRAIN_GRACE_SECONDS) -> None:
        """Stop accepting, let transactions finish (up to `grace`), close the rest."""
        log.info("stopping: no new connections; waiting for transactions in progress")
        for server in self.servers.values():
            server.close()
        await asyncio.gather(*(drain(service, grace) for service in self.services.values()))
        if self.sweeper is not None:
            self.sweeper.cancel()
        await self.relay.stop()
        self.store.close()
        if self.descriptors is not None:
            self.descriptors.close()
        self.password_checks.close()
        log.info("stopped")


def tls_config_error(config: Config, error: TLSFileError) -> ConfigError:
    """A certificate or key file that cannot be used, as the config error naming it."""
    return ConfigError(f"{config.source}: tls.{error.setting}: {error}")


def prepare_certificate(config: Config) -> None:
    cert, key = config.tls.cert, config.tls.key
    try:
        made = config.tls.generate and ensure_certificate(cert, key, config.hostname)
    except TLSFileError as e:
        raise tls_config_error(config, e) from None
    if made:
        log.info("made a self-signed certificate for %s in %s", config.hostname, cert)


def load_tls(config: Config) -> ssl.SSLContext:
    """The listeners' TLS context, the self-signed pair made first if it is due.

    ConfigError, one line naming tls.cert or tls.key, the file and the fault.
    """
    prepare_certificate(config)
    try:
        return server_context(config.tls.cert, config.tls.key)
    except TLSFileError as e:
        raise tls_config_error(config, e) from None


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


async def start(
    config: Config,
    sockets: list[tuple[str, socket.socket]] | None = None,
    *,
    notify_primary: Callable[[str], None] | None = None,
    accept_last: Collection[str] = (),
    password_checks: PasswordChecks | None = None,
) -> Running:
    """Start accepting connections on `sockets` (bound here when not given).

    `notify_primary` is set in a worker process: the primary process runs the
    relay scheduler; this one only queues and tells it the new queue IDs.
    The listeners named in `accept_last` take only the connections that other
    processes leave waiting (server.acceptor). `password_checks` is made
    before the workers fork, so that its bound holds for all of them.
    """
    tls_context = load_tls(config)
    if sockets is None:
        sockets = bind_listeners(config)
    checks = password_checks or PasswordChecks()
    store = open_store(config.store, password_gate=checks.check)
    primary = notify_primary is None
    if primary:
        # The primary alone sweeps the mailboxes (the workers share them): once now,
        # then every MAILBOX_SWEEP_SECONDS.
        await sweep_mailboxes(store.mailboxes)
    relay = Relay(config, store.mailboxes, store.directory.is_local_domain,
                  store.directory.expand, notify_primary=notify_primary)
    services = _services(config, [name for name, _sock in sockets], tls_context, store, relay)
    loop = asyncio.get_running_loop()
    descriptors = Descriptors()
    servers: dict[str, asyncio.base_events.Server | DeferredServer] = {}
    for key_name, sock in sockets:
        service = services[key_name]
        implicit = tls_context if key_name in IMPLICIT_TLS else None
        factory = _session_factory(service, implicit)
        descriptors.listen(key_name, sock, None if implicit else _out_of_descriptors(service))
        if key_name in accept_last:
            servers[key_name] = DeferredServer(sock, factory,
                                               accept_failed=descriptors.accept_failed)
        else:
            servers[key_name] = await loop.create_server(factory, sock=sock)
        log.info("listening for %s on %s:%d%s%s", key_name, *sock.getsockname()[:2],
                 " (implicit TLS)" if implicit else "",
                 " (taking what the workers leave)" if key_name in accept_last else "")
    descriptors.install(loop)
    relay.start()
    sweeper = loop.create_task(sweep_mailboxes_periodically(store.mailboxes)) if primary else None
    return Running(config, servers, services, relay, store, checks, descriptors, sweeper)


def _services(config: Config, names: list[str], tls_context: ssl.SSLContext | None,
              store: Store, relay: Relay) -> dict[str, AnyService]:
    """The service behind each listener: SMTP ones share one connection budget, POP3
    ones another, and all of them the failed-login record."""
    throttle = AuthThrottle(first_delay=config.pop3.auth_failure_delay)
    smtp_limiter = ConnectionLimiter(
        config.smtp.max_connections, config.smtp.max_connections_per_client
    )
    pop3_limiter = ConnectionLimiter(
        config.pop3.max_connections, config.pop3.max_connections_per_client
    )
    services: dict[str, AnyService] = {}
    for name in names:
        if name in ("smtp", *SUBMISSION_LISTENERS):
            services[name] = build_smtp_service(name, config, tls_context, store, smtp_limiter,
                                                throttle, relay)
        else:  # "pop3" (STLS) or "pop3s" (implicit TLS)
            services[name] = POP3Service(
                name=name, hostname=config.hostname, directory=store.directory,
                mailboxes=store.mailboxes, limiter=pop3_limiter, throttle=throttle,
                tls_context=tls_context, implicit_tls=name == "pop3s",
                allow_plaintext_auth=config.pop3.allow_plaintext_auth,
                idle_timeout=config.pop3.idle_timeout, apop=config.pop3.apop)
    for limiter in (smtp_limiter, pop3_limiter):
        limiter.on_stress = _stress_sessions(limiter, services)
    return services


def _out_of_descriptors(service: AnyService) -> bytes:
    """What a client that cannot be served for want of descriptors is told at once."""
    if isinstance(service, SMTPService):  # RFC 5321 3.8, RFC 3463 X.3.2
        return Reply(421, "4.3.2", f"{service.hostname} Service not available: out of "
                     "resources, try again later").to_bytes()
    return Pop3Reply(False, "out of resources, try again later", "SYS/TEMP").to_bytes()


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


async def sweep_mailboxes_periodically(mailboxes: Mailboxes) -> None:
    while True:
        await asyncio.sleep(MAILBOX_SWEEP_SECONDS)
        await sweep_mailboxes(mailboxes)


async def serve(
    config: Config,
    log_handler: logging.Handler | None = None,
    sockets: list[tuple[str, socket.socket]] | None = None,
    *,
    worker: bool = False,
    channel: WakeChannel | None = None,
    children: list[int] | None = None,
    lock: ServerLock | None = None,
    password_checks: PasswordChecks | None = None,
) -> int:
    """Run until SIGTERM/SIGINT/SIGHUP. The primary (not `worker`) also answers on the
    control socket of `lock`, runs the relay scheduler and stops the worker children,
    then waits for them."""
    loop = asyncio.get_running_loop()
    flusher = (loop.create_task(flush_logs_periodically(log_handler))
               if log_handler is not None else None)
    notify = channel.send if (worker and channel is not None) else None
    # With workers, submission sessions go to them first: this process relays what
    # they queue (server.acceptor).
    accept_last = SUBMISSION_LISTENERS if (not worker and children) else ()
    running = await start(config, sockets, notify_primary=notify, accept_last=accept_last,
                          password_checks=password_checks)
    if channel is not None and not worker:
        channel.listen(loop.add_reader, running.relay.wake)
    stop = asyncio.Event()

    def stop_on(sig: signal.Signals) -> None:
        if sig == signal.SIGHUP and not stop.is_set():
            log.warning("SIGHUP: reloading the configuration is not supported; "
                        "stopping as for SIGTERM")
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop_on, sig)
    primary = not worker
    control: asyncio.AbstractServer | None = None
    # A worker whose channel to the primary is full (server.workers) signals it.
    loop.add_signal_handler(signal.SIGUSR1, running.relay.rescan if primary else lambda: None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # held back by run()
    if primary:
        if lock is not None:  # `postroom queue` and `postroom sendmail` ask here
            control = await serve_control(lock, running.relay.rescan, stop.is_set)
        log.info("postroom ready: hostname=%s, data=%s, processes=%d", config.hostname,
                 config.data_dir, 1 + len(children or []))
    try:
        await stop.wait()
        if children:
            signal_children(children, signal.SIGTERM)
        await running.stop()
        if children:
            await asyncio.to_thread(reap_children, children)
    finally:
        if control is not None:
            control.close()
        if flusher is not None:
            flusher.cancel()
    return 0


def _stress_sessions(limiter: ConnectionLimiter, services: dict[str, AnyService],
                     ) -> Callable[[], None]:
    """What `limiter` does when it reaches stress: every session it counts that waits
    for a request gets at most the stress timeout for it (server.limits)."""

    def shorten() -> None:
        limit = limiter.timeout(math.inf)  # STRESS_TIMEOUT
        for service in services.values():
            if service.limiter is limiter:
                sessions: list[SMTPSession | POP3Session] = list(service.sessions)
                for session in sessions:
                    session.under_stress(limit)

    return shorten


class _SessionStream(Stream):
    """A Stream that starts its session's task as soon as the connection is made.

    On an implicit-TLS listener (RFC 8314) the stream begins TLS at once and
    the session starts when the handshake is done.
    """

    def __init__(self, service: AnyService, tasks: set[asyncio.Task[None]],
                 implicit_tls: ssl.SSLContext | None) -> None:
        super().__init__()
        self._service = service
        self._tasks = tasks
        self._implicit_tls = implicit_tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._implicit_tls is not None:
            self.begin_tls(self._implicit_tls)
        task = asyncio.get_running_loop().create_task(self._run())
        self._tasks.add(task)  # a strong reference, or the task may vanish mid-run
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        if self._implicit_tls is not None:
            try:
                await self.handshake(TLS_HANDSHAKE_SECONDS)
            except (TimeoutError, ConnectionError, ssl.SSLError) as exc:
                log.debug("%s: TLS handshake failed with %s: %s", self._service.name,
                          self.get_extra_info("peername"), exc)
                self.abort()
                return
        session: SMTPSession | POP3Session
        if isinstance(self._service, SMTPService):
            session = SMTPSession(self._service, self)
        else:
            session = POP3Session(self._service, self)
        await session.run()


def _session_factory(service: AnyService, implicit_tls: ssl.SSLContext | None,
                     ) -> Callable[[], Stream]:
    tasks: set[asyncio.Task[None]] = set()
    return lambda: _SessionStream(service, tasks, implicit_tls)


async def drain(service: AnyService, grace: float = DRAIN_GRACE_SECONDS) -> None:
    """Let transactions (SMTP) and Update states (POP3) finish, then close the rest."""
    service.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while any(s.busy for s in service.sessions) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    sessions: list[SMTPSession | POP3Session] = list(service.sessions)
    for session in sessions:
        session.close_for_shutdown()
    while service.sessions and loop.time() < deadline + 5:
        await asyncio.sleep(0.05)


def run(config: Config) -> int:
    """Entry point of `postroom serve`: one per data folder (control.ServerLock)."""
    # Checked first, in this process, before any worker is forked: a certificate
    # that cannot be used stops the start with the one line of a ConfigError.
    load_tls(config)
    handler = setup_logging()
    try:
        lock = ServerLock.acquire(config.data_dir)
    except AlreadyRunning as exc:
        raise ConfigError(str(exc)) from None
    with lock:  # until the last delivery of the drain has ended
        return _run_locked(config, handler, lock)


def _run_locked(config: Config, handler: logging.Handler, lock: ServerLock) -> int:
    flavour = install_event_loop_policy()
    processes = worker_count(config.workers)
    log.info("starting postroom (event loop: %s, processes: %d)", flavour, processes)
    # Until serve() handles them, these signals wait (pending): by default each would
    # end the process at once, with no drain and no log line. The workers inherit this.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    # Bound once, before forking: every process accepts on the same sockets.
    sockets = bind_listeners(config)
    channel = WakeChannel() if processes > 1 else None
    checks = PasswordChecks()  # one bound for every process (server/passwords.py)
    handler.flush()  # or the children would write the parent's buffered lines again

    def child() -> int:
        lock.in_worker()
        # The parent forwards SIGTERM/SIGINT; a terminal's Ctrl-C reaches the whole
        # process group, and draining twice is harmless.
        return asyncio.run(serve(config, handler, sockets, worker=True, channel=channel,
                                 password_checks=checks))

    # What exists by now (modules, configuration, certificates) lives as long as
    # the process: frozen, the cyclic collector's full passes stop walking it
    # again and again under load, and the forked workers keep sharing those
    # pages instead of copying each one the collector touches.
    gc.collect()
    gc.freeze()
    children = fork_workers(processes - 1, sockets, child)
    try:
        return asyncio.run(serve(config, handler, sockets, channel=channel, children=children,
                                 lock=lock, password_checks=checks))
    except KeyboardInterrupt:
        return 130
    finally:
        handler.flush()
