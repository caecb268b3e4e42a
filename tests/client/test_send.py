"""`postroom send`: the message it builds, and its submission to real servers.

postroom's own submission listeners (STARTTLS and implicit TLS, its
self-signed certificate verified through --cafile) run in-process, and so does
aiosmtpd (a handler records envelope and content). What the receiving side
stores is compared byte for byte with what was meant: the message as written,
without Bcc. Then the failures a person must understand: a wrong password, a
refused recipient, nothing listening, an untrusted certificate.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import importlib
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from postroom import cli
from postroom.client.connect import parse_server
from postroom.client.send import (
    SendError,
    SubmitOptions,
    SubmitResult,
    build_message,
    envelope_of,
    submit,
    wire_bytes,
)
from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store
from postroom.store.maildir import list_messages
from postroom.tlscert import make_self_signed

SMITH = "smith@isp.example"
SMITH_PASSWORD = "smith-secret"
SUBJECT = "Grüße aus Köln — ½ € 日本"
BODY = "Hello,\n\n.a line with a leading dot\nFrom the start of a line\nÀ bientôt\n"


def run(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(scenario())


def text_of(part: Any) -> str:
    """A text part's content; quoted-printable keeps the CRLFs of the wire."""
    return str(part.get_content()).replace("\r\n", "\n")


# --- building ------------------------------------------------------------------------------


def test_build_message_headers_and_envelope(tmp_path: Path) -> None:
    pdf = tmp_path / "Bericht über 2024.pdf"
    pdf.write_bytes(bytes(range(256)) * 40)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"plain text\r\nsecond line\n")
    msg = build_message(
        sender=SMITH, sender_name="Jörg Smith", to=["Boss <boss@corp.example>"],
        cc=["alice@corp.example"], bcc=["secret@corp.example", "boss@corp.example"],
        subject=SUBJECT, body=BODY, attachments=[pdf, notes],
    )
    assert envelope_of(msg) == (
        SMITH, ["boss@corp.example", "alice@corp.example", "secret@corp.example"]
    )
    wire = wire_bytes(msg)
    assert wire.isascii()  # every non-ASCII header and body part is encoded
    assert b"\r\n" in wire and b"\n" not in wire.replace(b"\r\n", b"")
    assert wire == wire_bytes(msg)  # the boundary was chosen once
    head = wire.split(b"\r\n\r\n", 1)[0]
    assert b"Bcc" not in head and b"secret@" not in wire
    assert b"=?utf-8?" in head  # RFC 2047
    parsed = email.message_from_bytes(wire, policy=email.policy.default)
    assert parsed["Subject"] == SUBJECT
    assert str(parsed["From"]) == "Jörg Smith <smith@isp.example>"
    assert parsed["Date"] and parsed["Message-ID"].endswith("@isp.example>")
    assert parsed["MIME-Version"] == "1.0"
    text, first, second = parsed.iter_parts()
    assert text_of(text) == BODY
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert first.get_filename() == "Bericht über 2024.pdf"
    assert first.get_content_type() == "application/pdf"
    assert first["Content-Transfer-Encoding"] == "base64"
    assert first.get_content() == pdf.read_bytes()
    assert second.get_content_type() == "text/plain"
    assert second.get_payload(decode=True) == notes.read_bytes()


def test_ascii_text_stays_7bit_and_odd_files_are_octet_streams(tmp_path: Path) -> None:
    eml = tmp_path / "forwarded.eml"
    eml.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    blob = tmp_path / "archive.tar.gz"
    blob.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    msg = build_message(sender=SMITH, to=["b@y.example"], subject="plain",
                        body="x" * 200 + "\n", attachments=[eml, blob])
    parsed = email.message_from_bytes(wire_bytes(msg), policy=email.policy.default)
    text, one, two = parsed.iter_parts()
    assert text["Content-Transfer-Encoding"] == "7bit" and text_of(text) == "x" * 200 + "\n"
    assert one.get_content_type() == two.get_content_type() == "application/octet-stream"
    assert one.get_content() == eml.read_bytes()


@pytest.mark.parametrize("bad", ["not an address", "a@b@c", "<>", ""])
def test_bad_addresses_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not an e-mail"):
        build_message(sender=SMITH, to=[bad], subject="s", body="b")


def test_no_recipients_is_a_usage_error() -> None:
    msg = build_message(sender=SMITH, to=[], subject="s", body="b")
    with pytest.raises(SendError) as caught:
        envelope_of(msg)
    assert caught.value.kind == "usage" and caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("mail.example:587", ("mail.example", 587)), ("[::1]:2465", ("::1", 2465)),
     ("mail.example", ("mail.example", None)), ("::1", ("::1", None))],
)
def test_parse_server(text: str, parsed: tuple[str, int | None]) -> None:
    assert parse_server(text) == parsed


@pytest.mark.parametrize("text", ["mail.example:0", "mail.example:x", "[::1", ":25"])
def test_parse_server_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_server(text)


# --- postroom's submission listeners --------------------------------------------------------


@asynccontextmanager
async def postroom(tmp_path: Path) -> AsyncIterator[Running]:
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mail.isp.example"\n'
        'domains = ["isp.example"]\n'
        "[listen]\n"
        'smtp = "127.0.0.1:0"\n'
        'submission = "127.0.0.1:0"\n'
        'submissions = "127.0.0.1:0"\n'
        "[pop3]\n"
        'auth_failure_delay = "0.1s"\n'
    )
    config = load_config(tmp_path)
    directory = open_store(config.store).users
    for user in ("smith", "jones", "boss", "hidden"):
        directory.add_user(f"{user}@isp.example", f"{user}-secret")
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


def inbox(tmp_path: Path, user: str) -> list[bytes]:
    """The user's messages, first delivered first.

    Not sorted by name: the microseconds in a Maildir name are not zero-padded
    (as in Dovecot's names), so 1.M99999 sorts after 1.M100000.
    """
    return [entry.path.read_bytes()
            for entry in list_messages(tmp_path / "mail" / "isp.example" / user)]


def cafile(tmp_path: Path) -> str:
    return str(tmp_path / "tls" / "cert.pem")


def the_message(tmp_path: Path) -> EmailMessage:
    attachment = tmp_path / "data.bin"
    attachment.write_bytes(bytes(range(256)) * 1000 + b"\r\n.\r\n")
    return build_message(
        sender=SMITH, sender_name="Smith", to=["Jones <jones@isp.example>"],
        cc=["boss@isp.example"], bcc=["hidden@isp.example"], subject=SUBJECT, body=BODY,
        attachments=[attachment],
    )


def check_stored(stored: bytes, meant: bytes) -> None:
    """The stored file is the message as meant, below the headers the server put on top."""
    assert stored.endswith(meant)
    added = stored[: len(stored) - len(meant)]
    assert added.startswith(b"Received: ") or added.startswith(b"Return-Path: ")
    assert added.endswith(b"\r\n") and b"\r\n\r\n" not in added


@pytest.mark.parametrize(("listener", "security"),
                         [("submission", "starttls"), ("submissions", "tls")])
def test_submit_to_postroom(tmp_path: Path, listener: str, security: str) -> None:
    message = the_message(tmp_path)
    lines: list[str] = []

    async def scenario() -> SubmitResult:
        async with postroom(tmp_path) as server:
            host, port = server.address(listener)
            return await submit(
                message, SubmitOptions(host=host, port=port, security=security, user=SMITH,
                                       password=SMITH_PASSWORD, cafile=cafile(tmp_path),
                                       trace=lines.append))

    result = run(scenario)
    assert result.accepted == ["jones@isp.example", "boss@isp.example", "hidden@isp.example"]
    assert result.refused == {}
    assert result.reply.startswith("2.0.0 ") and "queued as" in result.reply
    assert result.tls in ("TLSv1.2", "TLSv1.3")
    meant = wire_bytes(message)
    for user in ("jones", "boss", "hidden"):
        (stored,) = inbox(tmp_path, user)
        check_stored(stored, meant)
        parsed = email.message_from_bytes(stored, policy=email.policy.default)
        assert parsed["Subject"] == SUBJECT and "Bcc" not in parsed
        assert text_of(parsed.get_body(("plain",))) == BODY
        (attachment,) = parsed.iter_attachments()
        assert attachment.get_content() == (tmp_path / "data.bin").read_bytes()
    assert "ESMTPSA" in email.message_from_bytes(inbox(tmp_path, "jones")[0])["Received"]
    # The trace: one line per step, and the password nowhere.
    text = "\n".join(lines)
    assert SMITH_PASSWORD not in text
    assert any(line.startswith("TLS: TLSv1.") for line in lines)
    assert "C: AUTH PLAIN (credentials hidden)" in lines
    assert any(line.startswith("S: 235 2.7.0") for line in lines)
    assert f"C: MAIL FROM:<{SMITH}> SIZE={len(meant)}" in lines
    assert "C: RCPT TO:<hidden@isp.example>" in lines
    ehlo = [line for line in lines if line.startswith("S: 250 mail.isp.example")]
    assert any("AUTH PLAIN LOGIN" in line for line in ehlo)
    if security == "starttls":
        assert lines.index("C: STARTTLS") < lines.index("C: AUTH PLAIN (credentials hidden)")


def test_refused_recipient_and_wrong_password(tmp_path: Path) -> None:
    good = build_message(sender=SMITH, to=["jones@isp.example", "nobody@isp.example"],
                         subject="partly", body="b\n")
    none = build_message(sender=SMITH, to=["nobody@isp.example"], subject="none", body="b\n")

    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            host, port = server.address("submission")
            common: dict[str, Any] = dict(host=host, port=port, security="starttls",
                                          user=SMITH, cafile=cafile(tmp_path))
            result = await submit(good, SubmitOptions(password=SMITH_PASSWORD, **common))
            assert result.accepted == ["jones@isp.example"]
            assert list(result.refused) == ["nobody@isp.example"]
            assert result.refused["nobody@isp.example"].startswith("550 5.1.1")
            with pytest.raises(SendError) as caught:
                await submit(none, SubmitOptions(password=SMITH_PASSWORD, **common))
            assert caught.value.kind == "refused" and caught.value.exit_code == 69
            assert list(caught.value.refused) == ["nobody@isp.example"]
            with pytest.raises(SendError) as caught:
                await submit(good, SubmitOptions(password="wrong", **common))
            error = caught.value
            assert error.kind == "auth" and error.exit_code == 69
            assert error.text.startswith(f"127.0.0.1:{port} refused the login of {SMITH}: 535")
            assert "wrong" not in error.text

    run(scenario)
    assert len(inbox(tmp_path, "jones")) == 1


def test_certificate_is_checked_by_default(tmp_path: Path) -> None:
    message = build_message(sender=SMITH, to=["jones@isp.example"], subject="s", body="b\n")

    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            for listener, security in (("submission", "starttls"), ("submissions", "tls")):
                host, port = server.address(listener)
                with pytest.raises(SendError) as caught:
                    await submit(message, SubmitOptions(host=host, port=port, security=security,
                                                        user=SMITH, password=SMITH_PASSWORD))
                assert caught.value.kind == "certificate"
                assert "TLS failure with 127.0.0.1" in caught.value.text
                assert "self-signed certificate" in caught.value.text
            result = await submit(message, SubmitOptions(host=host, port=port, security="tls",
                                                         user=SMITH, password=SMITH_PASSWORD,
                                                         verify_cert=False))
            assert result.accepted == ["jones@isp.example"]
            # Trusted through --cafile, and checked by name: it names localhost too.
            result = await submit(message, SubmitOptions(
                host="localhost", port=port, security="tls", user=SMITH,
                password=SMITH_PASSWORD, cafile=cafile(tmp_path)))
            assert result.accepted == ["jones@isp.example"]

    run(scenario)


def test_plain_smtp_port_without_starttls_is_refused(tmp_path: Path) -> None:
    message = build_message(sender=SMITH, to=["jones@isp.example"], subject="s", body="b\n")

    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            host, port = server.address("smtp")
            with pytest.raises(SendError) as caught:
                # The MX listener offers STARTTLS but never AUTH.
                await submit(message, SubmitOptions(host=host, port=port, security="starttls",
                                                    user=SMITH, password=SMITH_PASSWORD,
                                                    cafile=cafile(tmp_path)))
            assert caught.value.kind == "auth" and "no password login" in caught.value.text

    run(scenario)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_nothing_listening() -> None:
    message = build_message(sender=SMITH, to=["jones@isp.example"], subject="s", body="b\n")
    port = free_port()
    with pytest.raises(SendError) as caught:
        run(lambda: submit(message, SubmitOptions(host="127.0.0.1", port=port,
                                                  security="starttls", user=SMITH, password="x")))
    assert caught.value.kind == "connect" and caught.value.exit_code == 69
    assert caught.value.text == f"cannot connect to 127.0.0.1:{port}: Connection refused"


def test_starttls_on_an_implicit_tls_port_says_what_may_be_wrong(tmp_path: Path) -> None:
    message = build_message(sender=SMITH, to=["jones@isp.example"], subject="s", body="b\n")

    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            host, port = server.address("submissions")  # waits for a TLS handshake
            with pytest.raises(SendError) as caught:
                await submit(message, SubmitOptions(host=host, port=port, security="starttls",
                                                    user=SMITH, password=SMITH_PASSWORD,
                                                    cafile=cafile(tmp_path), timeout=0.5))
            error = caught.value
            assert error.kind == "lost" and error.temporary and error.exit_code == 75
            assert error.text == (f"no reply from {host}:{port} within 0.5s (waiting for the "
                                  "greeting); if this port expects TLS from the start, use "
                                  "--security tls")

    run(scenario)


# --- the command line against postroom --------------------------------------------------------


def test_cli_send(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    body_file = tmp_path / "body.txt"
    body_file.write_text(BODY, encoding="utf-8")
    (tmp_path / "att.txt").write_text("attached\n")
    password_file = tmp_path / "password"
    password_file.write_text(SMITH_PASSWORD + "\n")

    async def scenario() -> list[int]:
        async with postroom(tmp_path) as server:
            host, port = server.address("submission")
            base = ["send", "--from", f"Smith <{SMITH}>", "--to", "jones@isp.example",
                    "--server", f"{host}:{port}", "--cafile", cafile(tmp_path)]
            codes = []
            monkeypatch.setenv("POSTROOM_PASSWORD", SMITH_PASSWORD)
            codes.append(await asyncio.to_thread(cli.main, [
                *base, "--bcc", "hidden@isp.example", "--subject", SUBJECT,
                "--body-file", str(body_file), "--attach", str(tmp_path / "att.txt"), "-v"]))
            codes.append(await asyncio.to_thread(cli.main, [
                *base, "--to", "nobody@isp.example", "--body", "partly"]))
            monkeypatch.delenv("POSTROOM_PASSWORD")
            codes.append(await asyncio.to_thread(cli.main, [
                *base, "--body", "with a file", "--password-file", str(password_file)]))
            (tmp_path / "wrong").write_text("nope\n")
            codes.append(await asyncio.to_thread(cli.main, [
                *base, "--body", "x", "--password-file", str(tmp_path / "wrong")]))
            codes.append(await asyncio.to_thread(cli.main, [
                *base[:-2], "--body", "x", "--password-file", str(password_file)]))
            implicit = server.address("submissions")
            codes.append(await asyncio.to_thread(cli.main, [
                *base[:5], "--server", f"{implicit[0]}:{implicit[1]}", "--security", "tls",
                "--insecure", "--body", "implicit", "--password-file", str(password_file)]))
            return codes

    codes = run(scenario)
    out, err = capsys.readouterr()
    assert codes == [0, 1, 0, 69, 69, 0]
    assert out.count("sent to 1 recipient over TLSv1.") == 3
    assert "sent to 2 recipients over TLSv1." in out
    assert "postroom send: refused <nobody@isp.example>: 550 5.1.1" in err
    assert "C: AUTH PLAIN (credentials hidden)" in err and SMITH_PASSWORD not in err
    assert "refused the login of smith@isp.example: 535" in err
    assert "(trust it with --cafile FILE, or skip the check with --insecure)" in err
    jones = inbox(tmp_path, "jones")
    assert len(jones) == 4
    first = email.message_from_bytes(jones[0], policy=email.policy.default)
    assert first["Subject"] == SUBJECT and "Bcc" not in first
    assert str(first["From"]) == "Smith <smith@isp.example>"
    assert text_of(first.get_body(("plain",))) == BODY
    assert len(inbox(tmp_path, "hidden")) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--to", "a@b.example", "--server", "x:0"], "port must be 1-65535"),
        (["--server", "127.0.0.1:1", "--body", "b"], "no recipients"),
        (["--to", "not an address", "--server", "127.0.0.1:1"], "not an e-mail"),
        (["--to", "a@b.example", "--server", "127.0.0.1:1", "--attach", "/nonexistent/x"],
         "No such file"),
    ],
)
def test_cli_usage_errors(argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POSTROOM_PASSWORD", "x")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("body from stdin\n"))
    assert cli.main(["send", "--from", SMITH, *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_without_a_password_source(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("POSTROOM_PASSWORD", raising=False)
    monkeypatch.setattr("builtins.open", _no_tty(open))
    code = cli.main(["send", "--from", SMITH, "--to", "a@b.example", "--body", "b",
                     "--server", "127.0.0.1:1"])
    assert code == 2
    assert "no password: give --password-file FILE or set POSTROOM_PASSWORD" in (
        capsys.readouterr().err)


def _no_tty(real_open: Callable[..., Any]) -> Callable[..., Any]:
    def fake(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path == "/dev/tty":
            raise OSError(6, "No such device or address")
        return real_open(path, *args, **kwargs)

    return fake


# --- aiosmtpd ---------------------------------------------------------------------------------


class Recorder:
    """An aiosmtpd handler keeping each envelope; refuses chosen recipients."""

    def __init__(self, refuse: dict[str, str] | None = None) -> None:
        self.refuse = refuse or {}
        self.envelopes: list[Envelope] = []

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 Ok: queued as AIO1"


def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                  data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"smith", b"pw")
    return AuthResult(success=ok, handled=False)


def self_signed(folder: Path) -> tuple[ssl.SSLContext, str]:
    cert, key = make_self_signed("smtp.test.example")
    (folder / "aio-cert.pem").write_bytes(cert)
    (folder / "aio-key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "aio-cert.pem", folder / "aio-key.pem")
    return context, str(folder / "aio-cert.pem")


@asynccontextmanager
async def aiosmtpd(handler: Recorder, context: ssl.SSLContext, *, implicit: bool,
                   **options: Any) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    if implicit:
        # aiosmtpd counts only STARTTLS as TLS; this connection is TLS from the start.
        options.update(tls_context=None, auth_require_tls=False)
    else:
        options.update(tls_context=context, require_starttls=True)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="smtp.test.example", authenticator=authenticator,
                     auth_required=True, **options),
        "127.0.0.1", 0, ssl=context if implicit else None,
    )
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("exclude", [(), ("PLAIN",)])
def test_submit_to_aiosmtpd(tmp_path: Path, implicit: bool, exclude: tuple[str, ...]) -> None:
    handler = Recorder()
    context, ca = self_signed(tmp_path)
    message = the_message(tmp_path)
    lines: list[str] = []

    async def scenario() -> SubmitResult:
        async with aiosmtpd(handler, context, implicit=implicit,
                            auth_exclude_mechanism=exclude) as port:
            return await submit(message, SubmitOptions(
                host="localhost", port=port, security="tls" if implicit else "starttls",
                user="smith", password="pw", cafile=ca, trace=lines.append))

    result = run(scenario)
    assert result.reply == "2.0.0 Ok: queued as AIO1"
    (envelope,) = handler.envelopes
    assert envelope.mail_from == SMITH
    assert envelope.rcpt_tos == ["jones@isp.example", "boss@isp.example", "hidden@isp.example"]
    assert envelope.original_content == wire_bytes(message)  # byte for byte, Bcc absent
    mechanism = "LOGIN" if exclude else "PLAIN"
    assert f"C: AUTH {mechanism} (credentials hidden)" in lines
    assert "pw" not in " ".join(line.split(":", 1)[1] for line in lines if ":" in line).split()


def test_aiosmtpd_refusals(tmp_path: Path) -> None:
    handler = Recorder(refuse={"gone@y.example": "550 5.1.1 no such user",
                               "later@y.example": "451 4.3.0 try again later"})
    context, ca = self_signed(tmp_path)

    def msg(*to: str) -> EmailMessage:
        return build_message(sender=SMITH, to=list(to), subject="s", body="b\n")

    async def scenario() -> None:
        async with aiosmtpd(handler, context, implicit=False) as port:
            common: dict[str, Any] = dict(host="127.0.0.1", port=port, security="starttls",
                                          user="smith", password="pw", cafile=ca)
            result = await submit(msg("a@y.example", "gone@y.example"), SubmitOptions(**common))
            assert result.accepted == ["a@y.example"]
            assert result.refused == {"gone@y.example": "550 5.1.1 no such user"}
            with pytest.raises(SendError) as caught:
                await submit(msg("later@y.example"), SubmitOptions(**common))
            assert caught.value.temporary and caught.value.exit_code == 75
            with pytest.raises(SendError) as caught:
                await submit(msg("a@y.example"), SubmitOptions(**{**common, "password": "bad"}))
            assert caught.value.kind == "auth" and not caught.value.temporary
            assert "535" in caught.value.text

    run(scenario)
    assert len(handler.envelopes) == 1


def test_non_ascii_address_needs_smtputf8(tmp_path: Path) -> None:
    handler = Recorder()
    context, ca = self_signed(tmp_path)
    message = build_message(sender=SMITH, to=["jörg@y.example"], subject="s", body="b\n")

    async def scenario() -> None:
        async with aiosmtpd(handler, context, implicit=True) as port:
            common: dict[str, Any] = dict(host="127.0.0.1", port=port, security="tls",
                                          user="smith", password="pw", cafile=ca)
            with pytest.raises(SendError, match="SMTPUTF8"):
                await submit(message, SubmitOptions(**common))
        async with aiosmtpd(handler, context, implicit=True, enable_SMTPUTF8=True) as port:
            result = await submit(message, SubmitOptions(**{**common, "port": port}))
            assert result.accepted == ["jörg@y.example"]

    run(scenario)
    (envelope,) = handler.envelopes
    assert envelope.rcpt_tos == ["jörg@y.example"]
    assert "jörg@y.example".encode() in envelope.original_content  # RFC 6532: UTF-8 headers


# --- scripted servers: the steps where send used to differ from the relay ----------------


@asynccontextmanager
async def scripted_tls(tmp_path: Path, replies: dict[bytes, bytes],
                       heard: list[bytes]) -> AsyncIterator[tuple[int, str]]:
    """An implicit-TLS server answering each command line by its first word (`replies`),
    keeping every line it read in `heard`; its port and CA file."""
    context, ca = self_signed(tmp_path)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.test ESMTP\r\n")
        while line := await reader.readline():
            heard.append(line.rstrip(b"\r\n"))
            word = line.split(None, 1)[0].upper() if line.strip() else b""
            if word == b"DATA":
                writer.write(b"354 go ahead\r\n")
                heard.append(await reader.readuntil(b"\r\n.\r\n"))
                word = b"."
            writer.write(replies.get(word, b"502 5.5.1 not here") + b"\r\n")
            await writer.drain()
            if word == b"QUIT":
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield int(server.sockets[0].getsockname()[1]), ca
    finally:
        server.close()
        await server.wait_closed()


def test_a_server_that_refuses_ehlo_gets_helo(tmp_path: Path) -> None:
    """RFC 5321 3.2: after a 5xx to EHLO the client says HELO, as the relay does; over
    implicit TLS and without a login the message goes (send used to stop at EHLO)."""
    heard: list[bytes] = []
    replies = {b"EHLO": b"500 5.5.1 what?", b"HELO": b"250 old.test", b"MAIL": b"250 ok",
               b"RCPT": b"250 ok", b".": b"250 2.0.0 queued as OLD1", b"QUIT": b"221 bye"}
    message = build_message(sender=SMITH, to=["jones@old.test"], subject="s", body="b\n")

    async def scenario() -> SubmitResult:
        async with scripted_tls(tmp_path, replies, heard) as (port, ca):
            return await submit(message, SubmitOptions(host="localhost", port=port,
                                                       security="tls", user="", password="",
                                                       cafile=ca, helo="client.test"))

    result = run(scenario)
    assert result.accepted == ["jones@old.test"] and result.reply == "2.0.0 queued as OLD1"
    assert heard[:3] == [b"EHLO client.test", b"HELO client.test",
                         f"MAIL FROM:<{SMITH}>".encode()]
    assert heard[-1] == b"QUIT"


@pytest.mark.parametrize(("auth_reply", "kind"), [
    (b"535 5.7.8 no", "auth"),  # refused
    (b"334 !!not-base64!!", "protocol"),  # a challenge that cannot be answered: cancelled
])
def test_a_failed_login_still_says_quit(tmp_path: Path, auth_reply: bytes, kind: str) -> None:
    """RFC 5321 4.1.1.10: the client ends the session with QUIT, after a refused login too
    (send used to drop the connection, as after a lost one)."""
    heard: list[bytes] = []
    replies = {b"EHLO": b"250-old.test\r\n250 AUTH LOGIN", b"AUTH": auth_reply,
               b"*": b"501 5.7.0 cancelled", b"QUIT": b"221 bye"}
    message = build_message(sender=SMITH, to=["jones@old.test"], subject="s", body="b\n")

    async def scenario() -> None:
        async with scripted_tls(tmp_path, replies, heard) as (port, ca):
            with pytest.raises(SendError) as caught:
                await submit(message, SubmitOptions(host="localhost", port=port, security="tls",
                                                    user="smith", password="pw", cafile=ca))
            assert caught.value.kind == kind

    run(scenario)
    assert heard[1].startswith(b"AUTH LOGIN") and heard[-1] == b"QUIT"
    assert not any(line.startswith(b"MAIL") for line in heard)


# --- Postfix ---------------------------------------------------------------------------------


def _mailharness() -> Any:
    """tests/interop/mailharness.py (the interop folder is not a package)."""
    folder = str(Path(__file__).resolve().parents[1] / "interop")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("mailharness")


@pytest.mark.interop
def test_submit_to_postfix_with_starttls(peer_missing: Callable[[str], None]) -> None:
    """Postfix's smtpd (STARTTLS, its certificate verified) stores what was meant.

    Without a SASL backend Postfix offers no AUTH; `user=""` sends without a login.
    """
    harness = _mailharness()
    reason = harness.PrivatePostfix.unavailable_reason()
    if reason is not None:
        peer_missing(reason)
    # Not under pytest's 0700 temp root, which locks out the postfix user.
    root = Path(tempfile.mkdtemp(prefix="postroom-send-postfix-"))
    try:
        cert, key = make_self_signed("mx.pf.example")
        (root / "tls").mkdir()
        (root / "tls" / "cert.pem").write_bytes(cert)
        (root / "tls" / "key.pem").write_bytes(key)
        (root / "tls" / "key.pem").chmod(0o600)
        postfix = harness.PrivatePostfix(
            root / "postfix", myhostname="mx.pf.example", mailbox_domain="pf.example",
            mailbox_users=["boss"],
            extra_main_cf={"smtpd_tls_security_level": "may",
                           "smtpd_tls_cert_file": str(root / "tls" / "cert.pem"),
                           "smtpd_tls_key_file": str(root / "tls" / "key.pem"),
                           "smtpd_tls_received_header": "yes"},
        )
        try:
            postfix.start()
        except harness.HarnessError as exc:
            pytest.fail(f"private postfix did not start: {exc}", pytrace=False)
        try:
            attachment = root / "data.bin"
            attachment.write_bytes(bytes(range(256)) * 300)
            message = build_message(sender=SMITH, to=["boss@pf.example"],
                                    bcc=["boss@pf.example"], subject=SUBJECT, body=BODY,
                                    attachments=[attachment])
            lines: list[str] = []
            result = run(lambda: submit(message, SubmitOptions(
                host="127.0.0.1", port=postfix.port, security="starttls", user="", password="",
                cafile=str(root / "tls" / "cert.pem"), trace=lines.append)))
            assert result.accepted == ["boss@pf.example"]
            assert result.reply.startswith("2.0.0 Ok: queued as ")
            assert "C: STARTTLS" in lines and not any("AUTH" in x for x in lines if "C:" in x)
            folder = postfix.mailbox_path("boss")
            deadline = time.monotonic() + 20
            while harness.count_new(folder) < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            (path,) = list((folder / "new").iterdir())  # one copy: Bcc named it again
            data = path.read_bytes()
            # Postfix keeps LF line ends and puts its own headers on top.
            assert data.endswith(wire_bytes(message).replace(b"\r\n", b"\n"))
            assert b"with ESMTPS" in data.split(b"\n\n", 1)[0]
        finally:
            postfix.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
