"""Accepting second: how the primary process listens for submission.

Every server process accepts on the same listening sockets, and the kernel
hands a new connection to whichever process asks first. The primary process
also runs the relay scheduler and client, whose work grows with the mail
submitted, while the workers only run sessions. A submission session that
lands in the primary puts both loads on one event loop (and one interpreter
lock) while a worker may sit idle.

So for the submission listeners the primary is the acceptor of last resort:
when a connection is waiting it looks again only after ACCEPT_DELAY, and takes
it only if no worker has. A live worker wins every race; a dead or stuck one
costs a new client a few milliseconds, never the service. Port 25 and POP3
are accepted as usual: their load does not pile up in the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("postroom.master")

# Long enough for a worker to wake up and call accept(2), short enough that a
# client the workers cannot serve barely notices.
ACCEPT_DELAY = 0.002
# Connections taken per look (asyncio's own servers take up to their backlog).
ACCEPT_BATCH = 16
# After EMFILE and the like: wait before trying again, as asyncio's servers do.
ACCEPT_ERROR_PAUSE = 1.0


class DeferredServer:
    """Serves `sock` with `factory`, taking only connections left waiting by others.

    Stands in for the asyncio Server of a listener: `sockets` and `close()`.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        accept_failed: Callable[[socket.socket, OSError], int],
        *,
        delay: float = ACCEPT_DELAY,
    ) -> None:
        """`accept_failed(sock, error)` is told of each failed accept(2), logs it, and
        says how many waiting connections it answered and closed (server.descriptors)."""
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._factory = factory
        self._delay = delay
        self._accept_failed = accept_failed
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._waiting)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)

    def close(self) -> None:
        """Stop accepting (sessions already started go on)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(ValueError, OSError):  # the loop may have closed it
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _waiting(self) -> None:
        # Readiness is level-triggered: stop watching while the workers get their turn.
        self._loop.remove_reader(self._sock.fileno())
        self._timer = self._loop.call_later(self._delay, self._accept)

    def _accept(self) -> None:
        self._timer = None
        if self._closed:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break  # a worker took it: the usual case
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:
                if self._accept_failed(self._sock, exc):
                    break  # the waiting connections were answered: look again at once
                self._timer = self._loop.call_later(ACCEPT_ERROR_PAUSE, self._resume)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._start(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._resume()

    def _resume(self) -> None:
        self._timer = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._waiting)

    async def _start(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as exc:
            log.debug("connection ended before its session: %s", exc)
            conn.close()
