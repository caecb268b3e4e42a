"""Dovecot serving postroom's Maildir agrees with postroom's POP3 server, message by message.

postroom delivers mail (through its SMTP listener) and serves it with POP3; a
private Dovecot is then pointed at the very same Maildir folder. Both must
report the same messages, sizes (LIST) and bytes (RETR), in turns, while each
deletes some: what one removes the other no longer lists. Dovecot writes its
own files into the Maildir (dovecot-uidlist, dovecot.index*, and the renames
it makes into cur/ with flags); postroom must not list them as mail, and its
UIDLs must survive Dovecot's renames. The last two tests rename messages under
an open postroom session: that session still reads and deletes them (it finds
them again by their Maildir unique name).
"""

from __future__ import annotations

import poplib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mailcheck import CRLF, make_message, new_token
from mailharness import (
    HarnessError,
    Postroom,
    PrivateDovecot,
    pop3_listing,
    pop3_message,
    pop3_session,
    pop3_uidls,
    smtp_send,
    stored_by_token,
    wait_for_pop3,
)

pytestmark = pytest.mark.interop

RCPT = "boss@corp.example"
PASSWORD = "boss-secret"
SENDER = "sender@client.example"


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A folder outside pytest's temp root: that root is made 0700 by every pytest run, and
    Dovecot's unprivileged processes must reach the Maildir and the passwd file."""
    folder = Path(tempfile.mkdtemp(prefix="postroom-dovecot-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def servers(
    outside_tmp: Path, peer_missing: Callable[[str], None]
) -> Iterator[tuple[Postroom, PrivateDovecot]]:
    reason = PrivateDovecot.unavailable_reason()
    if reason is not None:
        peer_missing(reason)
    (outside_tmp / "postroom").mkdir()
    server = Postroom(outside_tmp / "postroom", users={RCPT: PASSWORD}, aliases={},
                      listeners=("smtp", "pop3"),
                      extra_toml="[pop3]\nallow_plaintext_auth = true\n")
    dovecot = PrivateDovecot(outside_tmp / "dovecot", maildir=server.maildir(RCPT),
                             user=RCPT, password=PASSWORD)
    try:
        try:
            server.start()
            wait_for_pop3(server.ports["pop3"])
        except HarnessError as exc:
            pytest.fail(f"postroom did not start: {exc}", pytrace=False)
        yield server, dovecot
    finally:
        dovecot.stop()
        server.stop()


def messages(tokens: list[str]) -> list[bytes]:
    """Five shapes: tricky lines, ~200 KiB, one line, 8-bit UTF-8, a body of dot lines."""
    big = CRLF.join(f"{i:06d} {'.' * (i % 4)}{tokens[1]}".encode() for i in range(6000)) + CRLF
    return [
        make_message(tokens[0], sender=SENDER, recipient=RCPT),
        make_message(tokens[1], sender=SENDER, recipient=RCPT, body=big),
        make_message(tokens[2], sender=SENDER, recipient=RCPT, body=b"one line\r\n"),
        make_message(tokens[3], sender=SENDER, recipient=RCPT,
                     extra_headers=(b"Content-Type: text/plain; charset=utf-8",
                                    b"Content-Transfer-Encoding: 8bit"),
                     body="Grüße aus Köln — ½ € 日本\r\n".encode()),
        make_message(tokens[4], sender=SENDER, recipient=RCPT, body=b".\r\n..\r\n...\r\n.x\r\n"),
    ]


def view(port: int) -> tuple[dict[str, int], dict[str, bytes], dict[str, str]]:
    """One POP3 session: ({token: LIST size}, {token: RETR bytes}, {token: UIDL}); no DELE."""
    client = pop3_session(port, user=RCPT, password=PASSWORD)
    try:
        sizes, bodies, uids = {}, {}, {}
        listing = pop3_listing(client)
        uidl = pop3_uidls(client)
        for number, size in listing.items():
            data = pop3_message(client, number)
            token = data.split(b"Subject: interop ", 1)[1][:32].decode()
            sizes[token], bodies[token], uids[token] = size, data, uidl[number]
        client.quit()
    finally:
        client.close()
    return sizes, bodies, uids


def delete(port: int, token: str) -> None:
    """DELE the message carrying `token`, then QUIT."""
    client = pop3_session(port, user=RCPT, password=PASSWORD)
    try:
        for number in pop3_listing(client):
            _, lines, _ = client.top(number, 0)
            if any(token.encode() in line for line in lines):
                client.dele(number)
                break
        else:
            raise AssertionError(f"no message with token {token}")
        client.quit()
    finally:
        client.close()


def test_dovecot_and_postroom_serve_the_same_maildir_alike(
    servers: tuple[Postroom, PrivateDovecot],
) -> None:
    server, dovecot = servers
    tokens = [new_token() for _ in range(5)]
    smtp_send(server.smtp_port, SENDER, RCPT, messages(tokens))
    assert len(server.wait_for_messages(RCPT, 5)) == 5, server.output()
    stored = stored_by_token(server.maildir(RCPT), tokens)
    pop3 = server.ports["pop3"]

    # postroom first: every message, its stored size and bytes; QUIT moves them to cur/.
    sizes, bodies, uids = view(pop3)
    assert bodies == stored
    assert sizes == {t: len(d) for t, d in stored.items()}

    # Dovecot on the same folder says the same.
    try:
        dovecot.start()
    except HarnessError as exc:
        pytest.fail(f"dovecot did not start: {exc}", pytrace=False)
    d_sizes, d_bodies, _ = view(dovecot.port)
    assert d_bodies == stored, dovecot.log()
    assert d_sizes == sizes

    # Dovecot deletes one; postroom no longer lists it, ignores Dovecot's files, keeps UIDLs.
    delete(dovecot.port, tokens[0])
    dovecot_files = {p.name for p in server.maildir(RCPT).iterdir() if p.is_file()}
    assert any(name.startswith("dovecot") for name in dovecot_files), dovecot_files
    sizes, bodies, after = view(pop3)
    want = {t: d for t, d in stored.items() if t != tokens[0]}
    assert bodies == want
    assert sizes == {t: len(d) for t, d in want.items()}
    assert after == {t: u for t, u in uids.items() if t != tokens[0]}

    # postroom deletes one; Dovecot no longer lists it and still reads the rest whole.
    delete(pop3, tokens[1])
    del want[tokens[1]]
    d_sizes, d_bodies, _ = view(dovecot.port)
    assert d_bodies == want, dovecot.log()
    assert d_sizes == {t: len(d) for t, d in want.items()}

    # Mail keeps arriving and postroom keeps serving it beside Dovecot's index files.
    late = new_token()
    smtp_send(server.smtp_port, SENDER, RCPT, [make_message(late, sender=SENDER, recipient=RCPT)])
    assert len(server.wait_for_messages(RCPT, len(want) + 1)) == len(want) + 1
    want[late] = stored_by_token(server.maildir(RCPT), [late])[late]
    _, bodies, after = view(pop3)
    assert bodies == want
    assert {t: u for t, u in after.items() if t != late} == {
        t: u for t, u in uids.items() if t in want}



def renamed_under_session(
    server: Postroom, dovecot: PrivateDovecot
) -> tuple[dict[str, bytes], dict[str, str], poplib.POP3]:
    """Two messages; a postroom session logs in; then Dovecot reads both, which renames
    them new/ -> cur/ with the S flag (postroom's lock binds postroom only)."""
    tokens = [new_token() for _ in range(2)]
    smtp_send(server.smtp_port, SENDER, RCPT,
              [make_message(t, sender=SENDER, recipient=RCPT) for t in tokens])
    assert len(server.wait_for_messages(RCPT, 2)) == 2, server.output()
    stored = stored_by_token(server.maildir(RCPT), tokens)
    # UIDL -> token without reading a message (postroom moves what was read, even with
    # TOP, to cur/ at QUIT): the maildrop lists the oldest delivery first, and the two
    # messages went in one after the other.
    probe = pop3_session(server.ports["pop3"], user=RCPT, password=PASSWORD)
    try:
        uids = {uid: tokens[number - 1] for number, uid in pop3_uidls(probe).items()}
        probe.quit()
    finally:
        probe.close()
    assert all(p.parent.name == "new" for p in server.maildir(RCPT).glob("*/*,S=*"))
    try:
        dovecot.start()
    except HarnessError as exc:
        pytest.fail(f"dovecot did not start: {exc}", pytrace=False)
    client = pop3_session(server.ports["pop3"], user=RCPT, password=PASSWORD)
    _, d_bodies, _ = view(dovecot.port)
    assert d_bodies == stored
    assert all(p.parent.name == "cur" for p in server.maildir(RCPT).glob("*/*,S=*"))
    return stored, uids, client


def test_retr_finds_a_message_another_reader_renamed(
    servers: tuple[Postroom, PrivateDovecot],
) -> None:
    stored, _, client = renamed_under_session(*servers)
    try:
        downloads = [pop3_message(client, n) for n in (1, 2)]
        client.quit()
    finally:
        client.close()
    assert sorted(downloads) == sorted(stored.values())


def test_dele_removes_a_message_another_reader_renamed(
    servers: tuple[Postroom, PrivateDovecot],
) -> None:
    server, _ = servers
    _, uids, client = renamed_under_session(*servers)
    try:
        deleted = uids[client.uidl(1).split()[2].decode()]
        client.dele(1)
        reply = client.quit()
    finally:
        client.close()
    files = [p.read_bytes() for p in server.maildir(RCPT).glob("*/*,S=*")]
    # Either the message is gone, or QUIT must not have claimed success (RFC 1939 6).
    assert all(deleted.encode() not in data for data in files) or not reply.startswith(b"+OK"), (
        f"QUIT said {reply!r} but the DELE'd message is still in the Maildir"
    )


def test_dovecot_shows_the_return_path_postroom_filed(
    servers: tuple[Postroom, PrivateDovecot],
) -> None:
    """RFC 5321 4.4: the Maildir copy carries the envelope sender as its Return-Path (the
    one the client sent replaced), so a reader of the Maildir alone still has it."""
    server, dovecot = servers
    token = new_token()
    message = b"Return-Path: <forged@evil.example>\r\n" + make_message(
        token, sender=SENDER, recipient=RCPT)
    smtp_send(server.smtp_port, SENDER, RCPT, [message])
    assert len(server.wait_for_messages(RCPT, 1)) == 1, server.output()
    try:
        dovecot.start()
    except HarnessError as exc:
        pytest.fail(f"dovecot did not start: {exc}", pytrace=False)
    _, bodies, _ = view(dovecot.port)
    got = bodies[token]
    assert got.startswith(f"Return-Path: <{SENDER}>\r\nReceived: ".encode()), got[:200]
    assert b"forged@evil.example" not in got
    client = pop3_session(dovecot.port, user=RCPT, password=PASSWORD)
    try:
        _, lines, _ = client.top(1, 0)  # Dovecot's own parse of the header: the field is there
        assert lines[0] == f"Return-Path: <{SENDER}>".encode()
        client.quit()
    finally:
        client.close()
