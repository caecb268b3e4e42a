"""File descriptors: take all the process may have; out of them, log it and answer 421.

At start the soft RLIMIT_NOFILE is raised to the hard limit
(`raise_open_files_limit`), as Postfix's event loop does (open_limit() in
event_init()): a soft limit of 1,024, common in shells and service managers,
would otherwise cap a process at about a thousand sessions.

accept(2) fails with EMFILE (this process) or ENFILE (the system) when no
descriptor is left, and the connection stays in the listen queue. What
follows depends on who accepts:

- asyncio's own listeners pause for a second and report "socket.accept() out
  of system resource" to the loop's exception handler (`exception_handler`);
- server.acceptor's DeferredServer sees the error itself (`accept_failed`);
- uvloop's listeners (libuv) accept the waiting connections with a descriptor
  libuv keeps in reserve, close them at once and report nothing. There
  `watch` looks at the descriptor table every DESCRIPTOR_CHECK_SECONDS, off
  the path every connection takes.

For the first two, one descriptor is kept in reserve here as well: on a
report it is closed, each waiting connection is accepted in turn, told
421 4.3.2 (SMTP, RFC 5321 3.8) or "-ERR [SYS/TEMP]" (POP3, RFC 3206) and
closed, and the reserve is taken again. Implicit-TLS listeners cannot say
anything before a handshake: their clients see the connection closed. Every
case logs "accept connection: Too many open files" with the limit, at most
once every DESCRIPTOR_LOG_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("postroom.master")

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
# How often the descriptor table is looked at where the event loop reports no
# failed accept (uvloop).
DESCRIPTOR_CHECK_SECONDS = 1.0
# A flood of failed accepts becomes one log line per this many seconds.
DESCRIPTOR_LOG_SECONDS = 10.0
# Waiting connections told 421 per failure; more wait for the next report.
REFUSE_BATCH = 64
# What asyncio's BaseSelectorEventLoop passes its exception handler on EMFILE,
# ENFILE, ENOBUFS and ENOMEM from accept(2).
ASYNCIO_ACCEPT_FAILED = "socket.accept() out of system resource"


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (inherited by the
    processes forked after); return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft  # no number to ask for (not on Linux, where nr_open bounds it)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
        return soft
    return hard


def _open_reserve() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


@dataclass
class _Listener:
    name: str
    sock: socket.socket
    reply: bytes | None  # None: implicit TLS, nothing can be said in the clear


class Descriptors:
    """One process's listeners, and what they do when descriptors run out."""

    def __init__(self) -> None:
        self._listeners: dict[int, _Listener] = {}
        self._reserve = _open_reserve()
        self._next_line = 0.0
        self._refused = 0  # connections refused since the last line
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None
        self._watch: asyncio.Task[None] | None = None

    def listen(self, name: str, sock: socket.socket, reply: bytes | None) -> None:
        """`sock` is the listener `name`; `reply` is what a refused client is told."""
        self._listeners[sock.fileno()] = _Listener(name, sock, reply)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take asyncio's reports, or watch the table where the loop makes none."""
        self._loop = loop
        if isinstance(loop, asyncio.BaseEventLoop):
            self._previous = loop.get_exception_handler()
            loop.set_exception_handler(self.exception_handler)
        else:
            self._watch = loop.create_task(self.watch())

    def close(self) -> None:
        if self._loop is not None and isinstance(self._loop, asyncio.BaseEventLoop):
            self._loop.set_exception_handler(self._previous)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1

    # -- the reports -----------------------------------------------------------

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        sock = context.get("socket")
        listener = self._listeners.get(sock.fileno()) if sock is not None else None
        if (context.get("message") == ASYNCIO_ACCEPT_FAILED and listener is not None
                and isinstance(exc, OSError)):
            self.accept_failed(listener.sock, exc)
        elif self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def accept_failed(self, sock: socket.socket, exc: OSError) -> int:
        """accept(2) on `sock` failed with `exc`: answer who waits if that helps, and log.

        Returns how many waiting connections were answered and closed."""
        listener = self._listeners.get(sock.fileno())
        where = f"{listener.name} ({_address(sock)})" if listener else _address(sock)
        refused = 0
        if exc.errno in OUT_OF_DESCRIPTORS and listener is not None:
            refused = self._refuse_waiting(listener)
            self._refused += refused
        self._note(f"accept connection on {where}: {exc.strerror or exc}")
        return refused

    async def watch(self) -> None:
        """Log when no descriptor is left (for loops that report no failed accept)."""
        while True:
            await asyncio.sleep(DESCRIPTOR_CHECK_SECONDS)
            self.check()

    def check(self) -> None:
        """Log if no descriptor is left; take the reserve again if a refusal lost it."""
        try:
            if self._reserve >= 0:
                fd = os.dup(self._reserve)
            else:
                fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in OUT_OF_DESCRIPTORS:
                self._note(f"accept connection: {exc.strerror}: new connections are "
                           "closed unanswered until some end")
            return
        if self._reserve < 0:
            self._reserve = fd
        else:
            os.close(fd)

    # -- helpers ---------------------------------------------------------------------

    def _refuse_waiting(self, listener: _Listener) -> int:
        """Accept, answer and close what waits on `listener`, through the reserve."""
        if self._reserve < 0:  # lost to a refusal that could not take it back
            self._reserve = _open_reserve()
            if self._reserve < 0:
                return 0
        os.close(self._reserve)
        self._reserve = -1
        told = 0
        try:
            for _ in range(REFUSE_BATCH):
                try:
                    conn, _address_ = listener.sock.accept()
                except OSError:
                    break  # none waits (EAGAIN), or another thread took the free descriptor
                with conn:
                    if listener.reply is not None:
                        with contextlib.suppress(OSError):
                            conn.setblocking(False)  # one line fits any fresh socket buffer
                            conn.send(listener.reply)
                told += 1
        finally:
            self._reserve = _open_reserve()
        return told

    def _note(self, text: str) -> None:
        now = time.monotonic()
        if now < self._next_line:
            return
        self._next_line = now + DESCRIPTOR_LOG_SECONDS
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        refused = f"; {self._refused} waiting connection(s) refused" if self._refused else ""
        self._refused = 0
        log.warning("%s (limit %d descriptors, ulimit -n)%s", text, soft, refused)


def _address(sock: socket.socket) -> str:
    with contextlib.suppress(OSError):
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}"
    return "a closed socket"
