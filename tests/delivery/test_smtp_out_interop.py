"""The SMTP client session against Postfix's smtp-sink, a C server with PIPELINING and DSN.

smtp-sink dumps each transaction (with its MAIL and RCPT arguments) to a file,
and can refuse commands softly (-r), hard (-f) or with 421 and a hang-up (-Q).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postroom.delivery.smtp_errors import SMTPError
from postroom.delivery.smtp_out import (
    ClientSession,
    Hop,
    OutRecipient,
    TransactionResult,
)

pytestmark = pytest.mark.interop

MESSAGE = b"Subject: sink\n\n.dot line\nplain line\n..two\nno final newline"


class Sink:
    """One smtp-sink process on a free loopback port, dumping into `folder`."""

    def __init__(self, program: str, *options: str) -> None:
        # Not under pytest's 0700 temp folder: smtp-sink writes as "nobody".
        self.folder = Path(tempfile.mkdtemp(prefix="postroom-sink-"))
        self.folder.chmod(0o777)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        command = [program, *user, "-d", f"{self.folder}/%M.", *options,
                   f"127.0.0.1:{self.port}", "100"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    err = self.process.stderr.read() if self.process.stderr else b""
                    pytest.fail(f"smtp-sink did not start: {err!r}")
                time.sleep(0.05)
        self.hop = Hop("127.0.0.1", self.port, "smtp-sink.test")

    def dumps(self) -> list[bytes]:
        files = sorted(self.folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [f.read_bytes() for f in files]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def sink_factory(require_peer: Callable[..., str]) -> Iterator[Callable[..., Sink]]:
    """Starts smtp-sink processes with the options given; stops them by PID at teardown."""
    program = require_peer("smtp-sink")
    started: list[Sink] = []

    def make(*options: str) -> Sink:
        sink = Sink(program, *options)
        started.append(sink)
        return sink

    yield make
    for sink in started:
        sink.stop()


def dump_fields(dump: bytes) -> tuple[dict[str, list[str]], bytes]:
    """smtp-sink's own header lines (up to its Received header), and the message."""
    head, _, rest = dump.partition(b"Received: ")
    fields: dict[str, list[str]] = {}
    for line in head.decode().splitlines():
        name, _, value = line.partition(": ")
        fields.setdefault(name, []).append(value)
    # The Received header is three lines; the message follows it.
    message = rest.split(b"\n", 3)[3]
    return fields, message


async def connect(hop: Hop) -> ClientSession:
    return await ClientSession.connect(
        hop, helo="relay.example", tls_context=ssl.create_default_context(), command_timeout=10
    )


async def send(
    session: ClientSession, tmp: Path, *rcpts: OutRecipient, **kw: object
) -> TransactionResult:
    return await session.send(
        sender="a@x.example", recipients=list(rcpts), message=io.BytesIO(MESSAGE),
        size=len(MESSAGE), **kw
    )


def test_pipelined_dsn_transaction(sink_factory: Callable[..., Sink], tmp_path: Path) -> None:
    sink = sink_factory()

    async def scenario() -> None:
        async with await connect(sink.hop) as session:
            ext = session.connection.extensions
            assert ext.pipelining and ext.dsn and not ext.starttls
            result = await send(
                session,
                tmp_path,
                OutRecipient("b@y.example", ("FAILURE",), "rfc822;b+1@y.example"),
                OutRecipient("c@y.example", ("NEVER",)),
                ret="HDRS",
                envid="envelope 7",
            )
            assert result.dsn_offered and result.data_reply is not None
            assert result.data_reply.code == 250 and result.data_reply.enhanced == "2.0.0"
            assert set(result.recipients.values()) == {result.data_reply}

    asyncio.run(scenario())
    (dump,) = sink.dumps()
    fields, message = dump_fields(dump)
    assert fields["X-Mail-Args"] == ["<a@x.example> RET=HDRS ENVID=envelope+207"]
    assert fields["X-Rcpt-Args"] == [
        "<b@y.example> NOTIFY=FAILURE ORCPT=rfc822;b+2B1@y.example",
        "<c@y.example> NOTIFY=NEVER",
    ]
    assert fields["X-Helo-Args"] == ["relay.example"]
    # smtp-sink removes the transparency dots, writes LF line ends and an empty
    # line after each message: the lines are exactly the message's.
    assert message == MESSAGE + b"\n\n"


def test_two_messages_on_one_connection(sink_factory: Callable[..., Sink], tmp_path: Path) -> None:
    sink = sink_factory()

    async def scenario() -> None:
        async with await connect(sink.hop) as session:
            for _ in range(2):
                result = await send(session, tmp_path, OutRecipient("b@y.example"))
                assert result.data_reply is not None and result.data_reply.code == 250

    asyncio.run(scenario())
    assert len(sink.dumps()) == 2


def test_soft_refused_recipients_then_rset(
    sink_factory: Callable[..., Sink], tmp_path: Path
) -> None:
    sink = sink_factory("-r", "RCPT")  # implies no PIPELINING

    async def scenario() -> None:
        async with await connect(sink.hop) as session:
            assert not session.connection.extensions.pipelining
            for _ in range(2):  # the session stays usable after RSET
                result = await send(
                    session, tmp_path, OutRecipient("b@y.example"), OutRecipient("c@y.example")
                )
                assert result.data_reply is None
                codes = {(r.code, r.enhanced) for r in result.recipients.values()}
                assert codes == {(450, "4.3.0")}

    asyncio.run(scenario())
    assert sink.dumps() == []


def test_final_dot_refused(sink_factory: Callable[..., Sink], tmp_path: Path) -> None:
    sink = sink_factory("-f", ".")

    async def scenario() -> None:
        async with await connect(sink.hop) as session:
            result = await send(session, tmp_path, OutRecipient("b@y.example"))
            assert result.data_reply is not None and result.data_reply.code == 500
            assert result.recipients["b@y.example"] == result.data_reply

    asyncio.run(scenario())


def test_421_after_rcpt(sink_factory: Callable[..., Sink], tmp_path: Path) -> None:
    sink = sink_factory("-Q", "RCPT")

    async def scenario() -> None:
        session = await connect(sink.hop)
        with pytest.raises(SMTPError) as caught:
            await send(session, tmp_path, OutRecipient("b@y.example"))
        assert session.closed
        assert caught.value.temporary and caught.value.reply is not None
        assert caught.value.reply.code == 421

    asyncio.run(scenario())


def test_five_megabytes(sink_factory: Callable[..., Sink], tmp_path: Path) -> None:
    sink = sink_factory()
    line = b".stuffed line of a large message, long enough to matter\n"
    data = b"Subject: big\n\n" + line * (5 * 1024 * 1024 // len(line))
    path = tmp_path / "big"
    path.write_bytes(data)

    async def scenario() -> None:
        async with await connect(sink.hop) as session:
            with path.open("rb") as message:
                result = await session.send(
                    sender="a@x.example",
                    recipients=[OutRecipient("b@y.example")],
                    message=message,
                    size=len(data),
                )
            assert result.data_reply is not None and result.data_reply.code == 250

    asyncio.run(scenario())
    (dump,) = sink.dumps()
    _fields, body = dump_fields(dump)
    assert body == data + b"\n"
