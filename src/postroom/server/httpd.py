"""A small HTTP/1.1 server for GET requests: the ACME challenge and the metrics endpoints.

Each connection carries one request (the reply says `Connection: close`,
RFC 9112 9.6); the handler maps a path to a status, a content type and a
body. Request heads larger than HEAD_LIMIT or slower than HEAD_SECONDS are
cut off, so a client cannot hold the listener's memory or connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("postroom.http")

# The request line and headers together, as nginx's large_client_header_buffers (8 KiB).
HEAD_LIMIT = 8192
# For the whole request head, as nginx's client_header_timeout (60 s) but shorter:
# the CA and Prometheus send theirs at once.
HEAD_SECONDS = 10.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           503: "Service Unavailable"}


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str], Awaitable[Answer]]


async def _serve_one(handler: Handler, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_SECONDS)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
            ConnectionError):
        writer.close()
        return
    method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
    target = rest.partition(" ")[0].partition("?")[0]
    if method not in ("GET", "HEAD"):
        answer = Answer(405, b"only GET\n")
    elif not target.startswith("/"):
        answer = Answer(400, b"bad request\n")
    else:
        answer = await handler(target)
    lines = [f"HTTP/1.1 {answer.status} {REASONS.get(answer.status, '')}",
             f"Content-Type: {answer.content_type}", f"Content-Length: {len(answer.body)}",
             "Connection: close", "", ""]
    writer.write("\r\n".join(lines).encode("latin-1"))
    if method != "HEAD":
        writer.write(answer.body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


async def serve_http(sock: socket.socket, handler: Handler) -> asyncio.base_events.Server:
    """Answer GET requests on the listening socket `sock` with `handler(path)`."""
    return await asyncio.start_server(lambda r, w: _serve_one(handler, r, w), sock=sock,
                                      limit=HEAD_LIMIT)
