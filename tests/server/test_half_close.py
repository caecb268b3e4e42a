"""A client that pipelines its commands and QUIT, then half-closes, hears every reply.

A FIN ends only the client's sending side (RFC 9293 3.6); Exim does exactly
this without TLS: MAIL, RCPT, `BDAT n LAST` with the data and QUIT in one
write, then shutdown(SHUT_WR), then it reads. Every command the server read is
answered, QUIT gets its 221 (RFC 5321 4.1.1.10) or +OK (RFC 1939 6), and only
then does the server close. The commands here are the ones whose replies need
the session to wait (the end of a message, a password check), where the
server used to close at once and leave the client without its 250.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store

BODY = b"Subject: half-close\r\n\r\nsent, then the client shut its side\r\n"


@pytest.fixture
def run(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> Callable[[Callable[[], Any]], Any]:
    """Runs a scenario on asyncio's loop and on uvloop, which `serve` uses."""

    def runner(scenario: Callable[[], Any]) -> Any:
        with asyncio.Runner(loop_factory=loop_factory) as loop:
            return loop.run(scenario())

    return runner


@asynccontextmanager
async def running_server(tmp_path: Path) -> AsyncIterator[Running]:
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\n'
        'domains = ["corp.example"]\n'
        "[listen]\n"
        'smtp = "127.0.0.1:0"\n'
        'submission = "127.0.0.1:0"\n'
        'submissions = "127.0.0.1:0"\n'
        'pop3 = "127.0.0.1:0"\n'
        'pop3s = "127.0.0.1:0"\n'
        "[smtp]\n"
        "allow_plaintext_auth = true\n"
        "[pop3]\n"
        "allow_plaintext_auth = true\n"
        "apop = true\n"
    )
    config = load_config(tmp_path)
    directory = open_store(config.store).users
    directory.add_user("boss@corp.example", "boss-secret")
    directory.set_apop_secret("boss@corp.example", "apop-secret")
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


def half_closed_exchange(address: tuple[str, int], *writes: bytes) -> bytes:
    """Send each write in turn (where a write ends with the marker b"|wait:N|", read
    its N replies first), shut the sending side, and return everything the server
    sent until it closed."""
    with socket.create_connection(address, timeout=10) as sock:
        received = bytearray()
        reader = sock.makefile("rb")
        received += reader.readline()  # the greeting
        for write in writes:
            match = re.search(rb"\|wait:(\d+)\|$", write)
            if match is None:
                sock.sendall(write)
                continue
            sock.sendall(write[: match.start()])
            replies = 0
            while replies < int(match.group(1)):
                line = reader.readline()
                received += line
                replies += line[3:4] == b" "
        sock.shutdown(socket.SHUT_WR)
        while chunk := reader.read1(65536):
            received += chunk
        return bytes(received)


def reply_codes(transcript: bytes) -> list[str]:
    """The code of each final SMTP reply line (multi-line replies count once)."""
    return [line[:3].decode() for line in transcript.split(b"\r\n") if line[3:4] == b" "]


def new_messages(tmp_path: Path) -> list[bytes]:
    folder = tmp_path / "mail" / "corp.example" / "boss" / "new"
    return [p.read_bytes() for p in folder.iterdir()] if folder.is_dir() else []


def test_smtp_bdat_last_and_quit_then_half_close(tmp_path: Path, run: Callable[..., Any]) -> None:
    async def scenario() -> bytes:
        async with running_server(tmp_path) as server:
            return await asyncio.to_thread(
                half_closed_exchange, server.address("smtp"),
                b"EHLO exim.example\r\n|wait:1|",
                b"MAIL FROM:<smith@isp.example>\r\nRCPT TO:<boss@corp.example>\r\n"
                + f"BDAT {len(BODY)} LAST\r\n".encode() + BODY + b"QUIT\r\n",
            )

    transcript = run(scenario)
    assert reply_codes(transcript) == ["220", "250", "250", "250", "250", "221"]
    assert b"250 2.0.0 Ok: queued as" in transcript
    (stored,) = new_messages(tmp_path)
    assert stored.endswith(BODY)


def test_smtp_end_of_data_and_quit_then_half_close(
    tmp_path: Path, run: Callable[..., Any]
) -> None:
    async def scenario() -> bytes:
        async with running_server(tmp_path) as server:
            return await asyncio.to_thread(
                half_closed_exchange, server.address("smtp"),
                b"EHLO client.example\r\nMAIL FROM:<smith@isp.example>\r\n"
                b"RCPT TO:<boss@corp.example>\r\nDATA\r\n|wait:4|",
                BODY + b".\r\nQUIT\r\n",
            )

    transcript = run(scenario)
    assert reply_codes(transcript) == ["220", "250", "250", "250", "354", "250", "221"]
    (stored,) = new_messages(tmp_path)
    assert stored.endswith(BODY)


def test_smtp_auth_pipelined_then_half_close(tmp_path: Path, run: Callable[..., Any]) -> None:
    """The password check is awaited in a thread; its 235 and the rest still come."""
    import base64

    plain = base64.b64encode(b"\0boss@corp.example\0boss-secret")

    async def scenario() -> bytes:
        async with running_server(tmp_path) as server:
            return await asyncio.to_thread(
                half_closed_exchange, server.address("submission"),
                b"EHLO laptop.example\r\n|wait:1|",
                b"AUTH PLAIN " + plain + b"\r\nMAIL FROM:<boss@corp.example>\r\n"
                b"RCPT TO:<boss@corp.example>\r\n"
                + f"BDAT {len(BODY)} LAST\r\n".encode() + BODY + b"QUIT\r\n",
            )

    transcript = run(scenario)
    assert reply_codes(transcript) == ["220", "250", "235", "250", "250", "250", "221"]
    assert len(new_messages(tmp_path)) == 1


def deliver_one(server: Running) -> None:
    half_closed_exchange(
        server.address("smtp"),
        b"EHLO client.example\r\nMAIL FROM:<smith@isp.example>\r\n"
        + b"RCPT TO:<boss@corp.example>\r\n"
        + f"BDAT {len(BODY)} LAST\r\n".encode() + BODY + b"QUIT\r\n",
    )


def pop3_commands_with_login(login: bytes) -> bytes:
    return login + b"STAT\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n"


@pytest.mark.parametrize("mechanism", ["USER/PASS", "APOP"])
def test_pop3_pipelined_login_retr_dele_quit_then_half_close(
    tmp_path: Path, run: Callable[..., Any], mechanism: str
) -> None:
    """RFC 2449 PIPELINING: the whole session in one write, then the FIN. The login
    (a password hash, or APOP's digest) is awaited; QUIT's Update still deletes."""

    async def scenario() -> bytes:
        async with running_server(tmp_path) as server:
            await asyncio.to_thread(deliver_one, server)
            address = server.address("pop3")

            def session() -> bytes:
                with socket.create_connection(address, timeout=10) as sock:
                    reader = sock.makefile("rb")
                    greeting = reader.readline()
                    if mechanism == "APOP":
                        stamp = re.search(rb"<[^>]+>", greeting)
                        assert stamp is not None, greeting
                        digest = hashlib.md5(stamp.group() + b"apop-secret").hexdigest()
                        login = f"APOP boss@corp.example {digest}\r\n".encode()
                    else:
                        login = b"USER boss@corp.example\r\nPASS boss-secret\r\n"
                    sock.sendall(pop3_commands_with_login(login))
                    sock.shutdown(socket.SHUT_WR)
                    rest = bytearray()
                    while chunk := reader.read1(65536):
                        rest += chunk
                    return bytes(rest)

            return await asyncio.to_thread(session)

    transcript = run(scenario)
    statuses = [line.split(b" ")[0] for line in transcript.split(b"\r\n")
                if line.startswith((b"+OK", b"-ERR"))]
    logins = 2 if mechanism == "USER/PASS" else 1
    assert statuses == [b"+OK"] * (logins + 4), transcript  # login, STAT, RETR, DELE, QUIT
    assert BODY in transcript.replace(b"\r\n..", b"\r\n.")
    assert b"signing off" in transcript
    assert new_messages(tmp_path) == []
    cur = tmp_path / "mail" / "corp.example" / "boss" / "cur"
    assert not cur.is_dir() or not list(cur.iterdir())  # Update deleted it


class TLSClient:
    """A TLS client on memory buffers, which can send close_notify and still read
    (Exim's order at the end of a pipelined BDAT: QUIT, close_notify, read)."""

    def __init__(self, sock: socket.socket) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing)
        self.plain = bytearray()
        self.closed_by_server = False

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def _receive(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.incoming.write(data)
        return True

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                assert self._receive(), "the server closed during the handshake"

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def close_notify(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._flush()

    def read_until(self, needle: bytes) -> bytes:
        while needle not in self.plain:
            self._read_some()
        return bytes(self.plain)

    def read_to_end(self) -> bytes:
        """Plaintext until the server's close_notify or its FIN."""
        while not self.closed_by_server:
            if not self._read_some():
                break
        return bytes(self.plain)

    def _read_some(self) -> bool:
        """Decrypt what has come, or wait for more; False at the server's FIN."""
        try:
            piece = self.tls.read(65536)
        except ssl.SSLWantReadError:
            return self._receive()
        except ssl.SSLZeroReturnError:  # close_notify, when ours went first
            piece = b""
        if piece:
            self.plain += piece
        else:
            self.closed_by_server = True  # b"": the server's close_notify
        return True


def tls_session(address: tuple[str, int], *, starttls: bytes | None, first: bytes,
                pipelined: bytes, fin: bool = False) -> bytes:
    """Connect (STARTTLS first when `starttls` is the command), read the greeting, send
    `first` and read its reply, then send `pipelined` and close_notify (and a FIN
    with `fin`), and read all."""
    with socket.create_connection(address, timeout=10) as sock:
        if starttls is not None:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(starttls)
            while not reader.readline().startswith(b"220 "):
                pass
        client = TLSClient(sock)
        client.handshake()
        if starttls is None:
            client.read_until(b"\r\n")  # the greeting
        before = len(client.read_until(b"")) if starttls is not None else len(client.plain)
        client.send(first)
        client.read_until(b"250 " if first.startswith(b"EHLO") else b"+OK")
        client.plain = client.plain[before:]
        client.send(pipelined)
        client.close_notify()
        if fin:
            sock.shutdown(socket.SHUT_WR)
        return client.read_to_end()


def test_smtp_over_starttls_pipelined_then_close_notify_and_fin(
    tmp_path: Path, run: Callable[..., Any]
) -> None:
    """Exim's TLS proxy, at the end of a connection passed from message to message:
    the data and QUIT, its close_notify, then shutdown(SHUT_WR) of the socket."""

    async def scenario() -> bytes:
        async with running_server(tmp_path) as server:
            return await asyncio.to_thread(
                tls_session, server.address("smtp"),
                starttls=b"EHLO exim.example\r\nSTARTTLS\r\n", first=b"EHLO exim.example\r\n",
                pipelined=b"MAIL FROM:<smith@isp.example>\r\nRCPT TO:<boss@corp.example>\r\n"
                + f"BDAT {len(BODY)} LAST\r\n".encode() + BODY + b"QUIT\r\n", fin=True,
            )

    transcript = run(scenario)
    assert reply_codes(transcript) == ["250", "250", "250", "250", "221"], transcript
    assert len(new_messages(tmp_path)) == 1


def test_submissions_pipelined_then_close_notify(tmp_path: Path, run: Callable[..., Any]) -> None:
    import base64

    plain = base64.b64encode(b"\0boss@corp.example\0boss-secret")

    async def scenario() -> bytes:
        async with running_server(tmp_path) as server:
            return await asyncio.to_thread(
                tls_session, server.address("submissions"), starttls=None,
                first=b"EHLO laptop.example\r\n",
                pipelined=b"AUTH PLAIN " + plain + b"\r\nMAIL FROM:<boss@corp.example>\r\n"
                b"RCPT TO:<boss@corp.example>\r\n"
                + f"BDAT {len(BODY)} LAST\r\n".encode() + BODY + b"QUIT\r\n",
            )

    transcript = run(scenario)
    assert reply_codes(transcript) == ["250", "235", "250", "250", "250", "221"], transcript
    assert len(new_messages(tmp_path)) == 1


def test_pop3s_pipelined_then_close_notify(tmp_path: Path, run: Callable[..., Any]) -> None:
    async def scenario() -> bytes:
        async with running_server(tmp_path) as server:
            await asyncio.to_thread(deliver_one, server)
            return await asyncio.to_thread(
                tls_session, server.address("pop3s"), starttls=None, first=b"CAPA\r\n",
                pipelined=pop3_commands_with_login(
                    b"USER boss@corp.example\r\nPASS boss-secret\r\n"),
            )

    transcript = run(scenario)
    assert transcript.count(b"+OK") >= 6 and b"-ERR" not in transcript, transcript
    assert b"signing off" in transcript
    assert new_messages(tmp_path) == []


def test_implicit_tls_listener_drops_a_plaintext_client_and_serves_the_next(
    tmp_path: Path, run: Callable[..., Any]
) -> None:
    """A client that never speaks TLS ends its own connection, not the listener."""

    async def scenario() -> tuple[bytes, bytes]:
        async with running_server(tmp_path) as server:
            address = server.address("submissions")

            def clients() -> tuple[bytes, bytes]:
                with socket.create_connection(address, timeout=10) as plain:
                    plain.sendall(b"EHLO not-tls\r\n")
                    dropped = plain.recv(4096)  # an alert at most, then the close
                    while more := plain.recv(4096):
                        dropped += more
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                with socket.create_connection(address, timeout=10) as raw, \
                        context.wrap_socket(raw) as tls:
                    return dropped, tls.recv(4096)

            return await asyncio.to_thread(clients)

    dropped, greeting = run(scenario)
    assert b"220" not in dropped
    assert greeting.startswith(b"220 mx.corp.example ESMTP")


@pytest.mark.parametrize("listener", ["smtp", "pop3"])
def test_bytes_after_quit_do_not_reset_the_connection_before_the_reply(
    tmp_path: Path, run: Callable[..., Any], listener: str
) -> None:
    """Closing a socket that still holds unread bytes sends a reset, and the client's
    kernel drops the replies it has not read. The server half-closes, drops what
    comes after QUIT until the client's FIN, and only then closes."""
    quit_ = b"EHLO client.example\r\nQUIT\r\n" if listener == "smtp" else b"QUIT\r\n"

    async def scenario() -> tuple[bytes, BaseException | None]:
        async with running_server(tmp_path) as server:
            address = server.address(listener)

            def client() -> tuple[bytes, BaseException | None]:
                with socket.create_connection(address, timeout=10) as sock:
                    sock.sendall(quit_ + b"NOOP\r\n" * 50_000)
                    received = bytearray()
                    try:
                        while chunk := sock.recv(65536):
                            received += chunk
                    except ConnectionResetError as exc:
                        return bytes(received), exc
                    return bytes(received), None

            return await asyncio.to_thread(client)

    received, reset = run(scenario)
    assert reset is None
    assert b"221 2.0.0" in received if listener == "smtp" else b"signing off" in received
