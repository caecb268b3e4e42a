"""`postroom fetch` against postroom's own POP3 server, run in-process.

Mail reaches the maildrop through postroom's SMTP listener. Downloads go into a
Maildir (or an mbox) and are compared with what the server stored; the server's
maildrop is checked after each run: emptied in delete mode, untouched with
--keep. A connection killed in the middle of a run (a write that aborts the
transport) must leave nothing lost and, run again, nothing duplicated.
"""

from __future__ import annotations

import asyncio
import errno
import io
import mailbox
import poplib
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from durable_order import install_recorder
from postroom import cli
from postroom.client import fetch as fetch_module
from postroom.client.fetch import (
    FetchError,
    FetchOptions,
    FetchResult,
    fetch,
    human_size,
    summary,
)
from postroom.client.sinks import STATE_NAME
from postroom.config import load_config
from postroom.net.channel import Channel
from postroom.server.main import Running, start
from postroom.store.factory import open_store

BOSS = "boss@corp.example"
PASSWORD = "boss-secret"


def run(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(scenario())


@asynccontextmanager
async def postroom(tmp_path: Path, extra: str = "") -> AsyncIterator[Running]:
    data = tmp_path / "server"
    data.mkdir(exist_ok=True)
    (data / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\n'
        'domains = ["corp.example"]\n'
        "[listen]\n"
        'smtp = "127.0.0.1:0"\n'
        'pop3 = "127.0.0.1:0"\n'
        'pop3s = "127.0.0.1:0"\n'
        "[pop3]\n"
        'auth_failure_delay = "0.1s"\n' + extra
    )
    config = load_config(data)
    directory = open_store(config.store).users
    directory.add_user(BOSS, PASSWORD)
    directory.set_apop_secret(BOSS, "apop-secret")
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


async def no_sessions(server: Running, timeout: float = 10.0) -> None:
    """Until the server has no POP3 session left (a dropped one releases its maildrop)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while any(server.services[name].sessions for name in ("pop3", "pop3s")):
        assert asyncio.get_running_loop().time() < deadline, "sessions still open"
        await asyncio.sleep(0.01)


def message(n: int, extra: bytes = b"") -> bytes:
    return (
        f"From: smith@isp.example\r\nTo: {BOSS}\r\nSubject: report {n}\r\n".encode()
        + extra + b"\r\n"
        + f"line one of {n}\r\n.a line that starts with a dot\r\n..two dots\r\n".encode()
        + b"From the start of a line\r\n>From quoted already\r\nend\r\n"
    )


async def deliver(server: Running, messages: list[bytes],
                  sender: str = "smith@isp.example") -> None:
    def send() -> None:
        with smtplib.SMTP(*server.address("smtp"), timeout=10) as client:
            for data in messages:
                client.sendmail(sender or "<>", [BOSS], data)

    await asyncio.to_thread(send)


def put_into_maildrop(tmp_path: Path, data: bytes) -> None:
    """A message placed into the maildrop directly, as another delivery agent would."""
    new = tmp_path / "server" / "mail" / "corp.example" / "boss" / "new"
    (new / f"1700000000.M1P1Q{len(data)}.elsewhere").write_bytes(data)


def on_server(tmp_path: Path) -> list[bytes]:
    folder = tmp_path / "server" / "mail" / "corp.example" / "boss"
    files = [p for sub in ("new", "cur") if (folder / sub).is_dir()
             for p in (folder / sub).iterdir()]
    return sorted(p.read_bytes() for p in files)


def local(dest: Path) -> list[bytes]:
    files = [p for sub in ("new", "cur") for p in (dest / sub).iterdir()]
    return sorted(p.read_bytes() for p in files)


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def settings(server: Running, tmp_path: Path, security: str = "stls") -> dict[str, Any]:
    host, port = server.address("pop3s" if security == "tls" else "pop3")
    return dict(host=host, port=port, security=security, user=BOSS, password=PASSWORD,
                cafile=str(tmp_path / "server" / "tls" / "cert.pem"))


# --- delete mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("security", ["stls", "tls"])
def test_fetch_and_delete(tmp_path: Path, security: str) -> None:
    dest = tmp_path / "Maildir"
    lines: list[str] = []

    async def scenario() -> tuple[list[bytes], FetchResult]:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(n) for n in range(3)])
            stored = on_server(tmp_path)
            result = await fetch(FetchOptions(dest=dest, trace=lines.append,
                                              **settings(server, tmp_path, security)))
            return stored, result

    stored, result = run(scenario)
    assert (result.downloaded, result.deleted, result.skipped) == (3, 3, 0)
    assert result.octets == sum(len(m) for m in stored)
    assert sorted(p.read_bytes() for p in result.paths) == sorted(lf(m) for m in stored)
    assert local(dest) == sorted(lf(m) for m in stored)
    assert all(p.parent == dest / "new" for p in result.paths)
    assert all(f",S={p.stat().st_size},W=" in p.name for p in result.paths)
    assert list((dest / "tmp").iterdir()) == []
    assert on_server(tmp_path) == []
    # Deleted on the server for good: nothing left to remember.
    assert (dest / STATE_NAME).read_text().splitlines()[1:] == []
    assert PASSWORD not in "\n".join(lines)
    if security == "stls":
        assert lines.index("C: STLS") < lines.index("C: AUTH PLAIN (credentials hidden)")
    assert any(line.startswith("TLS: TLSv1.") for line in lines)
    assert any(line.startswith("S: +OK") and "[Transaction state]" in line for line in lines)
    assert "C: RETR 1" in lines and "C: DELE 3" in lines
    assert lines[-1].startswith("S: +OK") and lines[-1].endswith("[Update state: 3 deleted]")


def test_user_pass_and_crlf(tmp_path: Path) -> None:
    dest = tmp_path / "Maildir"
    lines: list[str] = []

    async def scenario() -> list[bytes]:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(1)])
            # SMTP refuses lines past 1000 octets; POP3 must carry what a Maildir holds.
            put_into_maildrop(tmp_path, message(2, b"X-Big: " + b"y" * 5000 + b"\r\n"))
            stored = on_server(tmp_path)
            await fetch(FetchOptions(dest=dest, auth="user", crlf=True, trace=lines.append,
                                     **settings(server, tmp_path)))
            return stored

    stored = run(scenario)
    assert local(dest) == stored  # byte for byte
    assert f"C: USER {BOSS}" in lines and "C: PASS (hidden)" in lines


def test_apop(tmp_path: Path) -> None:
    dest = tmp_path / "Maildir"
    lines: list[str] = []

    async def scenario() -> None:
        async with postroom(tmp_path, "apop = true\n") as server:
            await deliver(server, [message(1)])
            options = {**settings(server, tmp_path), "password": "apop-secret"}
            result = await fetch(FetchOptions(dest=dest, auth="apop", trace=lines.append,
                                              **options))
            assert result.downloaded == 1
            with pytest.raises(FetchError) as caught:
                await fetch(FetchOptions(dest=dest, auth="apop",
                                         **{**options, "password": PASSWORD}))
            assert caught.value.kind == "auth"

    run(scenario)
    assert f"C: APOP {BOSS} (digest)" in lines


def test_empty_maildrop(tmp_path: Path) -> None:
    async def scenario() -> FetchResult:
        async with postroom(tmp_path) as server:
            return await fetch(FetchOptions(dest=tmp_path / "Maildir",
                                            **settings(server, tmp_path)))

    result = run(scenario)
    assert (result.downloaded, result.deleted, result.paths) == (0, 0, [])
    assert summary(result, keep=False) == "no new messages"


# --- keep mode -----------------------------------------------------------------------------------


def test_keep_then_only_new_mail(tmp_path: Path) -> None:
    dest = tmp_path / "Maildir"

    async def scenario() -> tuple[FetchResult, FetchResult, FetchResult]:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(1), message(2)])
            first = await fetch(FetchOptions(dest=dest, keep=True, **settings(server, tmp_path)))
            await deliver(server, [message(3)])
            second = await fetch(FetchOptions(dest=dest, keep=True,
                                              **settings(server, tmp_path, "tls")))
            third = await fetch(FetchOptions(dest=dest, keep=True, **settings(server, tmp_path)))
            return first, second, third

    first, second, third = run(scenario)
    assert (first.downloaded, first.deleted, first.skipped) == (2, 0, 0)
    assert (second.downloaded, second.deleted, second.skipped) == (1, 0, 2)
    assert (third.downloaded, third.skipped) == (0, 3)
    assert b"report 3" in second.paths[0].read_bytes()
    stored = on_server(tmp_path)
    assert len(stored) == 3 and local(dest) == sorted(lf(m) for m in stored)
    state = (dest / STATE_NAME).read_text().splitlines()
    assert state[0].startswith("#") and len(state) == 4
    assert all(line.endswith(f" pop3://{BOSS}@127.0.0.1") for line in state[1:])
    assert summary(second, keep=True) == (
        f"1 message ({human_size(second.octets)}) downloaded, 2 already downloaded before, "
        "kept on the server"
    )


def test_keep_forgets_what_the_server_no_longer_has(tmp_path: Path) -> None:
    dest = tmp_path / "Maildir"

    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(1), message(2)])
            await fetch(FetchOptions(dest=dest, keep=True, **settings(server, tmp_path)))
            # This one deletes both.
            await fetch(FetchOptions(dest=tmp_path / "other", **settings(server, tmp_path)))
            await deliver(server, [message(3)])
            result = await fetch(FetchOptions(dest=dest, keep=True, **settings(server, tmp_path)))
            assert (result.downloaded, result.skipped) == (1, 0)

    run(scenario)
    assert len((dest / STATE_NAME).read_text().splitlines()) == 2


# --- interrupted runs ------------------------------------------------------------------------


def cut_at(monkeypatch: pytest.MonkeyPatch, command: bytes) -> list[int]:
    """Abort the connection (no QUIT) when the client writes `command`; once."""
    real_write = Channel.write
    cuts: list[int] = []

    def write(self: Channel, data: bytes) -> None:
        if command in data and not cuts:
            cuts.append(1)
            self.abort()
            raise ConnectionResetError("cut by the test")
        real_write(self, data)

    monkeypatch.setattr(Channel, "write", write)
    return cuts


@pytest.mark.parametrize("keep", [False, True])
def test_interrupted_fetch_resumes_without_loss_or_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    dest = tmp_path / "Maildir"

    async def scenario() -> tuple[list[bytes], FetchError, FetchResult]:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(n) for n in range(3)])
            stored = on_server(tmp_path)
            cuts = cut_at(monkeypatch, b"RETR 2")
            with pytest.raises(FetchError) as caught:
                await fetch(FetchOptions(dest=dest, keep=keep, **settings(server, tmp_path)))
            assert cuts == [1]
            await no_sessions(server)  # the server notices the dropped session
            assert on_server(tmp_path) == stored  # DELE 1 without QUIT deleted nothing
            again = await fetch(FetchOptions(dest=dest, keep=keep, **settings(server, tmp_path)))
            return stored, caught.value, again

    stored, error, again = run(scenario)
    assert error.temporary and error.exit_code == 75 and error.kind == "lost"
    assert error.result is not None and error.result.downloaded == 1
    assert error.result.deleted == 0
    assert (again.downloaded, again.skipped) == (2, 1)
    assert again.deleted == (0 if keep else 3)
    assert local(dest) == sorted(lf(m) for m in stored)  # each exactly once
    assert on_server(tmp_path) == (stored if keep else [])


def test_dropped_before_quit_is_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "Maildir"

    async def scenario() -> tuple[list[bytes], FetchError, FetchResult]:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(1), message(2)])
            stored = on_server(tmp_path)
            cut_at(monkeypatch, b"QUIT")
            with pytest.raises(FetchError) as caught:
                await fetch(FetchOptions(dest=dest, **settings(server, tmp_path)))
            await no_sessions(server)
            again = await fetch(FetchOptions(dest=dest, **settings(server, tmp_path)))
            return stored, caught.value, again

    stored, error, again = run(scenario)
    assert "before QUIT was answered" in error.text
    assert error.result is not None and error.result.downloaded == 2
    assert (again.downloaded, again.skipped, again.deleted) == (0, 2, 2)
    assert local(dest) == sorted(lf(m) for m in stored)
    assert on_server(tmp_path) == []


@pytest.mark.parametrize("security", ["stls", "tls"])
def test_quit_refused_keeps_the_messages_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, security: str
) -> None:
    """The server's Update state fails (here its folder sync, after the unlink): QUIT
    gets -ERR, the fetch says so with the server's answer, and the next fetch
    stores nothing twice."""
    dest = tmp_path / "Maildir"
    server_mail = tmp_path / "server" / "mail"

    async def scenario() -> tuple[FetchError, FetchResult]:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(1)])
            recorder = install_recorder(monkeypatch)
            recorder.fail("sync_dir", lambda call: OSError(errno.EIO, "Input/output error")
                          if call.path and server_mail in call.path.parents else None)
            with pytest.raises(FetchError) as caught:
                await fetch(FetchOptions(dest=dest, **settings(server, tmp_path, security)))
            recorder.fail("sync_dir", lambda call: None)
            again = await fetch(FetchOptions(dest=dest, **settings(server, tmp_path, security)))
            return caught.value, again

    error, again = run(scenario)
    assert "could not delete the messages: -ERR" in error.text, error.text
    assert error.result is not None and error.result.downloaded == 1
    assert again.downloaded == 0
    assert len(local(dest)) == 1 and on_server(tmp_path) == []


# --- mbox ---------------------------------------------------------------------------------------


def test_mbox(tmp_path: Path) -> None:
    box = tmp_path / "inbox.mbox"
    box.write_bytes(b"From old@x.example Thu Jan  1 00:00:00 2024\nSubject: old\n\nold body")

    async def scenario() -> list[bytes]:
        async with postroom(tmp_path) as server:
            # The server files the envelope sender as Return-Path (RFC 5321 4.4), the
            # client's own one removed; a null sender is MAILER-DAEMON in mbox.
            await deliver(server, [message(1, b"Return-Path: <forged@evil.example>\r\n"),
                                   message(2)])
            await deliver(server, [message(3)], sender="")
            stored = on_server(tmp_path)
            result = await fetch(FetchOptions(dest=box, mbox=True, **settings(server, tmp_path)))
            assert result.paths == [box, box, box]
            return stored

    stored = run(scenario)
    assert (tmp_path / f".inbox.mbox{STATE_NAME}").exists()
    data = box.read_bytes()
    assert data.startswith(b"From old@x.example Thu Jan  1 00:00:00 2024\nSubject: old\n\n"
                           b"old body\n\nFrom ")
    assert b"\n>From the start of a line\n>>From quoted already\n" in data
    assert data.endswith(b"end\n\n")
    messages = list(mailbox.mbox(box))
    assert [m["Subject"] for m in messages] == ["old", "report 1", "report 2", "report 3"]
    senders = sorted(m.get_from().split()[0] for m in messages[1:])
    assert senders == ["MAILER-DAEMON", "smith@isp.example", "smith@isp.example"]
    assert b"forged" not in data
    # mboxrd: one ">" less on each quoted line gives the message back.
    for message_ in messages[1:]:
        raw = message_.as_bytes(unixfrom=False).replace(b"\n>From", b"\nFrom")
        raw = raw.replace(b"\n>>From", b"\n>From")
        assert lf(next(m for m in stored if message_["Subject"].encode() in m)) in raw + b"\n"


# --- failures ------------------------------------------------------------------------------------


def test_wrong_password_in_use_and_untrusted_certificate(tmp_path: Path) -> None:
    dest = tmp_path / "Maildir"

    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(1)])
            options = settings(server, tmp_path)
            with pytest.raises(FetchError) as caught:
                await fetch(FetchOptions(dest=dest, **{**options, "password": "wrong"}))
            assert caught.value.kind == "auth" and caught.value.exit_code == 69
            assert "authentication failed for boss@corp.example" in caught.value.text
            assert "-ERR [AUTH]" in caught.value.text

            def hold() -> poplib.POP3:
                client = poplib.POP3_SSL(*server.address("pop3s"), timeout=10,
                                         context=ssl._create_unverified_context())
                client.user(BOSS)
                client.pass_(PASSWORD)
                return client

            holder = await asyncio.to_thread(hold)
            with pytest.raises(FetchError) as caught:
                await fetch(FetchOptions(dest=dest, **options))
            assert caught.value.temporary and caught.value.exit_code == 75
            assert "[IN-USE]" in caught.value.text
            await asyncio.to_thread(holder.quit)
            for security in ("stls", "tls"):
                unchecked = {**settings(server, tmp_path, security), "cafile": None}
                with pytest.raises(FetchError) as caught:
                    await fetch(FetchOptions(dest=dest, **unchecked))
                assert caught.value.kind == "certificate"
            result = await fetch(FetchOptions(dest=dest, verify_cert=False, **unchecked))
            assert result.downloaded == 1

    run(scenario)


def test_nothing_listening(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as caught:
        run(lambda: fetch(FetchOptions(host="127.0.0.1", port=port, security="tls", user=BOSS,
                                       password="x", dest=tmp_path / "Maildir")))
    assert caught.value.kind == "connect" and caught.value.exit_code == 69
    assert caught.value.text == f"cannot connect to 127.0.0.1:{port}: Connection refused"


def test_maildir_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FetchError) as caught:
        run(lambda: fetch(FetchOptions(host="127.0.0.1", port=1, security="tls", user=BOSS,
                                       password="x", dest=tmp_path / "file" / "Maildir")))
    assert caught.value.kind == "usage" and caught.value.exit_code == 2


# --- the command line ------------------------------------------------------------------------


def test_cli_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "Maildir"
    monkeypatch.setenv("POSTROOM_PASSWORD", PASSWORD)

    async def scenario() -> list[int]:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(n) for n in range(25)])
            host, port = server.address("pop3")
            cafile = str(tmp_path / "server" / "tls" / "cert.pem")
            base = ["fetch", str(dest), "--server", f"{host}:{port}", "--user", BOSS]
            return [
                await asyncio.to_thread(cli.main, [*base, "--keep", "--progress"]),
                await asyncio.to_thread(cli.main, [*base, "--cafile", cafile, "-v"]),
                await asyncio.to_thread(cli.main, [*base, "--insecure"]),
            ]

    codes = run(scenario)
    out, err = capsys.readouterr()
    assert codes == [69, 0, 0]
    assert "its certificate is not trusted (self-signed certificate) (trust it with " in err
    lines = out.splitlines()
    assert lines[0].startswith("25 messages (") and lines[0].endswith(
        "KiB) downloaded, 25 deleted on the server")
    assert lines[1] == "no new messages"
    assert "C: RETR 25" in err and PASSWORD not in err
    assert len(local(dest)) == 25


def test_cli_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POSTROOM_PASSWORD", PASSWORD)

    async def scenario() -> int:
        async with postroom(tmp_path) as server:
            await deliver(server, [message(n) for n in range(21)])
            host, port = server.address("pop3s")
            return await asyncio.to_thread(cli.main, [
                "fetch", str(tmp_path / "Maildir"), "--server", f"{host}:{port}",
                "--user", BOSS, "--security", "tls", "--insecure", "--keep", "--progress"])

    assert run(scenario) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fetching: 1/21 messages, ")
    assert err[-1].startswith("fetching: 21/21 messages, ")


def test_cli_usage(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POSTROOM_PASSWORD", "x")
    assert cli.main(["fetch", "x", "--server", "h:99999", "--user", "u"]) == 2
    assert "port must be 1-65535" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["fetch", "x", "--server", "h:1", "--user", "u", "--auth", "cram"]) == 2


def test_human_size_and_summary() -> None:
    assert [human_size(n) for n in (0, 1, 1023, 1024, 14 * 1024 + 300, 5 << 20, 12 << 30)] == [
        "0 bytes", "1 byte", "1023 bytes", "1.0 KiB", "14 KiB", "5.0 MiB", "12 GiB"]
    result = FetchResult(3, 3, 0, 14 * 1024, [])
    assert summary(result, keep=False) == "3 messages (14 KiB) downloaded, 3 deleted on the server"
    assert fetch_module.FetchOptions.default_security(995) == "tls"
    assert fetch_module.FetchOptions.default_security(110) == "stls"


def test_wrong_security_for_the_port_says_so(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with postroom(tmp_path) as server:
            options = settings(server, tmp_path)
            with pytest.raises(FetchError) as caught:  # implicit TLS on the STLS port
                await fetch(FetchOptions(dest=tmp_path / "M", **{**options, "security": "tls"}))
            assert caught.value.kind == "tls"
            assert "is this a STARTTLS/STLS port?" in caught.value.text
            options = settings(server, tmp_path, "tls")
            with pytest.raises(FetchError) as caught:  # STLS on the implicit TLS port
                await fetch(FetchOptions(dest=tmp_path / "M", timeout=0.5,
                                         **{**options, "security": "stls"}))
            text = caught.value.text
            assert "if this port expects TLS from the start, use --security tls" in text

    run(scenario)
