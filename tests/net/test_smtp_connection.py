"""net.smtp.SMTPConnection against scripted servers: the set-up the relay and `postroom send` share.

The relay's words for its failures are checked in tests/delivery, send's in
tests/client. Here: the typed failures themselves, what the connection tells
its trace and its on_plaintext hook, and that it says QUIT where it must.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest

from postroom.net.channel import ConnectionFailure, TLSFailed
from postroom.net.smtp import AuthNeedsTLS, Setup, SMTPConnection, StartTLSRefused
from postroom.tlscert import make_self_signed

EHLO_STARTTLS = b"250-old.test\r\n250 STARTTLS"


def server_context(folder: Path) -> ssl.SSLContext:
    cert, key = make_self_signed("old.test")
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@asynccontextmanager
async def scripted(replies: dict[bytes, bytes], heard: list[bytes], *,
                   context: ssl.SSLContext | None = None, implicit: bool = False
                   ) -> AsyncIterator[int]:
    """A server answering each command by its first word (`replies`; 502 when absent),
    keeping every line read in `heard`. With `context` it takes STARTTLS after a 220 to
    it (or is TLS from the start when `implicit`). Its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.test ESMTP\r\n")
        with suppress(ConnectionError, ssl.SSLError):
            while line := await reader.readline():
                heard.append(line.rstrip(b"\r\n"))
                word = line.split(None, 1)[0].upper() if line.strip() else b""
                writer.write(replies.get(word, b"502 5.5.1 not here") + b"\r\n")
                await writer.drain()
                if word == b"QUIT":
                    break
                if word == b"STARTTLS" and replies[word].startswith(b"220"):
                    assert context is not None
                    await writer.start_tls(context)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0,
                                        ssl=context if implicit else None)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def test_the_trace_tells_the_conversation_and_never_the_password(tmp_path: Path) -> None:
    heard: list[bytes] = []
    lines: list[str] = []
    replies = {b"EHLO": b"250-old.test\r\n250-SIZE 1000\r\n250 AUTH PLAIN",
               b"AUTH": b"235 2.7.0 welcome", b"QUIT": b"221 2.0.0 bye"}

    async def scenario() -> int:
        async with scripted(replies, heard, context=server_context(tmp_path),
                            implicit=True) as port:
            connection = await SMTPConnection.open("localhost", port, Setup(
                tls="implicit", tls_context=unverified(), helo="client.test",
                login=("smith", "s3cret"), trace=lines.append))
            assert connection.tls_active and connection.extensions.size_limit == 1000
            await connection.quit()
            assert connection.closed
        return port

    port = asyncio.run(scenario())
    assert lines[0] == f"connected to localhost:{port} (127.0.0.1)"
    assert lines[1].startswith("TLS: TLSv1.")
    assert lines[2:] == [
        "S: 220 old.test ESMTP", "C: EHLO client.test", "S: 250 old.test (SIZE 1000, AUTH PLAIN)",
        "C: AUTH PLAIN (credentials hidden)", "S: 235 2.7.0 welcome",
        "C: QUIT", "S: 221 2.0.0 bye"]
    assert heard[1].startswith(b"AUTH PLAIN ") and heard[-1] == b"QUIT"


@pytest.mark.parametrize("tls", ["none", "opportunistic"])
def test_a_login_is_never_sent_without_tls(tls: str) -> None:
    heard: list[bytes] = []
    replies = {b"EHLO": b"250-old.test\r\n250 AUTH PLAIN LOGIN", b"QUIT": b"221 bye"}

    async def scenario() -> None:
        async with scripted(replies, heard) as port:
            with pytest.raises(AuthNeedsTLS):
                await SMTPConnection.open("127.0.0.1", port, Setup(
                    tls=tls, tls_context=unverified(), helo="client.test",
                    login=("smith", "s3cret")))

    asyncio.run(scenario())
    assert heard == [b"EHLO client.test", b"QUIT"]


def test_a_refused_starttls_is_told_or_fails_where_tls_is_required() -> None:
    heard: list[bytes] = []
    told: list[ConnectionFailure] = []
    replies = {b"EHLO": EHLO_STARTTLS, b"STARTTLS": b"454 4.7.0 not now", b"QUIT": b"221 bye"}

    async def scenario() -> None:
        async with scripted(replies, heard) as port:
            setup = Setup(tls="opportunistic", tls_context=unverified(), helo="client.test",
                          on_plaintext=told.append)
            connection = await SMTPConnection.open("127.0.0.1", port, setup)
            assert not connection.tls_active and not connection.tls_fallback
            await connection.quit()
            with pytest.raises(StartTLSRefused) as caught:
                await SMTPConnection.open("127.0.0.1", port, Setup(
                    tls="required", tls_context=unverified(), helo="client.test"))
            assert caught.value.reply.code == 454 and caught.value.command == "STARTTLS"
            assert caught.value.address == ("127.0.0.1", port)

    asyncio.run(scenario())
    (refused,) = told
    assert isinstance(refused, StartTLSRefused) and refused.reply.code == 454
    assert heard == [b"EHLO client.test", b"STARTTLS", b"QUIT"] * 2


def test_a_failed_handshake_is_told_before_the_plaintext_connection(tmp_path: Path) -> None:
    heard: list[bytes] = []
    told: list[ConnectionFailure] = []
    replies = {b"EHLO": EHLO_STARTTLS, b"STARTTLS": b"220 go ahead", b"QUIT": b"221 bye"}

    async def scenario() -> None:
        async with scripted(replies, heard, context=server_context(tmp_path)) as port:
            verifying = ssl.create_default_context()  # does not trust the self-signed cert
            setup = Setup(tls="opportunistic", tls_context=verifying, helo="client.test",
                          on_plaintext=told.append)
            connection = await SMTPConnection.open("127.0.0.1", port, setup)
            assert told and not connection.tls_active and connection.tls_fallback
            await connection.quit()

    asyncio.run(scenario())
    (failed,) = told
    assert isinstance(failed, TLSFailed)
    assert isinstance(failed.error, ssl.SSLCertVerificationError)
    # The second connection never says STARTTLS.
    assert heard == [b"EHLO client.test", b"STARTTLS", b"EHLO client.test", b"QUIT"]
