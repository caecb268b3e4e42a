"""POP3 failures through real clients: dropped sessions, concurrent logins, kill -9 during Update.

RFC 1939 6: only QUIT in the Transaction state enters the Update state, so a
session that ends any other way deletes nothing. RFC 2449 8.1.2: a maildrop
held by another session is refused with [IN-USE]. And a server killed while
it removes messages must leave every message either whole or gone, with a
maildrop that the restarted server lists cleanly. Mail goes in through
postroom's SMTP listener.
"""

from __future__ import annotations

import poplib
import re
import subprocess
import time
from collections.abc import Callable

import pytest
from mailcheck import make_message, new_token
from mailharness import (
    LOOPBACK,
    Postroom,
    maildir_files,
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
SENDER = "sender@client.example"
SIZE_RE = re.compile(r",S=(\d+)")


def pop3_server(factory: Callable[..., Postroom]) -> Postroom:
    server = factory(listeners=("smtp", "pop3"), aliases={},
                     extra_toml="[pop3]\nallow_plaintext_auth = true\n")
    wait_for_pop3(server.ports["pop3"])
    return server


def deliver(server: Postroom, count: int) -> dict[str, bytes]:
    """Send `count` small messages through SMTP; return {token: stored bytes}."""
    tokens = [new_token() for _ in range(count)]
    smtp_send(server.smtp_port, SENDER, RCPT, [
        make_message(t, sender=SENDER, recipient=RCPT, body=f"body {t}\r\n.\r\n..\r\n".encode())
        for t in tokens
    ])
    got = server.wait_for_messages(RCPT, count)
    assert len(got) == count, server.output()
    return stored_by_token(server.maildir(RCPT), tokens)


def login(server: Postroom, timeout: float = 10.0) -> poplib.POP3:
    """Log in as RCPT, retrying while an old session's lock has not been released yet."""
    deadline = time.monotonic() + timeout
    while True:
        client = pop3_session(server.ports["pop3"])
        try:
            client.user(RCPT)
            client.pass_(server.users[RCPT])
            return client
        except poplib.error_proto as exc:
            client.close()
            if not exc.args[0].startswith(b"-ERR [IN-USE]") or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def names(server: Postroom) -> list[str]:
    return sorted(str(p.relative_to(server.maildir(RCPT))) for p in maildir_files(
        server.maildir(RCPT)))


def test_dropped_session_after_dele_deletes_nothing(
    postroom_factory: Callable[..., Postroom],
) -> None:
    server = pop3_server(postroom_factory)
    stored = deliver(server, 3)
    before = names(server)
    client = login(server)
    uids = pop3_uidls(client)
    pop3_message(client, 1)
    for number in uids:
        client.dele(number)
    # The connection drops: no QUIT, so no Update state.
    client.sock.close()
    client.file.close()

    client = login(server)
    try:
        assert pop3_uidls(client) == uids
        downloads = [pop3_message(client, n) for n in pop3_listing(client)]
        assert sorted(downloads) == sorted(stored.values())
    finally:
        client.sock.close()
        client.file.close()
    # Not even the retrieved message moved to cur/: a session without QUIT changes nothing.
    assert names(server) == before


def test_second_login_is_refused_in_use(
    postroom_factory: Callable[..., Postroom], require_peer: Callable[..., str],
) -> None:
    curl = require_peer("curl")
    server = pop3_server(postroom_factory)
    deliver(server, 2)
    first = login(server)
    try:
        second = pop3_session(server.ports["pop3"])
        try:
            second.user(RCPT)
            with pytest.raises(poplib.error_proto) as refused:
                second.pass_(server.users[RCPT])
            assert refused.value.args[0].startswith(b"-ERR [IN-USE]"), refused.value.args
        finally:
            second.close()
        # A real client sees the refusal too (curl: 67, "login denied").
        result = subprocess.run(
            [curl, "-sS", "--max-time", "20", "-u", f"{RCPT}:{server.users[RCPT]}",
             f"pop3://{LOOPBACK}:{server.ports['pop3']}/"],
            capture_output=True, timeout=60, check=False)
        assert result.returncode != 0, result
        # The first session is unaffected, and its QUIT releases the maildrop.
        assert first.stat()[0] == 2
        first.quit()
    finally:
        first.close()
    client = login(server, timeout=2)
    try:
        assert client.stat()[0] == 2
        client.quit()
    finally:
        client.close()


def test_kill_9_right_after_quit_leaves_each_message_whole_or_gone(
    postroom_factory: Callable[..., Postroom],
) -> None:
    """DELE 200 of 240 messages, RETR 20 of the rest, QUIT, and SIGKILL the server as soon as
    the first file disappears; then check the maildrop file by file and through POP3."""
    server = pop3_server(postroom_factory)
    stored = deliver(server, 240)
    folder = server.maildir(RCPT)
    client = login(server)
    uids = pop3_uidls(client)
    downloads = {n: pop3_message(client, n) for n in range(201, 221)}
    token_of = {}
    for number in uids:
        data = downloads.get(number)
        if data is None:
            _, lines, _ = client.top(number, 0)
            data = b"\r\n".join(lines)
        token_of[number] = next(t for t in stored if t.encode() in data)
    for number in range(1, 201):
        client.dele(number)
    client.sock.sendall(b"QUIT\r\n")
    deadline = time.monotonic() + 5
    while len(maildir_files(folder)) == 240 and time.monotonic() < deadline:
        time.sleep(0.0005)
    server.kill()
    client.close()

    # File by file: whole, its size in the name, one copy of each message at most.
    files = maildir_files(folder)
    seen: set[str] = set()
    for path in files:
        data = path.read_bytes()
        match = SIZE_RE.search(path.name)
        assert match and int(match.group(1)) == len(data), path
        token = next((t for t in stored if t.encode() in data), None)
        assert token is not None and data == stored[token], f"{path} is not a delivered message"
        assert token not in seen, f"two copies of {token}"
        seen.add(token)
    assert not [p for p in (folder / "tmp").iterdir()], "files left in tmp/"
    # Nothing that was not marked for deletion is gone.
    kept = {token_of[n] for n in range(201, 241)}
    assert kept <= seen, f"{len(kept - seen)} unmarked messages vanished"

    server.start()
    wait_for_pop3(server.ports["pop3"])
    client = login(server)
    try:
        count, total = client.stat()
        assert count == len(files)
        assert total == sum(p.stat().st_size for p in files)
        after = pop3_uidls(client)
        by_uid = {u: n for n, u in uids.items()}
        for number, uid in after.items():
            assert uid in by_uid, f"new UIDL {uid} after the restart"
            assert pop3_message(client, number) == stored[token_of[by_uid[uid]]]
        client.quit()
    finally:
        client.close()
