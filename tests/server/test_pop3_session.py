"""The asyncio POP3 server on real loopback sockets, with poplib as the client.

Mail reaches the maildrop the way it does in life: through postroom's SMTP
listener. The POP3 server runs in the test's event loop; poplib runs in a
thread.
"""

from __future__ import annotations

import asyncio
import errno
import poplib
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from durable_order import install_recorder
from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store


def write_config(data: Path, **pop3: Any) -> None:
    lines = [
        'hostname = "mx.corp.example"',
        'domains = ["corp.example"]',
        "[listen]",
        'smtp = "127.0.0.1:0"',
        'pop3 = "127.0.0.1:0"',
        'pop3s = "127.0.0.1:0"',
        "[pop3]",
    ]
    for key, value in pop3.items():
        lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true"))
    (data / "postroom.toml").write_text("\n".join(lines) + "\n")


@asynccontextmanager
async def running_server(tmp_path: Path, **pop3: Any) -> AsyncIterator[Running]:
    pop3.setdefault("auth_failure_delay", "0.3s")
    write_config(tmp_path, **pop3)
    config = load_config(tmp_path)
    open_store(config.store).users.add_user("boss@corp.example", "boss-secret")
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def message(n: int) -> bytes:
    return (
        f"From: smith@isp.example\r\nTo: boss@corp.example\r\nSubject: report {n}\r\n\r\n"
        f"line one of {n}\r\n.a line that starts with a dot\r\n..two dots\r\nend\r\n"
    ).encode()


def deliver(server: Running, count: int) -> None:
    host, port = server.address("smtp")
    with smtplib.SMTP(host, port, timeout=10) as client:
        for n in range(count):
            client.sendmail("smith@isp.example", ["boss@corp.example"], message(n))


def maildir(tmp_path: Path) -> Path:
    return tmp_path / "mail" / "corp.example" / "boss"


def stored(tmp_path: Path) -> list[bytes]:
    files = [*(maildir(tmp_path) / "new").iterdir(), *(maildir(tmp_path) / "cur").iterdir()]
    return sorted(p.read_bytes() for p in files)


def run(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(scenario())


def login(server: Running, *, tls: str = "stls") -> poplib.POP3:
    if tls == "pop3s":
        client: poplib.POP3 = poplib.POP3_SSL(*server.address("pop3s"), timeout=10,
                                              context=unverified())
    else:
        client = poplib.POP3(*server.address("pop3"), timeout=10)
        if tls == "stls":
            client.stls(context=unverified())
    client.user("boss@corp.example")
    client.pass_("boss-secret")
    return client


@pytest.mark.parametrize("tls", ["stls", "pop3s"])
def test_list_retrieve_delete_quit(tmp_path: Path, tls: str) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            await asyncio.to_thread(deliver, server, 3)
            files = stored(tmp_path)

            def session() -> None:
                client = login(server, tls=tls)
                count, octets = client.stat()
                assert count == 3 and octets == sum(len(f) for f in files)
                sizes = sorted(int(line.split()[1]) for line in client.list()[1])
                assert sizes == sorted(len(f) for f in files)
                got = []
                for n in (1, 2, 3):
                    lines = client.retr(n)[1]
                    got.append(b"\r\n".join(lines) + b"\r\n")
                assert sorted(got) == files  # poplib un-stuffs; byte for byte
                top = client.top(1, 1)[1]
                assert top[-1].startswith(b"line one of") and b"" in top
                client.dele(1)
                client.dele(2)
                assert client.stat()[0] == 1
                client.quit()

            await asyncio.to_thread(session)

    run(scenario)
    assert len(stored(tmp_path)) == 1


def test_uidl_is_stable_when_read_mail_moves_to_cur(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            await asyncio.to_thread(deliver, server, 2)

            def uidls(retrieve: bool) -> list[bytes]:
                client = login(server)
                listing = sorted(client.uidl()[1])
                if retrieve:
                    client.retr(1)
                    client.retr(2)
                client.quit()
                return listing

            before = await asyncio.to_thread(uidls, True)
            assert len(list((maildir(tmp_path) / "cur").iterdir())) == 2
            assert list((maildir(tmp_path) / "new").iterdir()) == []
            after = await asyncio.to_thread(uidls, False)
            assert before == after and len(set(before)) == 2

    run(scenario)


def test_dropped_session_deletes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            await asyncio.to_thread(deliver, server, 2)

            def session() -> None:
                client = login(server)
                client.dele(1)
                client.dele(2)
                client.sock.close()  # no QUIT: the Update state never comes

            await asyncio.to_thread(session)
            while server.services["pop3"].sessions:  # the server notices the dropped session
                await asyncio.sleep(0.01)
            second = await asyncio.to_thread(login, server)
            assert (await asyncio.to_thread(second.stat))[0] == 2
            await asyncio.to_thread(second.quit)

    run(scenario)
    assert len(stored(tmp_path)) == 2


def test_update_says_err_when_its_deletions_may_not_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 1939 6: QUIT answers -ERR when the messages could not be removed; a
    deletion whose folder sync failed may come back after a power cut."""
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            await asyncio.to_thread(deliver, server, 2)
            recorder = install_recorder(monkeypatch)
            recorder.fail("sync_dir", lambda call: OSError(errno.EIO, "Input/output error"))

            def session() -> None:
                client = login(server)
                client.dele(1)
                with pytest.raises(poplib.error_proto, match="-ERR"):
                    client.quit()

            await asyncio.to_thread(session)

    run(scenario)


def test_second_login_gets_in_use(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            first = await asyncio.to_thread(login, server)
            with pytest.raises(poplib.error_proto) as info:
                await asyncio.to_thread(login, server)
            assert info.value.args[0].startswith(b"-ERR [IN-USE]")
            await asyncio.to_thread(first.quit)
            third = await asyncio.to_thread(login, server)  # the lock went with the session
            await asyncio.to_thread(third.quit)

    run(scenario)


def test_wrong_password_is_slowed_and_says_auth(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path, auth_failure_delay="0.3s") as server:

            def attempt() -> tuple[bytes, float]:
                client = poplib.POP3(*server.address("pop3"), timeout=10)
                client.stls(context=unverified())
                client.user("boss@corp.example")
                began = time.monotonic()
                try:
                    client.pass_("wrong")
                except poplib.error_proto as exc:
                    return exc.args[0], time.monotonic() - began
                finally:
                    client.close()
                raise AssertionError("a wrong password was accepted")

            first_reply, first_wait = await asyncio.to_thread(attempt)
            second_reply, second_wait = await asyncio.to_thread(attempt)
            assert first_reply.startswith(b"-ERR [AUTH]")
            assert second_reply.startswith(b"-ERR [AUTH]")
            # Behaviour, not speed: the second failure waits longer (0.3 s, then 0.6 s).
            assert first_wait >= 0.3 and second_wait >= 0.6

    run(scenario)


def test_plaintext_login_refused_before_tls_unless_allowed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:

            def attempt() -> bytes:
                client = poplib.POP3(*server.address("pop3"), timeout=10)
                try:
                    client.user("boss@corp.example")
                    client.pass_("boss-secret")
                except poplib.error_proto as exc:
                    return exc.args[0]
                finally:
                    client.close()
                return b"accepted"

            assert (await asyncio.to_thread(attempt)).startswith(b"-ERR [AUTH]")

    run(scenario)

    async def allowed() -> None:
        async with running_server(tmp_path / "x", allow_plaintext_auth=True) as server:
            client = await asyncio.to_thread(login, server, tls="none")
            await asyncio.to_thread(client.quit)

    (tmp_path / "x").mkdir()
    run(allowed)


def test_auth_plain_and_login_over_tls(tmp_path: Path) -> None:
    import base64

    async def scenario() -> None:
        async with running_server(tmp_path) as server:

            def session(mechanism: str) -> bytes:
                client = poplib.POP3(*server.address("pop3"), timeout=10)
                client.stls(context=unverified())
                if mechanism == "PLAIN":
                    token = base64.b64encode(b"\0boss@corp.example\0boss-secret").decode()
                    reply = client._shortcmd(f"AUTH PLAIN {token}")
                else:
                    client._putcmd("AUTH LOGIN")
                    assert client._getline()[0].startswith(b"+ ")
                    client._putcmd(base64.b64encode(b"boss@corp.example").decode())
                    assert client._getline()[0].startswith(b"+ ")
                    reply = client._shortcmd(base64.b64encode(b"boss-secret").decode())
                client.quit()
                return reply

            assert (await asyncio.to_thread(session, "PLAIN")).startswith(b"+OK")
            assert (await asyncio.to_thread(session, "LOGIN")).startswith(b"+OK")

    run(scenario)


def test_auth_plain_goes_through_the_sasl_exchange_smtp_uses(tmp_path: Path) -> None:
    """POP3 AUTH answers as SMTP AUTH does (protocol.sasl.ServerExchange): an authzid
    naming the same user is fine, another user's fails as a wrong password does, and a
    PLAIN message without a password (RFC 4616 2) is malformed."""
    import base64

    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            directory = open_store(load_config(tmp_path).store).users
            directory.add_user("jones@corp.example", "jones-secret")

            def plain(message: bytes) -> bytes:
                client = poplib.POP3(*server.address("pop3"), timeout=10)
                client.stls(context=unverified())
                token = base64.b64encode(message).decode()
                try:
                    return bytes(client._shortcmd(f"AUTH PLAIN {token}"))
                except poplib.error_proto as exc:
                    return bytes(exc.args[0])
                finally:
                    client.close()

            same = b"BOSS@corp.example\0boss@corp.example\0boss-secret"
            assert (await asyncio.to_thread(plain, same)).startswith(b"+OK")
            other = b"boss@corp.example\0jones@corp.example\0jones-secret"
            assert (await asyncio.to_thread(plain, other)) == (
                b"-ERR [AUTH] Authentication failed: wrong user name or password")
            empty = b"\0boss@corp.example\0"
            assert (await asyncio.to_thread(plain, empty)) == (
                b"-ERR [AUTH] Malformed PLAIN response")

    run(scenario)


def test_capa_before_and_after_stls(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:

            def capas() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
                client = poplib.POP3(*server.address("pop3"), timeout=10)
                before = client.capa()
                client.stls(context=unverified())
                after = client.capa()
                client.quit()
                return before, after

            before, after = await asyncio.to_thread(capas)
            assert "STLS" in before and "USER" not in before
            assert "STLS" not in after and "USER" in after
            assert after["SASL"] == ["PLAIN", "LOGIN"]
            for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"):
                assert cap in after

    run(scenario)


def test_apop_is_opt_in_per_user_and_greeting_has_timestamp_only_when_on(tmp_path: Path) -> None:
    async def off() -> None:
        async with running_server(tmp_path / "off") as server:
            client = await asyncio.to_thread(poplib.POP3, *server.address("pop3"), timeout=10)
            assert b"<" not in client.getwelcome()
            await asyncio.to_thread(client.quit)

    (tmp_path / "off").mkdir()
    run(off)

    async def on() -> None:
        async with running_server(tmp_path, apop=True) as server:
            config = load_config(tmp_path)
            directory = open_store(config.store).users
            directory.add_user("jones@corp.example", "jones-secret")
            directory.set_apop_secret("boss@corp.example", "tanstaaf")

            def session(user: str, secret: str) -> bytes:
                client = poplib.POP3(*server.address("pop3"), timeout=10)
                assert b"@mx.corp.example>" in client.getwelcome()
                try:
                    return client.apop(user, secret)
                except poplib.error_proto as exc:
                    return exc.args[0]
                finally:
                    client.close()

            assert (await asyncio.to_thread(session, "boss@corp.example", "tanstaaf")).startswith(
                b"+OK"
            )
            wrong = await asyncio.to_thread(session, "boss@corp.example", "boss-secret")
            assert wrong.startswith(b"-ERR [AUTH]")
            # A user who did not opt in cannot use APOP, even with the right password.
            other = await asyncio.to_thread(session, "jones@corp.example", "jones-secret")
            assert other.startswith(b"-ERR [AUTH]")

    run(on)


def test_top_is_a_peek_and_leaves_the_message_new(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            await asyncio.to_thread(deliver, server, 1)

            def peek() -> None:
                client = login(server)
                client.top(1, 0)
                client.quit()

            await asyncio.to_thread(peek)

    run(scenario)
    assert len(list((maildir(tmp_path) / "new").iterdir())) == 1
    assert list((maildir(tmp_path) / "cur").iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, 4095, 256 * 1024, 256 * 1024 + 1, 700_000])
def test_retr_returns_every_octet_whatever_the_size(tmp_path: Path, size: int) -> None:
    from postroom.store.maildrop import Maildrop

    box = tmp_path / "box"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    (box / "new" / f"1.M1P1Q1.host,S={size},W={size}").write_bytes(body)
    (box / "new" / "2.M2P2Q2.host,S=3,W=3").write_bytes(b"a much longer file than S= says\r\n")
    drop = Maildrop.open(box)
    try:
        by_size = {size: n for n, size in enumerate(drop.sizes, start=1)}
        assert b"".join(drop.read_chunks(by_size[size]) or []) == body
        longer = b"".join(drop.read_chunks(by_size[3]) or [])
        assert longer == b"a much longer file than S= says\r\n"
    finally:
        drop.close()


def raw_session(server: Running, commands: bytes, replies: int) -> list[bytes]:
    """Log in over plaintext (allowed by the test's config), send `commands` in one
    write, and collect the reply lines until `replies` single- or multi-line replies
    have come: [status line, body...] per reply, joined by CRLF."""
    import socket

    with socket.create_connection(server.address("pop3"), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"USER boss@corp.example\r\nPASS boss-secret\r\n")
        assert reader.readline().startswith(b"+OK") and reader.readline().startswith(b"+OK")
        sock.sendall(commands)
        out = []
        for _ in range(replies):
            status = reader.readline()
            lines = [status]
            multi = status.startswith(b"+OK") and (b" octets" in status or b"follows" in status)
            while multi:
                line = reader.readline()
                lines.append(line)
                if line == b".\r\n":
                    break
            out.append(b"".join(lines))
        return out


def unstuff(reply: bytes) -> bytes:
    lines = reply.split(b"\r\n")[1:-2]  # between the status line and the "." line
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


def test_pipelined_batch_mixing_small_and_large_messages_then_quit(tmp_path: Path) -> None:
    """RFC 2449 PIPELINING: one write carries RETRs answered at once (small messages),
    one sent a chunk at a time (large), a DELE and the QUIT that ends in Update."""
    big = b"Subject: big\r\n\r\n" + b".dotted line of a large message\r\n" * 6000
    box = maildir(tmp_path)

    async def scenario() -> list[bytes]:
        async with running_server(tmp_path, allow_plaintext_auth=True) as server:
            await asyncio.to_thread(deliver, server, 2)
            (box / "new" / f"9999999999.M1P1Q1.host,S={len(big)},W={len(big)}").write_bytes(big)
            return await asyncio.to_thread(
                raw_session, server,
                b"RETR 3\r\nRETR 1\r\nDELE 2\r\nRETR 2\r\nRETR 3\r\nQUIT\r\n", 6,
            )

    retr_big, retr_1, dele, retr_deleted, retr_big_again, quit_ = run(scenario)
    assert unstuff(retr_big) == big and unstuff(retr_big_again) == big
    assert unstuff(retr_1).endswith(message(0))  # after the Received: header
    assert dele.startswith(b"+OK") and retr_deleted.startswith(b"-ERR")
    assert quit_.startswith(b"+OK")
    left = sorted(p.read_bytes() for p in (box / "cur").iterdir())
    assert len(left) == 2 and big in left and unstuff(retr_1) in left


def test_lf_file_is_sent_with_crlf_and_listed_with_its_w_size(tmp_path: Path) -> None:
    """A file another MDA stored with LF line ends: LIST says the CRLF size (W=), and
    RETR sends exactly that many octets, CRLF line ends, byte-stuffed."""
    lf = b"Subject: from elsewhere\n\n.a dot\nlast\n"
    crlf_size = len(lf) + lf.count(b"\n")
    box = maildir(tmp_path)

    async def scenario() -> list[bytes]:
        async with running_server(tmp_path, allow_plaintext_auth=True) as server:
            await asyncio.to_thread(deliver, server, 0)
            for sub in ("new", "cur", "tmp"):
                (box / sub).mkdir(parents=True, exist_ok=True)
            (box / "new" / f"1.M1P1.host,S={len(lf)},W={crlf_size}").write_bytes(lf)
            return await asyncio.to_thread(raw_session, server, b"LIST 1\r\nRETR 1\r\n", 2)

    listed, retr = run(scenario)
    assert listed == b"+OK 1 %d\r\n" % crlf_size
    assert retr.startswith(b"+OK %d octets\r\n" % crlf_size)
    assert unstuff(retr) == lf.replace(b"\n", b"\r\n")


def test_unreadable_message_gets_sys_temp_and_the_session_goes_on(tmp_path: Path) -> None:
    """A disk fault reading one message is that command's -ERR [SYS/TEMP] (RFC 3206),
    not a dropped connection: here the "message" is a folder, and read(2) fails."""
    box = maildir(tmp_path)

    async def scenario() -> list[bytes]:
        async with running_server(tmp_path, allow_plaintext_auth=True) as server:
            await asyncio.to_thread(deliver, server, 1)
            (box / "new" / "1.M1P1.host,S=10,W=10").mkdir()
            return await asyncio.to_thread(raw_session, server, b"RETR 1\r\nRETR 2\r\n", 2)

    broken, good = run(scenario)
    assert broken.startswith(b"-ERR [SYS/TEMP]")
    assert unstuff(good).endswith(message(0))


def test_read_ahead_serves_the_next_retr_and_marks_nothing_read(tmp_path: Path) -> None:
    from postroom.store.maildrop import Maildrop

    box = tmp_path / "box"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    small, large = b"Subject: 1\r\n\r\none\r\n", b"x" * 5000 + b"\r\n"
    (box / "new" / f"1.M1P1.host,S={len(small)},W={len(small)}").write_bytes(small)
    (box / "new" / f"2.M2P2.host,S={len(large)},W={len(large)}").write_bytes(large)
    drop = Maildrop.open(box)
    try:
        drop.read_ahead(1, limit=1000)
        drop.read_ahead(2, limit=1000)  # over the limit: not read, the first stays
        drop.read_ahead(3, limit=1000)  # no such message: nothing happens
        assert not drop.retrieved[0]  # reading ahead is not RETR
        drop.path(1).unlink()  # gone now, but read before: still served
        assert drop.read_chunks(1) == [small] and drop.retrieved[0]
        assert drop.read_chunks(1) is None  # the read-ahead copy is used once
        assert b"".join(drop.read_chunks(2) or []) == large
    finally:
        drop.close()


def test_bdat_message_with_bare_lf_is_named_and_served_exactly(tmp_path: Path) -> None:
    """BDAT content is taken as it comes (RFC 3030), bare LFs included: its name says
    the size as POP3 sends it (W=, more than S=), and RETR sends exactly that many
    octets, every line ending in CRLF."""
    import socket

    content = b"Subject: chunked\r\n\r\nline with a bare LF\nlast line\r\n"

    async def scenario() -> tuple[int, bytes]:
        async with running_server(tmp_path, allow_plaintext_auth=True) as server:

            def send() -> None:
                with socket.create_connection(server.address("smtp"), timeout=10) as sock:
                    reader = sock.makefile("rb")
                    assert reader.readline().startswith(b"220")
                    sock.sendall(b"EHLO client.example\r\n")
                    while not reader.readline().startswith(b"250 "):
                        pass
                    sock.sendall(b"MAIL FROM:<smith@isp.example>\r\n"
                                 b"RCPT TO:<boss@corp.example>\r\n")
                    assert reader.readline().startswith(b"250")
                    assert reader.readline().startswith(b"250")
                    sock.sendall(b"BDAT %d LAST\r\n" % len(content) + content)
                    assert reader.readline().startswith(b"250")
                    sock.sendall(b"QUIT\r\n")

            await asyncio.to_thread(send)
            listed, retr = await asyncio.to_thread(
                raw_session, server, b"LIST 1\r\nRETR 1\r\n", 2
            )
            return int(listed.split()[2]), unstuff(retr)

    size, body = run(scenario)
    (stored,) = (maildir(tmp_path) / "new").iterdir()
    s_size = int(stored.name.split(",S=")[1].split(",")[0])
    w_size = int(stored.name.split(",W=")[1])
    assert s_size == stored.stat().st_size and w_size == s_size + 1  # one bare LF
    assert size == w_size == len(body)
    assert b"\r\n" in body and body.count(b"\n") == body.count(b"\r\n")
    assert body.endswith(content.replace(b"LF\nlast", b"LF\r\nlast"))


def test_a_session_on_a_big_maildrop_gives_its_memory_back_after_quit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot of a maildrop of RELEASE_AFTER_MESSAGES or more is handed back to
    the system (malloc_trim) once its session ends; a small one is not worth it."""
    import threading

    from postroom.server import heap

    released: list[int] = []
    done = threading.Event()

    def release() -> bool:
        released.append(1)
        done.set()
        return True

    monkeypatch.setattr(heap, "RELEASE_AFTER_MESSAGES", 2)
    monkeypatch.setattr(heap, "release", release)

    async def scenario() -> None:
        async with running_server(tmp_path) as server:
            def session(expected: int) -> None:
                client = login(server)
                assert client.stat()[0] == expected
                client.quit()

            await asyncio.to_thread(deliver, server, 1)
            await asyncio.to_thread(session, 1)  # below the threshold: nothing
            await asyncio.to_thread(deliver, server, 1)
            await asyncio.to_thread(session, 2)
            assert await asyncio.to_thread(done.wait, 10)

    run(scenario)
    assert released == [1]
