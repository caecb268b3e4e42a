"""Server-side TLS on memory buffers: records in, plaintext out, and a half-close that still writes.

The event loop's own TLS layer (`create_server(ssl=...)`, `loop.start_tls`)
ends the whole connection when the client's close_notify arrives and drops
whatever the server writes after it. But close_notify closes only the
sender's direction (RFC 8446 6.1): a client may send QUIT, then close_notify,
and then read its replies, as Exim does at the end of a pipelined BDAT. So
the server's Stream runs TLS itself, on `ssl.MemoryBIO`, and keeps writing
until the session has answered everything it read.
"""

from __future__ import annotations

import ssl

# Plaintext taken per SSLObject.read: a TLS record holds at most 16 KiB
# (RFC 8446 5.1); several are drained per call.
READ_SIZE = 256 * 1024


class ServerTLS:
    """One connection's TLS state: feed it the client's bytes, send what it has for the client."""

    __slots__ = ("_in", "_out", "_obj", "handshake_done", "peer_closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshake_done = False
        self.peer_closed = False  # the client's close_notify came: it sends no more

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._obj

    def receive(self, data: bytes) -> bytes:
        """Take the client's bytes; return the plaintext they complete (b"" for none).

        Raises ssl.SSLError when the handshake or a record fails; what the
        client should still be told (an alert) is then in `outgoing()`.
        """
        self._in.write(data)
        if not self.handshake_done:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.handshake_done = True
        pieces = []
        while True:
            try:
                piece = self._obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            if not piece:  # close_notify (the ssl module reads it as b"")
                self.peer_closed = True
                break
            pieces.append(piece)
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def send(self, data: bytes) -> None:
        """Encrypt `data` for the client (after the handshake); see `outgoing()`."""
        self._obj.write(data)

    def close(self) -> None:
        """Add our close_notify; the client's may or may not have come."""
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: ours is out, theirs not in; or the link is broken

    def outgoing(self) -> bytes:
        """The bytes to write to the client now (handshake, records, alerts)."""
        return self._out.read() if self._out.pending else b""
