"""One POP3 connection: the sans-IO core on a socket, logins against the directory, the maildrop.

The core (`postroom.protocol.pop3_server`) owns the RFC 1939 states; this
module supplies what it cannot know: passwords, the mailbox, the clock, TLS.
A session deletes mail only when the core emits `Update` (QUIT in the
Transaction state); a dropped connection or a timeout deletes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass

from postroom.protocol import pop3_server as core
from postroom.protocol import sasl
from postroom.server import metrics
from postroom.server.session import Service, Session
from postroom.server.stream import Stream
from postroom.store.api import LATER, Later, Mailboxes, Maildrop, MaildropBusy, user_key

log = logging.getLogger("postroom.pop3d")

# Messages up to this size are read and answered in one go, even from the stream's
# data callback; larger ones are sent a chunk at a time, each written and drained.
SEND_AT_ONCE = 64 * 1024


@dataclass(kw_only=True)
class POP3Service(Service):
    """What every session of one POP3 listener ("pop3" or "pop3s") shares."""

    mailboxes: Mailboxes
    implicit_tls: bool
    allow_plaintext_auth: bool
    idle_timeout: float = 600.0  # RFC 1939 3: at least 10 minutes
    apop: bool = False  # greet with a timestamp; users with an APOP secret may use it

    def core_config(self, timestamp: str | None) -> core.POP3ServerConfig:
        return core.POP3ServerConfig(
            implementation="postroom",
            stls=self.tls_context is not None and not self.implicit_tls,
            tls_active=self.implicit_tls,
            allow_plaintext_auth=self.allow_plaintext_auth,
            sasl_mechanisms=sasl.SUPPORTED_MECHANISMS,
            apop_timestamp=timestamp,
        )


def apop_timestamp(hostname: str) -> str:
    """RFC 1939 7: a msg-id unique to this greeting, "<process-ID.clock@hostname>"; a
    random part makes it unpredictable as well."""
    return f"<{os.getpid()}.{time.time_ns()}.{secrets.token_hex(4)}@{hostname}>"


class POP3Session(Session):
    """Drives one connection from the greeting to the close."""

    log = log
    service: POP3Service
    conn: core.POP3Server

    def __init__(self, service: POP3Service, stream: Stream) -> None:
        super().__init__(service, stream, service.idle_timeout)
        self.timestamp = apop_timestamp(service.hostname) if service.apop else None
        self.conn = core.POP3Server(service.core_config(self.timestamp))
        self.maildrop: Maildrop | None = None
        self.busy = False  # in the Update state: shutdown waits for it
        self._stashed: object | None = None  # an event _on_data left for the loop
        self._read_next = 0  # a message to read ahead once this answer is written
        self.held = 0  # messages in the snapshot taken at login

    def _refuse(self) -> None:
        self.conn.err("Too many connections, try again later", "IN-USE", close=True)

    def _greet(self) -> None:
        self.conn.greeting(f"{self.service.hostname} POP3 server ready")

    def _ended(self) -> None:
        if self.maildrop is not None:
            self.maildrop.close()
            self.maildrop = None

    async def _loop(self) -> None:
        conn = self.conn
        stream = self.stream
        stream.set_handler(self._on_data)
        try:
            while True:
                event = self._pump()
                if event is core.NEED_DATA:
                    if not await self._drain():
                        return
                    try:
                        data = await stream.read(self._request_timeout())
                    except TimeoutError:
                        log.info("%s: idle timeout for %s", self.service.name, self.client)
                        conn.timeout()
                        continue
                    event = self._stashed
                    if event is None:
                        conn.receive_data(data)  # b"": EOF
                        continue
                    self._stashed = None
                    if data:  # arrived after the handler's bytes: the core queues it
                        conn.receive_data(data)
                if isinstance(event, core.ConnectionClosed):
                    await self._flush()
                    return
                if event is core.PAUSED:  # pragma: no cover - every event is answered
                    raise RuntimeError(f"POP3 core paused in state {conn.state}")
                await self._handle(event)
        finally:
            stream.set_handler(None)

    def _pump(self) -> object:
        """Answer every event that needs no waiting; return the first that does, or
        NEED_DATA once what is due has been written (drain is the caller's)."""
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is core.NEED_DATA:
                out = conn.data_to_send()
                if out:
                    self.stream.write(out)
                if self._read_next:
                    # While the client reads this answer, read what it will ask next.
                    assert self.maildrop is not None
                    self.maildrop.read_ahead(self._read_next, SEND_AT_ONCE)
                    self._read_next = 0
                return event
            if isinstance(event, core.Retrieve | core.Top):
                if self._retrieve_now(event):
                    continue
            elif isinstance(event, core.User):
                conn.ok()  # RFC 1939 7: USER may be accepted for any name; PASS decides
                continue
            return event

    def _on_data(self, data: bytes) -> bool:
        """The stream's handler while the loop waits for a command (Stream.set_handler):
        commands that need no waiting are answered here; the first that does is
        kept for the loop, which the False return wakes."""
        self.conn.receive_data(data)
        event = self._pump()
        if event is core.NEED_DATA:
            if self.conn.bytes_buffered == 0:  # answered: the next request begins
                self.stream.restart_deadline(self._request_timeout())
            return True
        self._stashed = event
        return False

    def _request_timeout(self) -> float:
        """Seconds left for the command line being read (server.deadline): a whole
        line within the idle timeout, not a byte. Before login, and only then,
        that time shrinks under stress (server.limits); RFC 1939 3 asks ten
        minutes for a logged-in client."""
        now = asyncio.get_running_loop().time()
        if not self.deadline.started or self.conn.bytes_buffered == 0:
            svc = self.service
            limit = svc.idle_timeout if self.user else svc.limiter.timeout(svc.idle_timeout)
            self.deadline.start(now, limit)
        return self.deadline.remaining(now)

    async def _handle(self, event: object) -> None:
        """An event `_pump` could not answer without waiting."""
        if isinstance(event, core.Retrieve | core.Top):
            await self._retrieve(event)
        elif isinstance(event, core.Pass | core.AuthStart | core.AuthResponse | core.Apop):
            try:
                await self._credentials(event)
            except OSError as exc:  # the user directory cannot be read (a database down)
                log.error("%s: password check failed: %s", self.service.name, exc)
                self.conn.err("Cannot check your password just now; try again later",
                              "SYS/TEMP")
        elif isinstance(event, core.StartTLS):
            await self._start_tls(self.conn.ok)
        elif isinstance(event, core.Update):
            await self._update([number for number, _uid in event.deleted])

    # -- Authentication state -------------------------------------------------

    async def _credentials(self, event: core.Pass | core.AuthStart | core.AuthResponse
                           | core.Apop) -> None:
        if isinstance(event, core.Pass):
            await self._open_maildrop(await self._login(event.name, event.password))
        elif isinstance(event, core.Apop):
            await self._apop(event.name, event.digest)
        else:
            await self._auth(event)

    async def _auth(self, event: core.AuthStart | core.AuthResponse) -> None:
        """RFC 5034: SASL PLAIN or LOGIN. The core hands over the decoded octets; the
        exchange takes them as the client sent them, in base64."""
        if isinstance(event, core.AuthStart):
            initial = event.initial_response
            step = self._sasl_step(event.mechanism,
                                   None if initial is None else sasl.encode_base64(initial))
        else:
            step = self._sasl_step(None, sasl.encode_base64(event.data))
        if isinstance(step, sasl.Credentials):
            await self._open_maildrop(await self._login(step.authcid, step.password,
                                                        step.authzid))
        elif step.code == 334:
            self.conn.auth_challenge(sasl.decode_base64(step.text))
        else:
            self.conn.err(step.text, "AUTH")

    async def _apop(self, name: str, digest: str) -> None:
        """RFC 1939 7: MD5(timestamp + secret) in hex, for users who opted in."""
        if await self._login_refused():
            await self._open_maildrop(None)
            return
        secret = await self.service.directory.apop_secret(name) if self.timestamp else None
        good = False
        if secret is not None and self.timestamp is not None:
            expected = hashlib.md5((self.timestamp + secret).encode("utf-8")).hexdigest()
            good = hmac.compare_digest(expected, digest.lower())
        await self._open_maildrop(await self._checked(name, user_key(name) if good else None))

    async def _open_maildrop(self, address: str | None) -> None:
        """After a credential check that `address` passed (None: it failed): lock and
        snapshot the maildrop."""
        svc = self.service
        if address is None and self.locked_out:
            self.conn.err("Too many failed logins from your address; try again later",
                          "SYS/TEMP", close=True)
            return
        if address is None:
            self.conn.err("Authentication failed: wrong user name or password", "AUTH")
            return
        try:
            drop = await svc.mailboxes.open_maildrop(address)
        except MaildropBusy:
            log.info("%s: %s: maildrop in use, login refused from %s", svc.name, address,
                     self.client)
            self.conn.err("Your maildrop is in use by another session; try again later",
                          "IN-USE")
            return
        except (OSError, ValueError) as exc:
            log.error("%s: %s: cannot open maildrop: %s", svc.name, address, exc)
            self.conn.err("Cannot open your maildrop just now; try again later", "SYS/TEMP")
            return
        self.user = address
        self.maildrop = drop
        snapshot = core.Snapshot(drop.sizes, drop.uids)
        self.held = len(drop.sizes)
        log.info("%s: login user=%s from %s%s: %d messages, %d octets", svc.name, address,
                 self.client, " (TLS)" if self.conn.tls_active else "", self.held,
                 sum(drop.sizes))
        self.conn.login_succeeded(snapshot)
        metrics.recorder.pop3_login(svc.name)

    # -- Transaction state --------------------------------------------------

    def _retrieve_now(self, event: core.Retrieve | core.Top) -> bool:
        """RETR or TOP of a message small enough to answer without leaving the loop
        (most mail): answered at once. False leaves larger ones to `_retrieve`."""
        drop = self.maildrop
        assert drop is not None, "the core emits Retrieve/Top only after login"
        if drop.sizes[event.msg_number - 1] > SEND_AT_ONCE:
            return False
        try:
            # TOP is a peek, not a read: only RETR files the message as seen at QUIT.
            result: list[bytes] | OSError | Later | None = drop.read_now(
                event.msg_number, seen=type(event) is core.Retrieve)
        except OSError as exc:
            result = exc
        if result is LATER:
            return False
        chunks = self._answer_read(event, result)
        if chunks is not None:
            crlf = drop.crlf(event.msg_number)
            for chunk in chunks:
                self.conn.send_message_chunk(chunk, crlf=crlf)
            self.conn.end_message()
            if isinstance(event, core.Retrieve):
                self._read_next = event.msg_number + 1
        return True

    async def _retrieve(self, event: core.Retrieve | core.Top) -> None:
        """RETR or TOP of a large message (or one the maildrop cannot give at once):
        sent and drained a chunk at a time."""
        drop = self.maildrop
        assert drop is not None, "the core emits Retrieve/Top only after login"
        crlf = drop.crlf(event.msg_number)
        try:
            result: list[bytes] | OSError | None = await drop.read(
                event.msg_number, seen=type(event) is core.Retrieve)
        except OSError as exc:
            result = exc
        chunks = self._answer_read(event, result)
        if chunks is None:
            return
        for chunk in chunks:
            self.conn.send_message_chunk(chunk, crlf=crlf)
            if not self.conn.wants_more:
                break
            if not await self._flush():
                return
        self.conn.end_message()

    def _answer_read(
        self, event: core.Retrieve | core.Top, result: list[bytes] | OSError | None
    ) -> list[bytes] | None:
        """The message's bytes, or None after answering -ERR (gone, or a disk fault)."""
        if isinstance(result, OSError):
            log.error("%s: %s: cannot read message %d: %s", self.service.name, self.user,
                      event.msg_number, result)
            self.conn.err(f"cannot read message {event.msg_number} just now", "SYS/TEMP")
            return None
        if result is None:
            self.conn.err(f"message {event.msg_number} was removed by another program",
                          "SYS/PERM")
        elif isinstance(event, core.Retrieve):
            metrics.recorder.pop3_retrieved(self.service.name)
        return result

    # -- Update state -----------------------------------------------------------

    async def _update(self, numbers: list[int]) -> None:
        drop = self.maildrop
        assert drop is not None, "the core emits Update only after login"
        self.busy = True
        try:
            failures = await drop.update(numbers)
        except OSError as exc:
            log.error("%s: %s: update failed: %s", self.service.name, self.user, exc)
            failures = len(numbers)
        finally:
            self.busy = False
        log.info("%s: logout user=%s: deleted=%d, failed=%d", self.service.name, self.user,
                 len(numbers) - failures, failures)
        self.conn.update_done(ok=failures == 0)

    def under_stress(self, limit: float) -> None:
        """Only a client not yet logged in gets less time (see _request_timeout)."""
        if self.user is None:
            super().under_stress(limit)

    def close_for_shutdown(self) -> None:
        """Server stopping: close without Update, so nothing is deleted (RFC 1939 6).

        POP3 has no unsolicited "closing" reply like SMTP's 421; the client sees the
        connection end and its marks are forgotten, as after a network failure."""
        self.stream.close()
