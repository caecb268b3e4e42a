"""Counts shared by every server process: connections, rates and failed logins per client.

As Postfix's smtpd processes ask its anvil server, postroom's worker processes
ask the primary: the primary holds the one `Anvil` (the counts), and each
worker holds one Unix SOCK_SEQPACKET connection to it, made to a socket the
primary bound before the fork (an abstract address on Linux: no file to clean
up). A request is one datagram, `ID OP ARG...` (NUL-separated), and a request
that wants an answer gets one datagram with the same ID. The primary's own
sessions call the Anvil directly.

A worker waits at most ANSWER_TIMEOUT for an answer; a primary that does not
answer in time lets the client through (a counter must never stop mail), with
a log line. When a worker's connection ends (the worker died), the primary
forgets the connections that worker counted.

Clients are counted by address, an IPv6 client by its /64 (one host usually
holds a whole /64, RFC 4291 2.5.4). Rates are counted per fixed minute, as
anvil counts per anvil_rate_time_unit: the first event of a client starts its
minute, and the count starts over when the minute is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from postroom.policy.auth import AuthThrottle

log = logging.getLogger("postroom.anvil")

RATE_WINDOW = 60.0  # seconds: Postfix's anvil_rate_time_unit
ANSWER_TIMEOUT = 1.0  # seconds a worker waits for the primary before letting the client in
SWEEP_EVERY = 4096  # counting operations between sweeps of expired rate windows
MAX_REQUEST = 1024  # octets: an address and a user name (RFC 5321 4.5.3.1.3: 256 each)
IPV6_CLIENT_PREFIX = 64  # RFC 4291 2.5.4: one interface identifier, one host

# The rates a limit may be set on; each names a [limits] key.
RATES = ("connection_rate", "message_rate", "recipient_rate", "user_message_rate",
         "user_recipient_rate")


def client_key(address: str) -> str:
    """What a client is counted as: its IPv4 address, or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Limits:
    """The numbers the Anvil enforces (0: no limit), from [limits]."""

    connection_count: int = 0
    connection_rate: int = 0
    message_rate: int = 0
    recipient_rate: int = 0
    user_message_rate: int = 0
    user_recipient_rate: int = 0
    auth_failure_limit: int = 0
    first_delay: float = 2.0


class Anvil:
    """The counts themselves, in one process."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.connections: Counter[str] = Counter()
        self._rates: dict[tuple[str, str], list[float]] = {}  # -> [window start, count]
        self._logins = AuthThrottle(first_delay=limits.first_delay, clock=clock)
        self._operations = 0

    def connect(self, key: str) -> str:
        """A new connection from `key`: "" when it may go on (it is then counted until
        `disconnect`), else the name of the limit it is over and the count."""
        over = self.rate("connection_rate", key)
        if over:
            return over
        limit = self.limits.connection_count
        if limit and self.connections[key] >= limit:
            return f"connection_count {self.connections[key] + 1}"
        self.connections[key] += 1
        return ""

    def disconnect(self, key: str) -> None:
        self.connections[key] -= 1
        if self.connections[key] <= 0:
            del self.connections[key]

    def rate(self, name: str, key: str) -> str:
        """Count one event of rate `name` for `key`: "" within the limit, else the
        limit's name and the count so far this minute."""
        limit = getattr(self.limits, name)
        if not limit:
            return ""
        now = self._clock()
        self._operations += 1
        if self._operations % SWEEP_EVERY == 0:
            self._sweep(now)
        window = self._rates.get((name, key))
        if window is None or now - window[0] >= RATE_WINDOW:
            window = self._rates[name, key] = [now, 0.0]
        window[1] += 1
        return f"{name} {int(window[1])}" if window[1] > limit else ""

    def _sweep(self, now: float) -> None:
        for key in [k for k, (start, _n) in self._rates.items() if now - start >= RATE_WINDOW]:
            del self._rates[key]

    def auth_failed(self, key: str, user: str) -> tuple[float, bool]:
        """A failed login: the delay before answering it, and whether `key` is now
        refused further tries."""
        delay = self._logins.failed(key, user)
        return delay, self.auth_locked(key)

    def auth_succeeded(self, key: str, user: str) -> None:
        self._logins.succeeded(key, user)

    def auth_locked(self, key: str) -> bool:
        limit = self.limits.auth_failure_limit
        return bool(limit) and self._logins.failures(key) >= limit


class Counters(Protocol):
    """The Anvil as a session sees it, in the primary or across the socket."""

    async def connect(self, key: str) -> str: ...
    def disconnect(self, key: str) -> None: ...
    async def rate(self, name: str, key: str) -> str: ...
    async def auth_failed(self, key: str, user: str) -> tuple[float, bool]: ...
    def auth_succeeded(self, key: str, user: str) -> None: ...
    async def auth_locked(self, key: str) -> bool: ...


class LocalCounters:
    """The Anvil of this process (the primary, or a server of one process)."""

    def __init__(self, anvil: Anvil) -> None:
        self.anvil = anvil

    async def connect(self, key: str) -> str:
        return self.anvil.connect(key)

    def disconnect(self, key: str) -> None:
        self.anvil.disconnect(key)

    async def rate(self, name: str, key: str) -> str:
        return self.anvil.rate(name, key)

    async def auth_failed(self, key: str, user: str) -> tuple[float, bool]:
        return self.anvil.auth_failed(key, user)

    def auth_succeeded(self, key: str, user: str) -> None:
        self.anvil.auth_succeeded(key, user)

    async def auth_locked(self, key: str) -> bool:
        return self.anvil.auth_locked(key)


# -- the wire: request ID (4 octets), then NUL-separated fields ----------------------

_ID = struct.Struct("!I")


def _encode(request_id: int, *fields: str) -> bytes:
    return _ID.pack(request_id) + "\0".join(fields).encode("utf-8", "surrogateescape")


def _decode(datagram: bytes) -> tuple[int, list[str]]:
    (request_id,) = _ID.unpack_from(datagram)
    return request_id, datagram[_ID.size:].decode("utf-8", "surrogateescape").split("\0")


def listen() -> socket.socket | None:
    """The primary's socket for the workers, bound before the fork; None where Unix
    SOCK_SEQPACKET or abstract addresses do not exist (then each process counts alone)."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except (AttributeError, OSError):
        return None
    try:
        sock.bind("")  # Linux autobind: a unique abstract address
        sock.listen(128)
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


class AnvilServer:
    """In the primary: answers the workers' requests from its Anvil."""

    def __init__(self, anvil: Anvil, sock: socket.socket) -> None:
        self.anvil = anvil
        self.sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peers: dict[int, tuple[socket.socket, Counter[str]]] = {}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.sock.fileno())
            for fd in list(self._peers):
                self._drop(fd)
        self.sock.close()

    def _accept(self) -> None:
        assert self._loop is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("anvil: accept failed: %s", exc)
                return
            conn.setblocking(False)
            self._peers[conn.fileno()] = (conn, Counter())
            self._loop.add_reader(conn.fileno(), self._serve, conn.fileno())

    def _drop(self, fd: int) -> None:
        """A worker's connection ended: the connections it counted are over too."""
        conn, held = self._peers.pop(fd)
        for key, count in held.items():
            for _ in range(count):
                self.anvil.disconnect(key)
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(fd)
        conn.close()

    def _serve(self, fd: int) -> None:
        conn, held = self._peers[fd]
        for _ in range(64):  # then give the loop back; the rest is read next time
            try:
                datagram = conn.recv(MAX_REQUEST)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                datagram = b""
            if not datagram:
                self._drop(fd)
                return
            try:
                request_id, fields = _decode(datagram)
                answer = self._answer(fields, held)
            except (struct.error, ValueError, TypeError, IndexError) as exc:
                log.warning("anvil: bad request from a worker: %s", exc)
                continue
            if answer is not None:
                try:
                    conn.send(_encode(request_id, *answer))
                except OSError as exc:  # the worker lets the client in after its timeout
                    log.warning("anvil: cannot answer a worker: %s", exc)

    def _answer(self, fields: list[str], held: Counter[str]) -> list[str] | None:
        op, args = fields[0], fields[1:]
        anvil = self.anvil
        if op == "connect":
            over = anvil.connect(args[0])
            if not over:
                held[args[0]] += 1
            return [over]
        if op == "disconnect":
            if held[args[0]] > 0:
                held[args[0]] -= 1
                anvil.disconnect(args[0])
            return None
        if op == "rate":
            if args[0] not in RATES:
                raise ValueError(f"no rate {args[0]!r}")
            return [anvil.rate(args[0], args[1])]
        if op == "auth_failed":
            delay, locked = anvil.auth_failed(args[0], args[1])
            return [repr(delay), "1" if locked else ""]
        if op == "auth_succeeded":
            anvil.auth_succeeded(args[0], args[1])
            return None
        if op == "auth_locked":
            return ["1" if anvil.auth_locked(args[0]) else ""]
        raise ValueError(f"no operation {op!r}")


def _expire(future: asyncio.Future[list[str]]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class RemoteCounters:
    """In a worker: the primary's Anvil, over the socket (see the module docstring)."""

    def __init__(self, address: str | bytes, first_delay: float) -> None:
        self.address = address
        self.first_delay = first_delay  # the delay for a failure the primary did not count
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, asyncio.Future[list[str]]] = {}
        self._ids = itertools.count(1)
        self._trouble_logged = False

    def start(self) -> None:
        """Connect to the primary (it accepts once its loop runs; until then the
        kernel holds the connection)."""
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(self.address)
        except OSError as exc:
            log.warning("anvil: cannot reach the primary process (%s): this process counts "
                        "nothing", exc)
            sock.close()
            return
        sock.setblocking(False)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._receive)

    def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _receive(self) -> None:
        assert self._sock is not None
        while True:
            try:
                datagram = self._sock.recv(MAX_REQUEST)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                datagram = b""
            if not datagram:
                self._trouble("the primary process closed the connection")
                self.close()
                return
            request_id, fields = _decode(datagram)
            future = self._waiting.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(fields)

    def _trouble(self, why: str) -> None:
        if not self._trouble_logged:
            log.warning("anvil: %s; clients are let through uncounted", why)
            self._trouble_logged = True

    def _tell(self, *fields: str) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.send(_encode(0, *fields))
        except OSError as exc:
            self._trouble(f"cannot send to the primary process: {exc}")
            return False
        return True

    async def _ask(self, *fields: str) -> list[str] | None:
        if self._sock is None or self._loop is None:
            return None
        request_id = next(self._ids) & 0xFFFFFFFF or 1
        future: asyncio.Future[list[str]] = self._loop.create_future()
        try:
            self._sock.send(_encode(request_id, *fields))
        except OSError as exc:
            self._trouble(f"cannot send to the primary process: {exc}")
            return None
        self._waiting[request_id] = future
        # One timer, not asyncio.wait_for's task: this is on every connection's path.
        timer = self._loop.call_later(ANSWER_TIMEOUT, _expire, future)
        try:
            return await future
        except TimeoutError:
            log.warning("anvil: no answer from the primary process to %s within %.1fs: "
                        "let through", fields[0], ANSWER_TIMEOUT)
            return None
        finally:
            timer.cancel()
            self._waiting.pop(request_id, None)

    async def connect(self, key: str) -> str:
        answer = await self._ask("connect", key)
        return answer[0] if answer else ""

    def disconnect(self, key: str) -> None:
        self._tell("disconnect", key)

    async def rate(self, name: str, key: str) -> str:
        answer = await self._ask("rate", name, key)
        return answer[0] if answer else ""

    async def auth_failed(self, key: str, user: str) -> tuple[float, bool]:
        answer = await self._ask("auth_failed", key, user)
        if not answer:
            return self.first_delay, False
        return float(answer[0]), bool(answer[1])

    def auth_succeeded(self, key: str, user: str) -> None:
        self._tell("auth_succeeded", key, user)

    async def auth_locked(self, key: str) -> bool:
        answer = await self._ask("auth_locked", key)
        return bool(answer and answer[0])



@dataclass
class Link:
    """How this process reaches the counts: its own Anvil (and, in a primary with
    workers, the server that answers them), or the primary's over the socket."""

    counters: Counters
    server: AnvilServer | None = None
    remote: RemoteCounters | None = None

    def retune(self, limits: Limits) -> None:
        """New limits from a reload: the counts kept here obey them from now on (a
        worker's remote counts obey the primary's)."""
        if isinstance(self.counters, LocalCounters):
            self.counters.anvil.limits = limits

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.remote is not None:
            self.remote.close()


def link(limits: Limits, listener: socket.socket | None, address: str | bytes | None) -> Link:
    """Call in a running loop. A worker gets `address` (the primary's socket); the
    primary gets `listener`; a process alone gets neither."""
    if address is not None:
        remote = RemoteCounters(address, limits.first_delay)
        remote.start()
        return Link(remote, remote=remote)
    anvil = Anvil(limits)
    server = None
    if listener is not None:
        server = AnvilServer(anvil, listener)
        server.start()
    return Link(LocalCounters(anvil), server=server)
