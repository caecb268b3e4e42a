"""The SMTP client session against scripted servers that misbehave on purpose.

Each test's server is a coroutine that reads the client's commands and
answers exactly what the test wants: pipelining that must arrive as one group,
421 in the middle, malformed replies, data behind the 220 to STARTTLS, a
server that stops answering or reading, and refusals at each step.
"""

from __future__ import annotations

import asyncio
import io
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from postroom.delivery.smtp_errors import SMTPError
from postroom.delivery.smtp_out import (
    ClientSession,
    Hop,
    OutRecipient,
    Timeouts,
    TransactionResult,
)
from postroom.protocol.replies import Reply

FAST = Timeouts(greeting=5, mail=5, rcpt=5, data_init=5, data_block=5, data_end=5)
PIPELINING_EHLO = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 ENHANCEDSTATUSCODES"
PLAIN_EHLO = "250-mx.test\r\n250 HELP"


class Conversation:
    """The server's side of one connection, as a script sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.lines: list[bytes] = []  # every command line read, without CRLF

    async def line(self) -> bytes:
        data = await self.reader.readline()
        assert data.endswith(b"\r\n"), f"client sent {data!r}"
        self.lines.append(data[:-2])
        return data[:-2]

    async def expect(self, prefix: str) -> bytes:
        line = await self.line()
        assert line.startswith(prefix.encode()), f"expected {prefix!r}, got {line!r}"
        return line

    async def say(self, *replies: str) -> None:
        self.writer.write("".join(f"{r}\r\n" for r in replies).encode())
        await self.writer.drain()

    async def greet(self, ehlo: str = PIPELINING_EHLO) -> None:
        await self.say("220 mx.test ESMTP")
        await self.expect("EHLO relay.example")
        await self.say(ehlo)

    async def content(self) -> bytes:
        """DATA content up to and including the final dot line."""
        data = await self.reader.readuntil(b"\r\n.\r\n")
        return data

    async def closed(self) -> bool:
        return await self.reader.read(1) == b""


Script = Callable[[Conversation], Awaitable[None]]


@asynccontextmanager
async def scripted(script: Script, *, rcvbuf: int = 0) -> AsyncIterator[Hop]:
    """A one-connection server running `script`; its failures fail the test."""
    failures: list[BaseException] = []
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(Conversation(reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up: the test says whether it should have
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            failures.append(exc)
        finally:
            writer.close()
            done.set()

    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(serve, sock=sock)
    try:
        yield Hop("127.0.0.1", sock.getsockname()[1], "mx.test")
        await asyncio.wait_for(done.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()
        if failures:
            raise failures[0]  # the server's view explains the client's failure


_LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop


@pytest.fixture(autouse=True)
def _every_loop(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Every test runs on asyncio's own loop and on uvloop (flow control and TLS differ)."""
    global _LOOP_FACTORY
    _LOOP_FACTORY = loop_factory


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=_LOOP_FACTORY) as runner:
        runner.run(coro_fn())  # type: ignore[arg-type]


async def connect(hop: Hop, timeouts: Timeouts = FAST) -> ClientSession:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return await ClientSession.connect(
        hop, helo="relay.example", tls_context=context, command_timeout=5, timeouts=timeouts
    )


async def send(
    session: ClientSession, tmp_path: Path, *rcpts: str, data: bytes = b"Subject: x\r\n\r\nhi\r\n"
) -> TransactionResult:
    return await session.send(
        sender="a@x.example",
        recipients=[OutRecipient(r) for r in rcpts],
        message=io.BytesIO(data),
        size=len(data),
    )


# --- Pipelining ----------------------------------------------------------------------


def test_pipelining_sends_mail_rcpts_and_data_as_one_group(tmp_path: Path) -> None:
    async def script(c: Conversation) -> None:
        await c.greet()
        # No reply until DATA has arrived: a client waiting for the MAIL reply
        # would time out here (RFC 2920 3.1).
        group = await c.reader.readuntil(b"DATA\r\n")
        assert group == (
            b"MAIL FROM:<a@x.example> SIZE=18\r\n"
            b"RCPT TO:<b@y.example>\r\n"
            b"RCPT TO:<nobody@y.example>\r\n"
            b"RCPT TO:<c@y.example>\r\n"
            b"DATA\r\n"
        )
        await c.say("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user", "250 2.1.5 ok")
        await c.say("354 go ahead")
        assert await c.content() == b"Subject: x\r\n\r\nhi\r\n.\r\n"
        await c.say("250 2.0.0 queued")
        await c.expect("QUIT")
        await c.say("221 2.0.0 bye")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            result = await send(session, tmp_path, "b@y.example", "nobody@y.example", "c@y.example")
            await session.quit()
        assert result.recipients == {
            "b@y.example": Reply(250, "2.0.0", "queued"),
            "nobody@y.example": Reply(550, "5.1.1", "no such user"),
            "c@y.example": Reply(250, "2.0.0", "queued"),
        }

    run(scenario)


def test_small_message_and_its_final_dot_come_in_one_write(tmp_path: Path) -> None:
    """The last chunk waits for the end-of-data dot: one write (one TLS record) for
    a small message, so the next hop reads it all at once."""
    text = b"Subject: one write\r\n\r\n.dot\r\n" + (b"x" * 900 + b"\r\n") * 3

    async def script(c: Conversation) -> None:
        await c.greet()
        await c.reader.readuntil(b"DATA\r\n")
        await c.say("250 2.1.0 ok", "250 2.1.5 ok", "354 go ahead")
        first = await c.reader.read(65536)  # whatever one write put on the wire
        assert first == text.replace(b"\n.", b"\n..") + b".\r\n"
        await c.say("250 2.0.0 queued")
        await c.expect("QUIT")
        await c.say("221 2.0.0 bye")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            result = await send(session, tmp_path, "b@y.example", data=text)
            await session.quit()
        assert result.recipients == {"b@y.example": Reply(250, "2.0.0", "queued")}

    run(scenario)


def test_pipelined_mail_refused_gives_every_recipient_the_mail_reply(tmp_path: Path) -> None:
    async def script(c: Conversation) -> None:
        await c.greet()
        await c.reader.readuntil(b"DATA\r\n")
        await c.say("550 5.7.1 sender refused", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL")
        await c.say("503 5.5.1 need MAIL")
        await c.expect("QUIT")  # no RSET needed: MAIL was refused

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            result = await send(session, tmp_path, "b@y.example", "c@y.example")
            await session.quit()
        refused = Reply(550, "5.7.1", "sender refused")
        assert result.recipients == {"b@y.example": refused, "c@y.example": refused}
        assert result.data_reply is None

    run(scenario)


def test_pipelined_data_accepted_without_recipients_gets_a_lone_dot(tmp_path: Path) -> None:
    async def script(c: Conversation) -> None:
        await c.greet()
        await c.reader.readuntil(b"DATA\r\n")
        await c.say("250 ok", "550 5.1.1 unknown", "354 go ahead anyway")
        assert await c.reader.readexactly(3) == b".\r\n"  # RFC 2920 3.1
        await c.say("554 5.5.1 no valid recipients")
        await c.expect("QUIT")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            result = await send(session, tmp_path, "b@y.example")
            await session.quit()
        assert result.data_reply is None
        assert result.recipients["b@y.example"].code == 550

    run(scenario)


# --- CHUNKING (RFC 3030) -----------------------------------------------------------------

CHUNKING_EHLO = (
    "250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-SIZE 10000000\r\n"
    "250 ENHANCEDSTATUSCODES"
)


def test_chunking_sends_mail_rcpts_and_the_whole_small_message_in_one_write(
    tmp_path: Path,
) -> None:
    """MAIL, RCPTs and BDAT LAST with the message: one write, one round trip. The
    octets are DATA's without the stuffing: CRLF line ends, a final CRLF added."""
    data = b"Subject: x\n\n.leading dot\r\nbare CR\rend"
    wire = b"Subject: x\r\n\r\n.leading dot\r\nbare CR\r\nend\r\n"

    async def script(c: Conversation) -> None:
        await c.greet(CHUNKING_EHLO)
        group = await c.reader.read(65536)  # whatever one write put on the wire
        assert group == (
            b"MAIL FROM:<a@x.example> SIZE=%d\r\n"
            b"RCPT TO:<b@y.example>\r\n"
            b"RCPT TO:<nobody@y.example>\r\n"
            b"BDAT %d LAST\r\n" % (len(data), len(wire))
        ) + wire
        await c.say("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user")
        await c.say("250 2.0.0 queued")
        await c.expect("QUIT")
        await c.say("221 2.0.0 bye")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            result = await send(session, tmp_path, "b@y.example", "nobody@y.example", data=data)
            await session.quit()
        assert result.recipients == {
            "b@y.example": Reply(250, "2.0.0", "queued"),
            "nobody@y.example": Reply(550, "5.1.1", "no such user"),
        }
        assert result.data_reply == Reply(250, "2.0.0", "queued")

    run(scenario)


async def read_chunk(c: Conversation) -> tuple[bytes, bool]:
    """One BDAT command and its octets, as the server reads them."""
    line = await c.expect("BDAT ")
    words = line.split()
    return await c.reader.readexactly(int(words[1])), words[-1] == b"LAST"


def test_a_large_message_goes_in_chunks_and_arrives_whole(tmp_path: Path) -> None:
    data = b"Subject: big\r\n\r\n" + b"0123456789abcdef\n" * 20_000  # 340 kB, LF ends

    async def script(c: Conversation) -> None:
        await c.greet(CHUNKING_EHLO)
        await c.expect("MAIL")
        await c.expect("RCPT")
        received, sizes, last = b"", [], False
        while not last:
            chunk, last = await read_chunk(c)
            received += chunk
            sizes.append(len(chunk))
            if len(sizes) == 1:
                await c.say("250 2.1.0 ok", "250 2.1.5 ok")
            await c.say(f"250 2.0.0 {len(chunk)} octets" if not last else "250 2.0.0 queued")
        assert received == data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert len(sizes) > 4 and max(sizes) <= 2 * 64 * 1024
        await c.expect("QUIT")
        await c.say("221 2.0.0 bye")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            result = await send(session, tmp_path, "b@y.example", data=data)
            await session.quit()
        assert result.data_reply == Reply(250, "2.0.0", "queued")

    run(scenario)


def test_a_refused_chunk_ends_the_transaction_with_rset(tmp_path: Path) -> None:
    data = b"Subject: big\r\n\r\n" + b"x" * 200_000 + b"\r\n"

    async def script(c: Conversation) -> None:
        await c.greet(CHUNKING_EHLO)
        await c.expect("MAIL")
        await c.expect("RCPT")
        chunk, last = await read_chunk(c)
        assert not last
        await c.say("250 2.1.0 ok", "250 2.1.5 ok", "452 4.3.1 out of disk space")
        chunk, last = await read_chunk(c)  # written before the refusal was read
        await c.say("503 5.5.1 no transaction")
        await c.expect("RSET")
        await c.say("250 2.0.0 ok")
        await c.expect("QUIT")
        await c.say("221 2.0.0 bye")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            result = await send(session, tmp_path, "b@y.example", data=data)
            assert not session.closed
            await session.quit()
        assert result.data_reply is None
        assert result.recipients == {"b@y.example": Reply(452, "4.3.1", "out of disk space")}

    run(scenario)


def test_refused_mail_or_recipients_the_chunk_is_refused_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    async def script(c: Conversation) -> None:
        await c.greet(CHUNKING_EHLO)
        for _ in range(2):
            await c.expect("MAIL")
            await c.expect("RCPT")
            await read_chunk(c)
            await c.say("250 2.1.0 ok", "550 5.1.1 no such user", "554 5.5.1 no valid recipients")
            await c.expect("RSET")  # MAIL was accepted: the transaction is cleared
            await c.say("250 2.0.0 ok")
        await c.expect("MAIL")
        await c.expect("RCPT")
        await read_chunk(c)
        await c.say("550 5.7.1 sender refused", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL")
        await c.expect("QUIT")  # no transaction was opened: no RSET
        await c.say("221 2.0.0 bye")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            for _ in range(2):
                result = await send(session, tmp_path, "nobody@y.example")
                assert result.data_reply is None
                assert result.recipients == {
                    "nobody@y.example": Reply(550, "5.1.1", "no such user")
                }
            result = await send(session, tmp_path, "b@y.example")
            assert result.recipients == {"b@y.example": Reply(550, "5.7.1", "sender refused")}
            await session.quit()

    run(scenario)


# --- Lockstep ----------------------------------------------------------------------------


def test_ehlo_refused_falls_back_to_helo_and_lockstep(tmp_path: Path) -> None:
    async def script(c: Conversation) -> None:
        await c.say("220 old.test SMTP")
        await c.expect("EHLO relay.example")
        await c.say("502 command not implemented")
        await c.expect("HELO relay.example")
        await c.say("250 old.test")
        assert await c.line() == b"MAIL FROM:<a@x.example>"  # no SIZE: not offered
        await c.say("250 ok")
        await c.expect("RCPT TO:<b@y.example>")
        await c.say("250 ok")
        await c.expect("DATA")
        await c.say("354 go")
        await c.content()
        await c.say("250 done")
        await c.expect("QUIT")
        await c.say("221 bye")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            assert not session.connection.extensions.keywords
            result = await send(session, tmp_path, "b@y.example")
            await session.quit()
        assert result.data_reply == Reply(250, None, "done")

    run(scenario)


def test_data_refused_then_rset(tmp_path: Path) -> None:
    async def script(c: Conversation) -> None:
        await c.greet(PLAIN_EHLO)
        for command in ("MAIL", "RCPT", "RCPT"):
            await c.expect(command)
            await c.say("250 ok")
        await c.expect("DATA")
        await c.say("451 4.3.0 try later")
        await c.expect("RSET")
        await c.say("250 ok")
        await c.expect("QUIT")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            result = await send(session, tmp_path, "b@y.example", "c@y.example")
            await session.quit()
        assert result.data_reply is None
        assert set(result.recipients.values()) == {Reply(451, None, "4.3.0 try later")}

    run(scenario)


def test_eight_bit_content_without_8bitmime_is_sent_as_is(tmp_path: Path) -> None:
    data = "Subject: Grüße\r\n\r\nbody\r\n".encode()

    async def script(c: Conversation) -> None:
        await c.greet(PLAIN_EHLO)
        assert await c.line() == b"MAIL FROM:<a@x.example>"  # no BODY=8BITMIME
        await c.say("250 ok")
        await c.expect("RCPT")
        await c.say("250 ok")
        await c.expect("DATA")
        await c.say("354 go")
        assert await c.content() == data + b".\r\n"
        await c.say("250 done")
        await c.expect("QUIT")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            result = await send(session, tmp_path, "b@y.example", data=data)
            await session.quit()
        assert result.data_reply is not None and len(result.notes) == 1

    run(scenario)


# --- Failures of the session -------------------------------------------------------------


def test_421_mid_session_is_temporary_and_closes(tmp_path: Path) -> None:
    async def script(c: Conversation) -> None:
        await c.greet(PLAIN_EHLO)
        await c.expect("MAIL")
        await c.say("250 ok")
        await c.expect("RCPT")
        await c.say("421 4.3.2 shutting down")
        assert await c.closed()

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            with pytest.raises(SMTPError) as caught:
                await send(session, tmp_path, "b@y.example")
            assert session.closed
            await session.quit()  # nothing left to do: no error
        error = caught.value
        # No ENHANCEDSTATUSCODES, yet the code in the text is the best status there is.
        assert error.temporary and error.status == "4.3.2"
        assert error.reply == Reply(421, None, "4.3.2 shutting down", close=True)
        assert "(in reply to RCPT TO command)" in error.text

    run(scenario)


@pytest.mark.parametrize(
    ("greeting", "temporary"), [("421 4.3.2 busy", True), ("554 5.7.1 go away", False)]
)
def test_greeting_refusals(greeting: str, temporary: bool) -> None:
    async def script(c: Conversation) -> None:
        await c.say(greeting)
        if not temporary:
            await c.expect("QUIT")  # RFC 5321 3.1: a 554 greeting still waits for QUIT
            await c.say("221 bye")

    async def scenario() -> None:
        async with scripted(script) as hop:
            with pytest.raises(SMTPError) as caught:
                await connect(hop)
        assert caught.value.temporary == temporary
        assert caught.value.reply is not None
        assert caught.value.reply.code == int(greeting[:3])

    run(scenario)


@pytest.mark.parametrize("garbage", ["hello there", "250-first line\r\n251 second code"])
def test_malformed_reply_is_a_temporary_protocol_error(garbage: str) -> None:
    async def script(c: Conversation) -> None:
        await c.say("220 mx.test")
        await c.expect("EHLO")
        await c.say(garbage)
        assert await c.closed()

    async def scenario() -> None:
        async with scripted(script) as hop:
            with pytest.raises(SMTPError) as caught:
                await connect(hop)
        assert caught.value.temporary and caught.value.status == "4.5.0"
        assert "protocol error" in caught.value.text

    run(scenario)


def test_replies_behind_the_starttls_220_are_refused() -> None:
    async def script(c: Conversation) -> None:
        await c.greet("250-mx.test\r\n250 STARTTLS")
        await c.expect("STARTTLS")
        # A man in the middle appends a reply meant to be read "over TLS".
        await c.say("220 go ahead\r\n250-mx.test\r\n250 AUTH PLAIN")
        assert await c.closed()

    async def scenario() -> None:
        async with scripted(script) as hop:
            with pytest.raises(SMTPError) as caught:
                await connect(hop)
        assert caught.value.temporary and "after its 220" in caught.value.text

    run(scenario)


def test_starttls_refused_opportunistic_goes_on_required_fails(tmp_path: Path) -> None:
    async def script(c: Conversation) -> None:
        await c.greet("250-mx.test\r\n250 STARTTLS")
        await c.expect("STARTTLS")
        await c.say("454 4.7.0 TLS not available")
        await c.expect("QUIT")
        await c.say("221 bye")

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            assert not session.connection.tls_active
            await session.quit()
        async with scripted(script) as hop:
            with pytest.raises(SMTPError) as caught:
                await connect(Hop(hop.host, hop.port, hop.name, tls="required"))
        assert caught.value.temporary and caught.value.status == "4.7.4"

    run(scenario)


def test_no_reply_to_mail_times_out(tmp_path: Path) -> None:
    async def script(c: Conversation) -> None:
        await c.greet(PLAIN_EHLO)
        await c.expect("MAIL")
        assert await c.closed()  # silence until the client gives up

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop, Timeouts(mail=0.3))
            with pytest.raises(SMTPError) as caught:
                await send(session, tmp_path, "b@y.example")
            assert session.closed
        assert caught.value.temporary and caught.value.status == "4.4.2"
        assert "timed out after 0.3s" in caught.value.text and "MAIL FROM" in caught.value.text

    run(scenario)


def test_server_that_stops_reading_times_out_the_data_block(tmp_path: Path) -> None:
    client_gave_up: list[asyncio.Event] = []

    async def script(c: Conversation) -> None:
        await c.greet(PLAIN_EHLO)
        for command, reply in (("MAIL", "250 ok"), ("RCPT", "250 ok"), ("DATA", "354 go")):
            await c.expect(command)
            await c.say(reply)
        assert await c.reader.read(1)  # then read nothing more
        await client_gave_up[0].wait()

    big = (b"x" * 998 + b"\r\n") * 16_000  # 16 MB: more than the socket buffers hold

    async def scenario() -> None:
        client_gave_up.append(asyncio.Event())
        async with scripted(script, rcvbuf=4096) as hop:
            timeouts = Timeouts(data_block=0.5)
            session = await connect(hop, timeouts)
            with pytest.raises(SMTPError) as caught:
                await send(session, tmp_path, "b@y.example", data=big)
            client_gave_up[0].set()
        assert caught.value.temporary and "timed out after 0.5s sending" in caught.value.text

    run(scenario)


def test_connection_lost_during_data(tmp_path: Path) -> None:
    async def script(c: Conversation) -> None:
        await c.greet(PLAIN_EHLO)
        for command, reply in (("MAIL", "250 ok"), ("RCPT", "250 ok"), ("DATA", "354 go")):
            await c.expect(command)
            await c.say(reply)
        await c.content()
        c.writer.transport.abort()  # gone before the reply to the final dot

    async def scenario() -> None:
        async with scripted(script) as hop:
            session = await connect(hop)
            with pytest.raises(SMTPError) as caught:
                await send(session, tmp_path, "b@y.example")
        assert caught.value.temporary and "lost connection" in caught.value.text
        assert "end of DATA" in caught.value.text

    run(scenario)


def test_connection_refused_is_temporary() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nobody listens there now

    async def scenario() -> None:
        with pytest.raises(SMTPError) as caught:
            await connect(Hop("127.0.0.1", port, "gone.test"))
        assert caught.value.temporary and caught.value.status == "4.4.1"
        assert caught.value.text == f"connect to gone.test[127.0.0.1]:{port}: Connection refused"

    run(scenario)


def test_a_host_name_that_does_not_resolve_says_so() -> None:
    async def scenario() -> None:
        with pytest.raises(SMTPError) as caught:
            await connect(Hop("no-such-host.invalid", 25, "mx.gone.test"))  # RFC 6761 6.4
        assert caught.value.temporary and caught.value.status == "4.4.1"
        assert caught.value.text.startswith(
            "connect to mx.gone.test[no-such-host.invalid]:25: cannot resolve the host name (")

    run(scenario)


def test_greeting_timeout() -> None:
    async def script(c: Conversation) -> None:
        assert await c.closed()  # never greets

    async def scenario() -> None:
        async with scripted(script) as hop:
            with pytest.raises(SMTPError) as caught:
                await connect(hop, Timeouts(greeting=0.3))
        assert caught.value.temporary and "initial greeting" in caught.value.text

    run(scenario)
