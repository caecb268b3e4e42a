"""Server-side TLS on memory buffers (records in, plaintext out, a half-close that still
writes), and the listeners' certificate, replaceable while they run.

The event loop's own TLS layer (`create_server(ssl=...)`, `loop.start_tls`)
ends the whole connection when the client's close_notify arrives and drops
whatever the server writes after it. But close_notify closes only the
sender's direction (RFC 8446 6.1): a client may send QUIT, then close_notify,
and then read its replies, as Exim does at the end of a pipelined BDAT. So
the server's Stream runs TLS itself, on `ssl.MemoryBIO`, and keeps writing
until the session has answered everything it read.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from postroom.tlscert import TLSFileError, server_context

log = logging.getLogger("postroom.tls")

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


# A changed certificate file is looked for at most this often, at a handshake: a
# new certificate reaches new handshakes in every process within this time, with
# no message between processes and one stat(2) a second at most.
CERT_CHECK_SECONDS = 1.0


class CertificateHolder:
    """The listeners' TLS context, whose certificate can be replaced while they run.

    `context` is made once and handed to every listener; its SNI callback, which
    OpenSSL calls for every ClientHello (with or without a server name, RFC 6066
    3), moves the handshake onto the context of the newest certificate. So a
    handshake begun after `reload_certificate()` (or after the files changed on
    disk, seen at the next handshake CERT_CHECK_SECONDS later at most) gets the
    new certificate, and a connection already encrypted keeps the one it got.
    """

    def __init__(self, cert: Path, key: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self._clock = clock
        self._stamp = self._file_stamp()
        self.current = server_context(self.cert, self.key)  # TLSFileError when unusable
        self.context = server_context(self.cert, self.key)
        self.context.sni_callback = self._choose
        self._checked = clock()

    def _file_stamp(self) -> tuple[int, int, int, int]:
        """What changes when either file is replaced (atomic_write renames a new inode in)."""
        cert, key = self.cert.stat(), self.key.stat()
        return cert.st_ino, cert.st_mtime_ns, key.st_ino, key.st_mtime_ns

    def reload_certificate(self) -> bool:
        """Read the certificate and key files again; True when a new pair is in use.

        A pair that cannot be used (missing, or a key written before its
        certificate) leaves the one in use in place, with a log line; it is
        tried again when the files change next.
        """
        try:
            stamp = self._file_stamp()
            context = server_context(self.cert, self.key)
        except (OSError, TLSFileError) as exc:
            log.warning("the certificate in %s cannot be used; keeping the one in use: %s",
                        self.cert, exc)
            return False
        self.current, self._stamp = context, stamp
        log.info("certificate loaded from %s (%s)", self.cert, describe(self.cert))
        return True

    def check_files(self) -> None:
        """Load the files again if they changed since the last load."""
        try:
            stamp = self._file_stamp()
        except OSError:
            return  # in the middle of a replacement, or gone: keep what is in use
        if stamp != self._stamp:
            self._stamp = stamp  # a pair that fails is tried again once it changes again
            self.reload_certificate()

    def _choose(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        now = self._clock()
        if now - self._checked >= CERT_CHECK_SECONDS:
            self._checked = now
            self.check_files()
        conn.context = self.current


def describe(cert: Path) -> str:
    """"subject=..., issuer=..., expires ..." of the first certificate in `cert`, for logs."""
    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}"
    return (f"subject={leaf.subject.rfc4514_string()}, issuer={leaf.issuer.rfc4514_string()}, "
            f"expires {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
