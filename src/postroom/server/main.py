"""`postroom serve`: builds the service graph from a Config, binds listeners, runs until SIGTERM.

Start-up problems a person can fix (a port already in use, an unreadable
certificate) become one-line `ConfigError`s naming the config key; the CLI
prints them without a traceback. SIGTERM and SIGINT stop accepting new
connections, let transactions in progress finish (up to a grace period), tell
idle clients 421 and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from postroom.config import Config, ConfigError
from postroom.policy.auth import AuthThrottle
from postroom.policy.relay import RecipientPolicy
from postroom.policy.submission import SubmissionPolicy
from postroom.protocol.sasl import SUPPORTED_MECHANISMS
from postroom.protocol.smtp_server import SMTPServerConfig
from postroom.queue.scheduler import PID_FILE
from postroom.server.acceptor import DeferredServer
from postroom.server.committer import GroupCommitter
from postroom.server.limits import ConnectionLimiter
from postroom.server.passwords import Check, PasswordChecks
from postroom.server.pop3 import POP3Service, POP3Session
from postroom.server.relay import Relay
from postroom.server.smtp import Outbound, SMTPService, SMTPSession
from postroom.server.stream import Stream
from postroom.server.workers import (
    WakeChannel,
    fork_workers,
    reap_children,
    signal_children,
    worker_count,
)
from postroom.store.atomic import atomic_write
from postroom.store.cache import CachedLookups
from postroom.store.maildir import MailStore
from postroom.store.users import UserDirectory, local_domains, open_user_directory
from postroom.tlscert import ensure_certificate, server_context

log = logging.getLogger("postroom.master")

# The kernel's accept queue: smtp-source style bursts open many sessions at once,
# and a short queue turns them into SYN retransmits (seconds of delay each).
LISTEN_BACKLOG = 1024

# How long SIGTERM waits for transactions in progress before closing them.
DRAIN_GRACE_SECONDS = 30.0

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
    directory: UserDirectory,
    lookups: CachedLookups,
    is_local_domain: Callable[[str], bool],
    store: MailStore,
    limiter: ConnectionLimiter,
    throttle: AuthThrottle,
    outbound: Outbound | None = None,
    committer: GroupCommitter | None = None,
    check_password: Check | None = None,
) -> SMTPService:
    """The `smtp` listener (MX: local recipients only) or a submission one (AUTH, relay)."""
    smtp = config.smtp
    primary = config.domains[0] if config.domains else config.hostname
    policy = RecipientPolicy(is_local_domain, lookups.expand, primary_domain=primary)
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
        store=store,
        limiter=limiter,
        tls_context=tls_context,
        command_timeout=smtp.command_timeout,
        data_timeout=smtp.data_timeout,
        max_received=smtp.max_received_headers,
        submission=SubmissionPolicy(policy, is_local_domain, lookups.expand,
                                    smtp.check_from_header) if submission else None,
        verify_password=check_password if submission else None,
        throttle=throttle,
        outbound=outbound if submission else None,
        committer=committer,
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
    committer: GroupCommitter
    password_checks: PasswordChecks

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
        await self.relay.stop()
        self.committer.close()
        self.password_checks.close()
        log.info("stopped")


def prepare_certificate(config: Config) -> None:
    cert, key = config.tls.cert, config.tls.key
    if config.tls.generate and ensure_certificate(cert, key, config.hostname):
        log.info("made a self-signed certificate for %s in %s", config.hostname, cert)


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
    prepare_certificate(config)
    cert, key = config.tls.cert, config.tls.key
    try:
        tls_context = server_context(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{config.source}: tls.cert: cannot load {cert} / {key}: {exc}") from exc
    if sockets is None:
        sockets = bind_listeners(config)

    directory = open_user_directory(config)
    store = MailStore(config.mail_dir, hostname=config.hostname)
    # Spool files left by a crash mid-DATA were never acknowledged: remove them.
    removed = store.clean_spool()
    if removed:
        log.info("removed %d unacknowledged spool file(s) left by an earlier run", removed)
    pop3_limiter = ConnectionLimiter(
        config.pop3.max_connections, config.pop3.max_connections_per_client
    )
    throttle = AuthThrottle(first_delay=config.pop3.auth_failure_delay)
    smtp_limiter = ConnectionLimiter(
        config.smtp.max_connections, config.smtp.max_connections_per_client
    )
    config_domains = local_domains(config, directory) - set(directory.list_domains())
    # Cached until the database changes: `postroom domain add` works without a restart.
    lookups = CachedLookups(directory, config.users_db)

    def is_local_domain(domain: str) -> bool:
        return domain in config_domains or lookups.has_domain(domain)

    relay = Relay(config, store, is_local_domain, lookups.expand,
                  notify_primary=notify_primary)
    committer = GroupCommitter(config.hostname)
    checks = password_checks or PasswordChecks()
    check_password = checks.bind(directory.verify_password)
    services: dict[str, AnyService] = {}
    servers: dict[str, asyncio.base_events.Server | DeferredServer] = {}
    loop = asyncio.get_running_loop()
    for key_name, sock in sockets:
        service: AnyService
        if key_name in ("smtp", *SUBMISSION_LISTENERS):
            service = build_smtp_service(key_name, config, tls_context, directory, lookups,
                                         is_local_domain, store, smtp_limiter, throttle, relay,
                                         committer, check_password)
        else:
            service = POP3Service(
                name=key_name,
                hostname=config.hostname,
                directory=directory,
                store=store,
                limiter=pop3_limiter,  # one budget for both POP3 listeners
                throttle=throttle,
                tls_context=tls_context,
                implicit_tls=key_name == "pop3s",
                allow_plaintext_auth=config.pop3.allow_plaintext_auth,
                check_password=check_password,
                idle_timeout=config.pop3.idle_timeout,
                apop=config.pop3.apop,
            )
        services[key_name] = service
        implicit = tls_context if key_name in IMPLICIT_TLS else None
        timeout = TLS_HANDSHAKE_SECONDS if implicit else None
        if key_name in accept_last:
            servers[key_name] = DeferredServer(
                sock, _session_factory(service), ssl_context=implicit,
                ssl_handshake_timeout=timeout,
            )
        else:
            servers[key_name] = await loop.create_server(
                _session_factory(service), sock=sock, ssl=implicit,
                ssl_handshake_timeout=timeout,
            )
        log.info("listening for %s on %s:%d%s%s", key_name, *sock.getsockname()[:2],
                 " (implicit TLS)" if implicit else "",
                 " (taking what the workers leave)" if key_name in accept_last else "")
    relay.start()
    return Running(config, servers, services, relay, committer, checks)


async def serve(
    config: Config,
    log_handler: logging.Handler | None = None,
    sockets: list[tuple[str, socket.socket]] | None = None,
    *,
    worker: bool = False,
    channel: WakeChannel | None = None,
    children: list[int] | None = None,
    password_checks: PasswordChecks | None = None,
) -> int:
    """Run until SIGTERM/SIGINT. The primary (not `worker`) also owns the pid file,
    the relay scheduler and the worker children, which it stops and waits for."""
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
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    primary = not worker
    pid_file = config.data_dir / PID_FILE
    if not primary:
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)  # meant for the primary only
    if primary:
        # `postroom queue flush`, `postroom sendmail` and the workers change the queue
        # folder, then send SIGUSR1 to the pid in this file so the scheduler looks again.
        loop.add_signal_handler(signal.SIGUSR1, running.relay.rescan)
        atomic_write(pid_file, f"{os.getpid()}\n".encode("ascii"))
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
        if primary:
            with contextlib.suppress(OSError):
                if pid_file.read_text(encoding="ascii").strip() == str(os.getpid()):
                    pid_file.unlink()
        if flusher is not None:
            flusher.cancel()
    return 0


class _SessionStream(Stream):
    """A Stream that starts its session's task as soon as the connection is made."""

    def __init__(self, service: AnyService, tasks: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self._service = service
        self._tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        session: SMTPSession | POP3Session
        if isinstance(self._service, SMTPService):
            session = SMTPSession(self._service, self)
        else:
            session = POP3Session(self._service, self)
        task = asyncio.get_running_loop().create_task(session.run())
        self._tasks.add(task)  # a strong reference, or the task may vanish mid-run
        task.add_done_callback(self._tasks.discard)


def _session_factory(service: AnyService) -> Callable[[], Stream]:
    tasks: set[asyncio.Task[None]] = set()
    return lambda: _SessionStream(service, tasks)


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
    """Entry point of `postroom serve`."""
    handler = setup_logging()
    flavour = install_event_loop_policy()
    processes = worker_count(config.workers)
    log.info("starting postroom (event loop: %s, processes: %d)", flavour, processes)
    # Bound once, before forking: every process accepts on the same sockets.
    prepare_certificate(config)
    sockets = bind_listeners(config)
    channel = WakeChannel() if processes > 1 else None
    checks = PasswordChecks()  # one bound for every process (server/passwords.py)
    handler.flush()  # or the children would write the parent's buffered lines again

    def child() -> int:
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
                                 password_checks=checks))
    except KeyboardInterrupt:
        return 130
    finally:
        handler.flush()
