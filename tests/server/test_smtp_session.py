"""The asyncio SMTP server on real loopback sockets: delivery, TLS, limits, loops, shutdown.

The server runs in the test's event loop; clients are smtplib (in a thread)
or raw asyncio streams when a test must misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
import os
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from postroom.config import load_config
from postroom.protocol.lines import MAX_MESSAGE_LINE
from postroom.server.main import Running, start
from postroom.store.factory import open_store

MESSAGE = (
    b"From: Smith <smith@isp.example>\r\n"
    b"To: Boss <boss@corp.example>\r\n"
    b"Subject: report\r\n"
    b"\r\n"
    b"The report is attached in spirit.\r\n"
    b".leading dot survives\r\n"
)


def write_config(data: Path, **smtp: Any) -> None:
    lines = [
        'hostname = "mx.corp.example"',
        'domains = ["corp.example"]',
        "[listen]",
        'smtp = "127.0.0.1:0"',
        "[smtp]",
    ]
    for key, value in smtp.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    (data / "postroom.toml").write_text("\n".join(lines) + "\n")


@asynccontextmanager
async def running_server(tmp_path: Path, **smtp: Any) -> AsyncIterator[Running]:
    write_config(tmp_path, **smtp)
    config = load_config(tmp_path)
    directory = open_store(config.store).users
    directory.add_user("boss@corp.example", "boss-secret")
    directory.add_user("alice@corp.example", "alice-secret")
    directory.add_alias("team@corp.example", ["boss@corp.example", "alice@corp.example"])
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


def new_messages(tmp_path: Path, user: str = "boss") -> list[Path]:
    folder = tmp_path / "mail" / "corp.example" / user / "new"
    return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(autouse=True)
def _every_loop(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Every test runs on asyncio's own loop and on uvloop, which `serve` uses."""
    global _LOOP_FACTORY
    _LOOP_FACTORY = loop_factory


_LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop


def run(coro_fn: Callable[[], Any]) -> Any:
    with asyncio.Runner(loop_factory=_LOOP_FACTORY) as runner:
        return runner.run(coro_fn())


def test_delivers_to_maildir_with_return_path_and_received_header(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            host, port = server.address("smtp")

            def send() -> tuple[int, bytes]:
                with smtplib.SMTP(host, port, timeout=10) as client:
                    client.ehlo("client.example")
                    client.mail("smith@isp.example")
                    client.rcpt("boss@corp.example")
                    return client.data(MESSAGE)

            code, text = await asyncio.to_thread(send)
            assert code == 250 and b"queued as" in text

    run(scenario)
    files = new_messages(tmp_path)
    assert len(files) == 1
    raw = files[0].read_bytes()
    assert raw.endswith(MESSAGE)
    # RFC 5321 4.4: final delivery writes the envelope sender on top, then our trace.
    assert raw.startswith(b"Return-Path: <smith@isp.example>\r\n"
                          b"Received: from client.example ([127.0.0.1])")
    assert f",S={len(raw)}" in files[0].name
    box = mailbox.Maildir(tmp_path / "mail" / "corp.example" / "boss", factory=None)
    (msg,) = list(box)
    assert msg["Subject"] == "report"


def test_alias_delivers_one_copy_per_mailbox(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            host, port = server.address("smtp")

            def send() -> dict[str, tuple[int, bytes]]:
                with smtplib.SMTP(host, port, timeout=10) as client:
                    return client.sendmail(
                        "smith@isp.example",
                        ["team@corp.example", "boss@corp.example", "Boss+x@Corp.Example"],
                        MESSAGE,
                    )

            assert await asyncio.to_thread(send) == {}

    run(scenario)
    assert len(new_messages(tmp_path, "boss")) == 1
    assert len(new_messages(tmp_path, "alice")) == 1


def test_starttls_then_delivery_says_esmtps(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            host, port = server.address("smtp")

            def send() -> None:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                with smtplib.SMTP(host, port, timeout=10) as client:
                    client.starttls(context=context)
                    client.sendmail("smith@isp.example", ["boss@corp.example"], MESSAGE)

            await asyncio.to_thread(send)

    run(scenario)
    (path,) = new_messages(tmp_path)
    received = email.message_from_bytes(path.read_bytes())["Received"]
    assert "with ESMTPS id" in received and "using TLSv1." in received


async def raw_session(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    banner = await reader.readline()
    assert banner.startswith(b"220 ")
    return reader, writer


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        lines.append(line)
        if not line or line[3:4] != b"-":
            return b"".join(lines)


def test_client_vanishing_mid_data_leaves_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            reader, writer = await raw_session(*server.address("smtp"))
            for command in (b"EHLO c\r\n", b"MAIL FROM:<a@b.example>\r\n",
                            b"RCPT TO:<boss@corp.example>\r\n", b"DATA\r\n"):
                writer.write(command)
                await read_reply(reader)
            writer.write(b"Subject: half\r\n\r\n" + b"x" * 100_000)
            await writer.drain()
            writer.transport.abort()
            for _ in range(100):
                await asyncio.sleep(0.02)
                if not server.services["smtp"].sessions:
                    break
            assert not server.services["smtp"].sessions

    run(scenario)
    assert new_messages(tmp_path) == []
    leftovers = [p for p in (tmp_path / "mail").rglob("*") if p.is_file()]
    assert leftovers == []


def test_mail_loop_is_refused_554_546(tmp_path: Path) -> None:
    looped = b"".join(b"Received: from hop%d by x; date\r\n" % i for i in range(51)) + MESSAGE

    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            host, port = server.address("smtp")

            def send() -> None:
                with smtplib.SMTP(host, port, timeout=10) as client:
                    with pytest.raises(smtplib.SMTPDataError) as info:
                        client.sendmail("smith@isp.example", ["boss@corp.example"], looped)
                    assert info.value.smtp_code == 554
                    assert info.value.smtp_error.startswith(b"5.4.6")

            await asyncio.to_thread(send)

    run(scenario)
    assert new_messages(tmp_path) == []


def test_per_client_connection_limit_says_421(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path, max_connections_per_client=2) as server:
            host, port = server.address("smtp")
            first = await raw_session(host, port)
            second = await raw_session(host, port)
            reader, writer = await asyncio.open_connection(host, port)
            refused = await read_reply(reader)
            # RFC 2034 3: the greeting carries no enhanced status code.
            assert refused.startswith(b"421 ") and b"Too many connections" in refused
            assert await reader.read() == b""
            for _r, w in (first, second, (reader, writer)):
                w.close()

    run(scenario)


def test_idle_client_times_out_with_421(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path, command_timeout="1s") as server:
            reader, writer = await raw_session(*server.address("smtp"))
            reply = await asyncio.wait_for(read_reply(reader), 10)
            assert reply.startswith(b"421 4.4.2")
            writer.close()

    run(scenario)


def test_shutdown_lets_a_transaction_finish_then_closes(tmp_path: Path) -> None:
    async def scenario() -> None:
        write_config(tmp_path)
        config = load_config(tmp_path)
        open_store(config.store).users.add_user("boss@corp.example", "pw")
        server = await start(config)
        reader, writer = await raw_session(*server.address("smtp"))
        for command in (b"EHLO c\r\n", b"MAIL FROM:<a@b.example>\r\n",
                        b"RCPT TO:<boss@corp.example>\r\n", b"DATA\r\n"):
            writer.write(command)
            await read_reply(reader)
        idle_reader, idle_writer = await raw_session(*server.address("smtp"))
        stopping = asyncio.create_task(server.stop(grace=10))
        while not server.services["smtp"].draining:  # the stop has begun, waits for the transaction
            await asyncio.sleep(0.01)
        assert not stopping.done()
        writer.write(b"Subject: in flight\r\n\r\nbody\r\n.\r\n")
        assert (await read_reply(reader)).startswith(b"250 2.0.0")
        assert (await read_reply(reader)).startswith(b"421 4.3.2")
        assert (await read_reply(idle_reader)).startswith(b"421 4.3.2")
        await asyncio.wait_for(stopping, 10)
        writer.close()
        idle_writer.close()

    run(scenario)
    assert len(new_messages(tmp_path)) == 1


def test_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    from postroom.config import ConfigError

    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            host, port = server.address("smtp")
            other = tmp_path / "other"
            other.mkdir()
            (other / "postroom.toml").write_text(
                f'domains = ["corp.example"]\n[listen]\nsmtp = "{host}:{port}"\n'
            )
            with pytest.raises(ConfigError) as info:
                await start(load_config(other))
            assert "listen.smtp" in str(info.value) and "in use" in str(info.value)

    run(scenario)


def test_plaintext_pipelined_after_starttls_is_discarded(tmp_path: Path) -> None:
    """RFC 3207 4.2: a MAIL smuggled behind STARTTLS must not survive the handshake."""

    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            host, port = server.address("smtp")

            def client() -> bytes:
                import socket

                with socket.create_connection((host, port), timeout=10) as raw:
                    reader = raw.makefile("rb")
                    reader.readline()
                    raw.sendall(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
                    while not reader.readline().startswith(b"220 "):
                        pass
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                    with context.wrap_socket(raw) as tls:
                        tls_reader = tls.makefile("rb")
                        tls.sendall(b"EHLO c\r\n")
                        while tls_reader.readline()[3:4] != b" ":
                            pass
                        tls.sendall(b"RCPT TO:<boss@corp.example>\r\n")
                        return tls_reader.readline()

            reply = await asyncio.to_thread(client)
            assert reply.startswith(b"503 5.5.1"), reply

    run(scenario)


def test_client_hello_right_after_220_is_not_lost(tmp_path: Path) -> None:
    """The ClientHello may arrive the instant the 220 is out; the handshake must see it."""

    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            host, port = server.address("smtp")

            def client() -> bytes:
                import socket

                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                tls = context.wrap_bio(incoming, outgoing)
                with suppress_want_read():
                    tls.do_handshake()
                hello = outgoing.read()
                with socket.create_connection((host, port), timeout=10) as raw:
                    reader = raw.makefile("rb")
                    reader.readline()
                    raw.sendall(b"EHLO c\r\n")
                    while reader.readline()[3:4] != b" ":
                        pass
                    raw.sendall(b"STARTTLS\r\n")
                    # Read the 220 byte by byte and send the hello in the same instant.
                    line = b""
                    while not line.endswith(b"\r\n"):
                        line += raw.recv(1)
                    raw.sendall(hello)
                    assert line.startswith(b"220 ")
                    for _ in range(20):
                        data = raw.recv(65536)
                        if not data:
                            break
                        incoming.write(data)
                        try:
                            tls.do_handshake()
                        except ssl.SSLWantReadError:
                            pending = outgoing.read()
                            if pending:
                                raw.sendall(pending)
                            continue
                        raw.sendall(outgoing.read())
                        tls.write(b"NOOP\r\n")
                        raw.sendall(outgoing.read())
                        while True:
                            incoming.write(raw.recv(65536))
                            try:
                                return tls.read()
                            except ssl.SSLWantReadError:
                                continue
                    return b"handshake never finished"

            reply = await asyncio.to_thread(client)
            assert reply.startswith(b"250 2.0.0"), reply

    run(scenario)


class suppress_want_read:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return kind is ssl.SSLWantReadError


def test_long_lines_one_rule_for_data_and_bdat(tmp_path: Path) -> None:
    """A 5,000-octet line is filed whether it came with DATA or BDAT; a line past
    MAX_MESSAGE_LINE gets the same refusal from both, and nothing is filed."""
    wide = b"Subject: wide\r\n\r\n" + b"w" * 5000 + b"\r\nend\r\n"
    huge = b"Subject: huge\r\n\r\n" + b"h" * (MAX_MESSAGE_LINE + 1) + b"\r\nend\r\n"

    async def send(server: Running, message: bytes, bdat: bool) -> bytes:
        reader, writer = await raw_session(*server.address("smtp"))
        for command in (b"EHLO c\r\n", b"MAIL FROM:<a@b.example>\r\n",
                        b"RCPT TO:<boss@corp.example>\r\n"):
            writer.write(command)
            await read_reply(reader)
        if bdat:
            writer.write(b"BDAT %d LAST\r\n" % len(message) + message)
        else:
            writer.write(b"DATA\r\n")
            assert (await read_reply(reader)).startswith(b"354 ")
            writer.write(message + b".\r\n")
        reply = await read_reply(reader)
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
        writer.close()
        return reply

    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            for bdat in (False, True):
                assert (await send(server, wide, bdat)).startswith(b"250 2.0.0 Ok")
                refused = await send(server, huge, bdat)
                assert refused == (b"554 5.6.0 Message refused: a line is longer than "
                                   b"%d octets\r\n" % MAX_MESSAGE_LINE)

    run(scenario)
    files = new_messages(tmp_path)
    assert len(files) == 2
    assert all(f.read_bytes().endswith(wide) for f in files)


def test_header_floods_are_refused_at_the_end_of_data(tmp_path: Path) -> None:
    """A 1 MB folded header field and 10,000 header fields: the header section's named
    limits (Postfix's header_size_limit and a field count), a clear reply each."""
    folded = b"X-Big: start\r\n" + b" folded text on a continuation line\r\n" * 30_000
    fields = b"".join(b"X%d:y\r\n" % i for i in range(10_000))

    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            host, port = server.address("smtp")

            def send() -> list[tuple[int, bytes]]:
                replies = []
                with smtplib.SMTP(host, port, timeout=30) as client:
                    for header in (folded, fields):
                        with pytest.raises(smtplib.SMTPDataError) as info:
                            client.sendmail("smith@isp.example", ["boss@corp.example"],
                                            header + MESSAGE)
                        replies.append((info.value.smtp_code, info.value.smtp_error))
                    client.sendmail("smith@isp.example", ["boss@corp.example"], MESSAGE)
                return replies

            assert await asyncio.to_thread(send) == [
                (552, b"5.3.4 Message header section exceeds fixed maximum size"),
                (554, b"5.6.0 Message refused: too many header fields"),
            ]

    run(scenario)
    (filed,) = new_messages(tmp_path)  # only the ordinary message that followed
    assert filed.read_bytes().endswith(MESSAGE)
    spool = tmp_path / "mail" / ".spool"
    assert not spool.exists() or not any(spool.iterdir())  # nothing spilled to disk either


@pytest.mark.parametrize("size", [1, 600_000], ids=["in-memory", "spilled"])
def test_the_clients_return_path_is_replaced_by_the_envelope_sender(
    tmp_path: Path, size: int
) -> None:
    """RFC 5321 4.4: a Return-Path sent with the message is no one's to write; the copy
    filed here says who the envelope named, the null sender included."""
    forged = (b"Return-Path: <forged@evil.example>\r\nreturn-path:\r\n <again@evil.example>\r\n"
              + MESSAGE + b"x" * size + b"\r\n")

    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            host, port = server.address("smtp")

            def send() -> None:
                with smtplib.SMTP(host, port, timeout=10) as client:
                    client.sendmail("smith@isp.example", ["boss@corp.example"], forged)
                    client.sendmail("<>", ["alice@corp.example"], MESSAGE)

            await asyncio.to_thread(send)

    run(scenario)
    (to_boss,) = [f.read_bytes() for f in new_messages(tmp_path)]
    assert to_boss.startswith(b"Return-Path: <smith@isp.example>\r\nReceived: ")
    assert to_boss.count(b"eturn-") == 1 and b"evil.example" not in to_boss
    assert to_boss.endswith(MESSAGE + b"x" * size + b"\r\n")
    (bounce,) = [f.read_bytes() for f in new_messages(tmp_path, "alice")]
    assert bounce.startswith(b"Return-Path: <>\r\nReceived: ")


def test_start_sweeps_files_killed_deliveries_left_in_tmp(tmp_path: Path) -> None:
    """A partial file in a Maildir's tmp/ from a delivery killed midway goes at start,
    once it is 36 hours old (as Dovecot's rule); a younger one may still be written."""
    tmp = tmp_path / "mail" / "corp.example" / "boss" / "tmp"
    tmp.mkdir(parents=True)
    for sub in ("new", "cur"):
        (tmp.parent / sub).mkdir()
    killed = tmp / "1700000000.M1P99Q1R0.mx.corp.example,S=9,W=9"
    killed.write_bytes(b"Subject: ")
    os.utime(killed, (time.time() - 37 * 3600,) * 2)
    writing = tmp / "1700000001.M1P98Q1R0.other.example"
    writing.write_bytes(b"Subject: ")

    async def scenario() -> None:
        async with running_server(tmp_path):
            assert not killed.exists()
            assert writing.exists()

    run(scenario)
