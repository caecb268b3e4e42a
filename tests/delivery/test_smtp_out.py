"""The SMTP client session against real servers: postroom's own, run in-process, and aiosmtpd.

postroom's server offers everything (PIPELINING, DSN, SMTPUTF8, STARTTLS with
its self-signed certificate, verified here by name); aiosmtpd offers no
PIPELINING and no DSN, and is configured per test to offer STARTTLS, AUTH,
SMTPUTF8 or 8BITMIME or not. Misbehaving servers are in test_smtp_out_scripted.py.
"""

from __future__ import annotations

import asyncio
import email
import io
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from postroom.config import load_config
from postroom.delivery.smtp_errors import SMTPError
from postroom.delivery.smtp_out import (
    ClientSession,
    Hop,
    OutRecipient,
    Timeouts,
)
from postroom.protocol.replies import Reply
from postroom.server.main import Running, start
from postroom.store.factory import open_store
from postroom.tlscert import make_self_signed

HELO = "relay.example"
MESSAGE = (
    b"From: Smith <smith@isp.example>\n"
    b"To: Boss <boss@corp.example>\n"
    b"Subject: report\n"
    b"\n"
    b".leading dot\n"
    b"..two dots\n"
    b".\n"
    b"no final newline"
)
# What a receiver stores: CRLF line ends, dots as they were, a final CRLF.
STORED = (
    b"From: Smith <smith@isp.example>\r\n"
    b"To: Boss <boss@corp.example>\r\n"
    b"Subject: report\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"no final newline\r\n"
)
FAST = Timeouts(greeting=10, mail=10, rcpt=10, data_init=10, data_block=10, data_end=10)

def run(
    coro_fn: Callable[[], Any],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> Any:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro_fn())


def stream(data: bytes = MESSAGE) -> IO[bytes]:
    """A message as `send` takes it: a stream at its first octet."""
    return io.BytesIO(data)


def insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def connect(hop: Hop, context: ssl.SSLContext | None = None) -> ClientSession:
    return await ClientSession.connect(
        hop,
        helo=HELO,
        tls_context=context or insecure_context(),
        connect_timeout=5,
        command_timeout=10,
        timeouts=FAST,
    )


# --- postroom's own server ----------------------------------------------------------


@asynccontextmanager
async def postroom(tmp_path: Path, **smtp: str) -> AsyncIterator[Running]:
    lines = [
        'hostname = "mx.corp.example"',
        'domains = ["corp.example"]',
        "[listen]",
        'smtp = "127.0.0.1:0"',
        "[smtp]",
        *(f'{key} = "{value}"' for key, value in smtp.items()),
    ]
    (tmp_path / "postroom.toml").write_text("\n".join(lines) + "\n")
    config = load_config(tmp_path)
    directory = open_store(config.store).users
    directory.add_user("boss@corp.example", "boss-secret")
    directory.add_user("alice@corp.example", "alice-secret")
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


def stored(tmp_path: Path, user: str) -> list[bytes]:
    folder = tmp_path / "mail" / "corp.example" / user / "new"
    files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
    return [f.read_bytes() for f in files]


def body_of(raw: bytes) -> bytes:
    """The message as sent: what follows the Return-Path and Received header postroom
    filed it with."""
    assert raw.startswith(b"Return-Path: <")
    raw = raw[raw.index(b"\r\n") + 2 :]
    assert raw.startswith(b"Received: ")
    pos = raw.index(b"\r\n") + 2
    while raw[pos : pos + 1] in (b" ", b"\t"):  # the header's folded lines
        pos = raw.index(b"\r\n", pos) + 2
    return raw[pos:]


def test_starttls_required_pipelined_per_recipient_results(
    tmp_path: Path, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            host, port = server.address("smtp")
            # The self-signed certificate, verified by the hop's name.
            context = ssl.create_default_context(cafile=str(server.config.tls.cert))
            hop = Hop(host, port, "mx.corp.example", tls="required")
            session = await connect(hop, context)
            connection = session.connection
            assert connection.tls_active and connection.tls_version in ("TLSv1.2", "TLSv1.3")
            assert session.peer == f"mx.corp.example[127.0.0.1]:{port}"
            assert connection.extensions.pipelining and connection.extensions.dsn
            result = await session.send(
                sender="smith@isp.example",
                recipients=[
                    OutRecipient("boss@corp.example", ("SUCCESS", "FAILURE"), "rfc822;b@x"),
                    OutRecipient("nobody@corp.example"),
                    OutRecipient("alice@corp.example"),
                    OutRecipient("boss@corp.example"),  # a duplicate goes once
                ],
                message=stream(),
                size=len(MESSAGE),
                envid="Q1",
                ret="HDRS",
            )
            await session.quit()
            assert session.closed
            assert list(result.recipients) == [
                "boss@corp.example", "nobody@corp.example", "alice@corp.example"
            ]
            boss, nobody, alice = result.recipients.values()
            assert boss == alice == result.data_reply
            assert boss.code == 250 and boss.enhanced == "2.0.0"
            assert nobody.code == 550 and nobody.enhanced == "5.1.1"
            assert result.dsn_offered and result.notes == ()

    run(scenario, loop_factory)
    (boss,) = stored(tmp_path, "boss")
    (alice,) = stored(tmp_path, "alice")
    assert body_of(boss) == body_of(alice) == STORED
    assert b"with ESMTPS" in boss


def test_one_session_sends_several_messages(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            host, port = server.address("smtp")
            async with await connect(Hop(host, port, "mx.corp.example")) as session:
                for i in range(3):
                    data = b"Subject: number %d\r\n\r\nbody\r\n" % i
                    result = await session.send(
                        sender="smith@isp.example",
                        recipients=[OutRecipient("boss@corp.example")],
                        message=stream(data),
                        size=len(data),
                    )
                    assert result.data_reply is not None and result.data_reply.code == 250
                    if i == 1:
                        # Every recipient refused: RSET, no DATA, the session goes on.
                        refused = await session.send(
                            sender="smith@isp.example",
                            recipients=[
                                OutRecipient("x@corp.example"),
                                OutRecipient("y@elsewhere.example"),
                            ],
                            message=stream(data),
                            size=len(data),
                        )
                        assert refused.data_reply is None
                        codes = [r.code for r in refused.recipients.values()]
                        assert codes[0] == 550 and codes[1] in (550, 554)
                assert not session.closed

    run(scenario)
    subjects = [email.message_from_bytes(m)["Subject"] for m in stored(tmp_path, "boss")]
    assert sorted(subjects) == ["number 0", "number 1", "number 2"]


def test_five_megabyte_message_streams_exactly(tmp_path: Path) -> None:
    line = b".a line that starts with a dot, to be stuffed on every line " * 2 + b"\n"
    data = b"Subject: big\n\n" + line * (5 * 1024 * 1024 // len(line))
    path = tmp_path / "big.eml"
    path.write_bytes(data)

    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            host, port = server.address("smtp")
            async with await connect(Hop(host, port, "mx.corp.example")) as session:
                with path.open("rb") as message:
                    result = await session.send(
                        sender="smith@isp.example",
                        recipients=[OutRecipient("boss@corp.example")],
                        message=message,
                        size=len(data) + data.count(b"\n"),
                    )
                assert result.data_reply is not None and result.data_reply.code == 250

    run(scenario)
    (raw,) = stored(tmp_path, "boss")
    assert body_of(raw) == data.replace(b"\n", b"\r\n")


def test_message_over_the_hops_size_is_refused_before_mail(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with postroom(tmp_path, max_message_size="2K") as server:
            host, port = server.address("smtp")
            async with await connect(Hop(host, port, "mx.corp.example")) as session:
                assert session.connection.extensions.size_limit == 2048
                big = b"x" * 3000
                with pytest.raises(SMTPError) as caught:
                    await session.send(
                        sender="smith@isp.example",
                        recipients=[OutRecipient("boss@corp.example")],
                        message=stream(big),
                        size=len(big),
                    )
                error = caught.value
                assert not error.temporary and error.status == "5.3.4" and error.reply is None
                assert "exceeds size limit 2048" in error.text
                assert not session.closed  # nothing was sent: the session is still good
                result = await session.send(
                    sender="smith@isp.example",
                    recipients=[OutRecipient("boss@corp.example")],
                    message=stream(),
                    size=len(MESSAGE),
                )
                assert result.data_reply is not None and result.data_reply.code == 250

    run(scenario)
    assert len(stored(tmp_path, "boss")) == 1


# --- aiosmtpd ------------------------------------------------------------------------


class Recorder:
    """An aiosmtpd handler that keeps envelopes and refuses chosen recipients."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.refuse = refuse
        self.envelopes: list[Envelope] = []
        self.commands: list[str] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.commands.append(f"RCPT {address}")
        if address in self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 stored"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("RSET")
        return "250 OK"


class DSNSMTP(SMTP):
    """aiosmtpd taught to offer DSN: its parameters are kept in the options, not refused."""

    def _getparams(self, params: Any) -> Any:
        result = super()._getparams(params)
        if result is not None:
            for keyword in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                result.pop(keyword, None)
        return result


class DSNRecorder(Recorder):
    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]]


def server_tls_context(folder: Path) -> ssl.SSLContext:
    cert, key = make_self_signed("mx.test.example")
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


@asynccontextmanager
async def aiosmtpd(
    handler: Recorder, smtp_class: type[SMTP] = SMTP, **options: Any
) -> AsyncIterator[Hop]:
    loop = asyncio.get_running_loop()
    options.setdefault("hostname", "mx.test.example")
    server = await loop.create_server(
        lambda: smtp_class(handler, **options), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield Hop("127.0.0.1", port, "mx.test.example")
    finally:
        server.close()
        await server.wait_closed()


async def send_simple(
    session: ClientSession,
    tmp_path: Path,
    *addresses: str | OutRecipient,
    data: bytes = MESSAGE,
    **kw: Any,
) -> Any:
    return await session.send(
        sender=kw.pop("sender", "smith@isp.example"),
        recipients=[a if isinstance(a, OutRecipient) else OutRecipient(a) for a in addresses],
        message=stream(data),
        size=len(data),
        **kw,
    )


def test_lockstep_without_pipelining_and_a_refused_recipient(tmp_path: Path) -> None:
    handler = Recorder(refuse=("nobody@y.example",))

    async def scenario() -> None:
        async with aiosmtpd(handler) as hop, await connect(hop) as session:
            assert not session.connection.extensions.pipelining
            assert not session.connection.tls_active
            result = await send_simple(
                session, tmp_path, "a@y.example", "nobody@y.example", "b@y.example"
            )
            refused = result.recipients["nobody@y.example"]
            assert refused == Reply(550, None, "5.1.1 no such user")
            assert result.recipients["a@y.example"] == result.data_reply
            assert result.data_reply == Reply(250, None, "2.0.0 stored")
            assert not result.dsn_offered

    run(scenario)
    (envelope,) = handler.envelopes
    assert envelope.mail_from == "smith@isp.example"
    assert envelope.rcpt_tos == ["a@y.example", "b@y.example"]
    assert envelope.content == STORED


def test_opportunistic_tls_without_starttls_goes_plaintext(tmp_path: Path) -> None:
    handler = Recorder()

    async def scenario() -> None:
        async with aiosmtpd(handler) as hop:
            session = await connect(hop)
            assert not session.connection.tls_active
            await send_simple(session, tmp_path, "a@y.example")
            await session.quit()

    run(scenario)
    assert len(handler.envelopes) == 1


def test_required_tls_not_offered_is_a_temporary_failure(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with aiosmtpd(Recorder()) as hop:
            with pytest.raises(SMTPError) as caught:
                await connect(Hop(hop.host, hop.port, hop.name, tls="required"))
            error = caught.value
            assert error.temporary and error.status == "4.7.4"
            assert "TLS is required, but was not offered" in error.text

    run(scenario)


@pytest.mark.parametrize("mode", ["opportunistic", "required", "none"])
def test_starttls_when_offered(tmp_path: Path, mode: str) -> None:
    handler = Recorder()

    async def scenario() -> None:
        context = server_tls_context(tmp_path)
        async with aiosmtpd(handler, tls_context=context) as hop:
            session = await connect(Hop(hop.host, hop.port, hop.name, tls=mode))
            assert session.connection.tls_active == (mode != "none")
            assert session.connection.extensions.starttls == (mode == "none")  # re-EHLO over TLS
            await send_simple(session, tmp_path, "a@y.example")
            await session.quit()

    run(scenario)
    (envelope,) = handler.envelopes
    assert envelope.content == STORED


def test_failed_tls_handshake_falls_back_to_plaintext_only_where_tls_is_opportunistic(
    tmp_path: Path,
) -> None:
    handler = Recorder()

    async def scenario() -> None:
        async with aiosmtpd(handler, tls_context=server_tls_context(tmp_path)) as hop:
            verifying = ssl.create_default_context()  # does not trust the self-signed cert
            with pytest.raises(SMTPError) as caught:
                await connect(Hop(hop.host, hop.port, hop.name, tls="required"), verifying)
            assert caught.value.temporary and caught.value.status == "4.7.5"
            assert "cannot start TLS" in caught.value.text
            # Opportunistic: a new connection that does not try STARTTLS, as Postfix's "may".
            session = await connect(hop, verifying)
            assert not session.connection.tls_active and session.connection.tls_fallback
            await send_simple(session, tmp_path, "a@y.example")
            await session.quit()

    run(scenario)
    (envelope,) = handler.envelopes
    assert envelope.content == STORED


def accept_login(expected: tuple[bytes, bytes]) -> Callable[..., AuthResult]:
    def check(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == expected
        return AuthResult(success=ok, handled=False)

    return check


@pytest.mark.parametrize("exclude", [(), ("PLAIN",)])
def test_auth_over_tls(tmp_path: Path, exclude: tuple[str, ...]) -> None:
    handler = Recorder()

    async def scenario() -> None:
        async with aiosmtpd(
            handler,
            tls_context=server_tls_context(tmp_path),
            authenticator=accept_login((b"relay", b"s3cret")),
            auth_exclude_mechanism=exclude,
            auth_required=True,
        ) as hop:
            hop = Hop(hop.host, hop.port, hop.name, auth=("relay", "s3cret"))
            assert "s3cret" not in repr(hop)
            session = await connect(hop)
            assert session.connection.tls_active
            result = await send_simple(session, tmp_path, "a@y.example")
            assert result.data_reply is not None and result.data_reply.code == 250
            await session.quit()

    run(scenario)
    assert len(handler.envelopes) == 1


def test_auth_refused_is_temporary(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with aiosmtpd(
            Recorder(),
            tls_context=server_tls_context(tmp_path),
            authenticator=accept_login((b"relay", b"s3cret")),
        ) as hop:
            with pytest.raises(SMTPError) as caught:
                await connect(Hop(hop.host, hop.port, hop.name, auth=("relay", "wrong")))
            assert caught.value.temporary and caught.value.reply is not None
            assert caught.value.reply.code == 535
            assert "SASL authentication failed" in caught.value.text

    run(scenario)


def test_auth_is_never_sent_without_tls(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with aiosmtpd(
            Recorder(), authenticator=accept_login((b"u", b"p")), auth_require_tls=False
        ) as hop:
            for tls in ("none", "opportunistic"):
                with pytest.raises(SMTPError) as caught:
                    await connect(Hop(hop.host, hop.port, hop.name, tls=tls, auth=("u", "p")))
                assert caught.value.temporary and "without TLS" in caught.value.text

    run(scenario)


def test_smtputf8_needed_but_not_offered_is_permanent(tmp_path: Path) -> None:
    utf8_subject = "Subject: Grüße\n\nbody\n".encode()

    async def scenario() -> None:
        async with aiosmtpd(Recorder()) as hop, await connect(hop) as session:
            assert not session.connection.extensions.smtputf8
            cases: list[tuple[dict[str, Any], str]] = [
                ({"smtputf8": True, "data": utf8_subject}, "a@y.example"),
                ({}, "jös@y.example"),
                ({"sender": "jös@x.example"}, "a@y.example"),
            ]
            for kwargs, rcpt in cases:
                with pytest.raises(SMTPError) as caught:
                    await send_simple(session, tmp_path, rcpt, **kwargs)
                error = caught.value
                assert not error.temporary and error.status == "5.6.7"  # RFC 6531 3.2
                assert "SMTPUTF8" in error.text and not session.closed

    run(scenario)


def test_smtputf8_flag_alone_does_not_need_the_extension(tmp_path: Path) -> None:
    """RFC 6531 3.4: an ASCII envelope and ASCII header fields need no SMTPUTF8,
    whatever the client asked; the body may be 8-bit (that is 8BITMIME's)."""
    handler = Recorder()
    ascii_head = "Subject: plain\n\nÜber 8-bit body\n".encode()

    async def scenario() -> None:
        async with aiosmtpd(handler) as hop, await connect(hop) as session:
            for data in (MESSAGE, ascii_head):
                result = await send_simple(session, tmp_path, "a@y.example", data=data,
                                           smtputf8=True)
                assert result.data_reply is not None and result.data_reply.code == 250

    run(scenario)
    assert [e.content for e in handler.envelopes] == [STORED, ascii_head.replace(b"\n", b"\r\n")]
    assert all("SMTPUTF8" not in e.mail_options for e in handler.envelopes)


def test_long_lines_are_folded_for_a_receiver_that_refuses_them(tmp_path: Path) -> None:
    """aiosmtpd answers "500 Line too long" to a line over 1000 octets (RFC 5321
    4.5.3.1.6); the client folds long header lines at blanks and breaks long
    body lines with CRLF SP (Postfix's smtp_line_length_limit), so it takes them."""
    handler = Recorder()
    subject = b"Subject: " + b" ".join(b"word%d" % i for i in range(300))  # ~2,400 octets
    body_line = bytes(range(48, 58)) * 300  # 3,000 octets, no blank
    data = subject + b"\n\n" + body_line + b"\nlast line\n"

    async def scenario() -> None:
        async with aiosmtpd(handler) as hop, await connect(hop) as session:
            result = await send_simple(session, tmp_path, "a@y.example", data=data)
            assert result.data_reply is not None and result.data_reply.code == 250

    run(scenario)
    (envelope,) = handler.envelopes
    content = envelope.content
    assert max(len(line) for line in content.split(b"\r\n")) <= 998
    head, _, body = content.partition(b"\r\n\r\n")
    # RFC 5322 2.2.3: unfolding gives the field back exactly.
    assert re.sub(rb"\r\n(?=[ \t])", b"", head) == subject
    assert body.replace(b"\r\n ", b"") == body_line + b"\r\nlast line\r\n"
    assert body.split(b"\r\n")[:4] == [
        body_line[:998], b" " + body_line[998:1995], b" " + body_line[1995:2992],
        b" " + body_line[2992:],
    ]


def test_smtputf8_when_offered(tmp_path: Path) -> None:
    handler = Recorder()
    data = "Subject: Grüße\n\nÜber alles\n".encode()

    async def scenario() -> None:
        async with aiosmtpd(handler, enable_SMTPUTF8=True) as hop, await connect(hop) as session:
            result = await send_simple(
                session, tmp_path, "jörg@bücher.example", data=data, sender="ünï@x.example"
            )
            assert result.data_reply is not None and result.data_reply.code == 250

    run(scenario)
    (envelope,) = handler.envelopes
    assert "SMTPUTF8" in envelope.mail_options and "BODY=8BITMIME" in envelope.mail_options
    assert envelope.mail_from == "ünï@x.example"
    assert envelope.rcpt_tos == ["jörg@bücher.example"]
    assert envelope.content == data.replace(b"\n", b"\r\n")


def test_eight_bit_message(tmp_path: Path) -> None:
    data = "Subject: café\n\n8-bit body\n".encode()
    offered, plain = Recorder(), Recorder()

    async def scenario() -> None:
        async with aiosmtpd(offered) as hop, await connect(hop) as session:
            assert session.connection.extensions.eightbitmime
            result = await send_simple(session, tmp_path, "a@y.example", data=data)
            assert result.notes == ()
            await send_simple(session, tmp_path, "a@y.example")  # 7-bit: no BODY
        # decode_data=True: aiosmtpd does not offer 8BITMIME.
        async with aiosmtpd(plain, decode_data=True) as hop, await connect(hop) as session:
            result = await send_simple(session, tmp_path, "a@y.example", data=data)
            (note,) = result.notes
            assert "does not offer 8BITMIME" in note
            # Sent as is; this server's answer to the content is the result.
            assert result.data_reply == Reply(500, None, "Error: strict ASCII mode")

    run(scenario)
    eight, seven = offered.envelopes
    assert eight.mail_options == [f"SIZE={len(data)}", "BODY=8BITMIME"]
    assert seven.mail_options == [f"SIZE={len(MESSAGE)}"]


def test_dsn_parameters_only_when_offered(tmp_path: Path) -> None:
    without, with_dsn = Recorder(), DSNRecorder()
    recipient = OutRecipient("a@y.example", ("SUCCESS", "DELAY"), "rfc822;Orig+1@y.example")

    async def scenario() -> None:
        # aiosmtpd refuses parameters it does not know (555): none may be sent.
        async with aiosmtpd(without) as hop, await connect(hop) as session:
            result = await send_simple(
                session, tmp_path, recipient, ret="FULL", envid="env 1"
            )
            assert not result.dsn_offered and result.data_reply is not None
        async with aiosmtpd(with_dsn, smtp_class=DSNSMTP) as hop, await connect(hop) as session:
            assert session.connection.extensions.dsn
            result = await send_simple(
                session, tmp_path, recipient, ret="FULL", envid="env 1"
            )
            assert result.dsn_offered and result.data_reply is not None

    run(scenario)
    (plain,) = without.envelopes
    assert plain.mail_options == [f"SIZE={len(MESSAGE)}"] and plain.rcpt_options == []
    (dsn,) = with_dsn.envelopes
    # aiosmtpd upper-cases the options it hands on.
    assert dsn.mail_options == [f"SIZE={len(MESSAGE)}", "RET=FULL", "ENVID=ENV+201"]
    assert dsn.rcpt_options == ["NOTIFY=SUCCESS,DELAY", "ORCPT=RFC822;ORIG+2B1@Y.EXAMPLE"]


def test_all_recipients_refused_in_lockstep_sends_rset_not_data(tmp_path: Path) -> None:
    handler = Recorder(refuse=("a@y.example", "b@y.example"))

    async def scenario() -> None:
        async with aiosmtpd(handler) as hop, await connect(hop) as session:
            result = await send_simple(session, tmp_path, "a@y.example", "b@y.example")
            assert result.data_reply is None
            assert {r.code for r in result.recipients.values()} == {550}
            handler.refuse = ()
            result = await send_simple(session, tmp_path, "a@y.example")
            assert result.data_reply is not None

    run(scenario)
    assert handler.commands == ["RCPT a@y.example", "RCPT b@y.example", "RSET", "RCPT a@y.example"]
    assert len(handler.envelopes) == 1
