"""Several postroom nodes on one PostgreSQL (tests/pgserver.py), each on its own loopback ports.

Mail one node receives is fetched by POP3 from another; the maildrop lock holds
across nodes, and a node killed with SIGKILL loses it within the lease, having
deleted nothing. PostgreSQL restarted under load: clients are told to retry,
nothing that got a 250 is lost, and service comes back by itself. PostgreSQL
down at start: one line. A node killed with mail in its queue and the next hop
down: another node delivers that mail once the hop is back, each message once.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from mailcheck import make_message, new_token
from mailharness import (
    LOOPBACK,
    Postroom,
    maildir_files,
    send_and_get_queue_id,
    submission_client,
)

from postroom.queue.pgqueue import LEASE_SECONDS as QUEUE_LEASE
from postroom.store.pgmailboxes import LEASE_SECONDS

BOSS, PASSWORD = "boss@corp.example", "boss-secret"
WAIT = 30.0  # seconds any one condition may take on a busy machine


def node_factory(postroom_factory: Callable[..., Postroom], url: str) -> Callable[..., Postroom]:
    """`node(first=False)`: a node on `url`; the first one adds the domain and users."""
    toml = f'[store]\nurl = "{url}"\n\n[pop3]\nallow_plaintext_auth = true\n'

    def node(first: bool = False, workers: int = 1, extra: str = "",
             listeners: tuple[str, ...] = ("smtp", "pop3")) -> Postroom:
        server = postroom_factory(start=False, listeners=listeners, extra_toml=toml + extra,
                                  workers=workers, users={BOSS: PASSWORD} if first else {},
                                  aliases={}, domains=["corp.example"] if first else [])
        server.start()
        return server
    return node


def send(node: Postroom, subject: str, timeout: float = WAIT) -> None:
    with smtplib.SMTP(LOOPBACK, node.smtp_port, timeout=timeout) as smtp:
        smtp.sendmail("sender@elsewhere.example", [BOSS],
                      f"Subject: {subject}\r\n\r\nbody of {subject}\r\n")


def pop3(node: Postroom, timeout: float = WAIT) -> poplib.POP3:
    client = poplib.POP3(LOOPBACK, node.ports["pop3"], timeout=timeout)
    client.user(BOSS)
    client.pass_(PASSWORD)
    return client


def until(condition: Callable[[], Any], limit: float = WAIT) -> Any:
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def subjects(client: poplib.POP3) -> list[str]:
    found = []
    for number in range(1, len(client.list()[1]) + 1):
        lines = client.retr(number)[1]
        found += [line.decode()[9:] for line in lines if line.startswith(b"Subject: ")]
    return found


@pytest.fixture
def node(postroom_factory: Callable[..., Postroom], pg_url: str) -> Callable[..., Postroom]:
    return node_factory(postroom_factory, pg_url)


def test_mail_received_on_one_node_is_fetched_from_another(
    node: Callable[..., Postroom],
) -> None:
    a = node(first=True, workers=2)
    b, c = node(), node()
    send(a, "from A")
    client = pop3(b)
    try:
        assert subjects(client) == ["from A"]
        uidl = client.uidl()[1]
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            pop3(c)
        client.dele(1)
    finally:
        client.quit()
    second = until(lambda: _try_login(c))
    assert second.stat()[0] == 0  # B's QUIT deleted it, for every node
    second.quit()
    assert uidl


def _try_login(node: Postroom) -> poplib.POP3 | None:
    try:
        return pop3(node)
    except poplib.error_proto as exc:
        assert b"[IN-USE]" in exc.args[0], exc
        return None


def test_a_killed_node_releases_the_maildrop_within_the_lease_and_deletes_nothing(
    node: Callable[..., Postroom],
) -> None:
    a = node(first=True)
    b, c = node(), node()
    for n in range(3):
        send(a, f"message {n}")
    client = pop3(b)
    uids = client.uidl()[1]
    client.retr(1)
    client.dele(1)
    client.dele(2)
    b.kill()  # mid-session, with deletions marked
    killed = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop3(c)  # the lease outlives its node for a while
    taken = until(lambda: _try_login(c), limit=LEASE_SECONDS + WAIT)
    # Within the lease (and the time a login takes on a busy machine).
    assert time.monotonic() - killed < LEASE_SECONDS + 5
    try:
        assert taken.uidl()[1] == uids  # nothing deleted
    finally:
        taken.quit()
    client.sock.close()


def test_postgresql_down_at_start_is_one_line(postroom_factory: Callable[..., Postroom]
                                              ) -> None:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    server = postroom_factory(start=False, users={}, aliases={}, domains=[],
                              extra_toml=f'[store]\nurl = "postgresql://postgres@{LOOPBACK}:'
                                         f'{port}/postroom"\n')
    server.write_config()
    result = subprocess.run([sys.executable, "-m", "postroom", "--data", str(server.data),
                             "serve"], capture_output=True, text=True, env=server.env(),
                            timeout=WAIT, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("postroom: error: ")
    assert f"PostgreSQL at {LOOPBACK}:{port}" in lines[0] and "refused" in lines[0]


def test_postgresql_restarted_under_load(node: Callable[..., Postroom], postgres: Any) -> None:
    a = node(first=True)
    b = node()
    accepted: list[str] = []
    refused: list[str] = []
    pop3_answers: list[str] = []
    stop = threading.Event()

    def sender(worker: int) -> None:
        n = 0
        while not stop.is_set():
            subject = f"w{worker} n{n}"
            n += 1
            try:
                send(a, subject)
            except smtplib.SMTPResponseException as exc:
                assert 400 <= exc.smtp_code < 500, exc  # never a permanent refusal
                refused.append(subject)
                continue
            except (smtplib.SMTPException, OSError):
                refused.append(subject)
                continue
            accepted.append(subject)

    def reader() -> None:
        while not stop.is_set():
            try:
                client = pop3(b)
            except poplib.error_proto as exc:
                pop3_answers.append(exc.args[0].decode())
                continue
            except OSError:
                continue
            pop3_answers.append("+OK")
            try:
                client.stat()
                client.quit()  # deletes nothing: the test counts every message at the end
            except (poplib.error_proto, OSError) as exc:
                pop3_answers.append(str(exc))

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(3)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    try:
        until(lambda: len(accepted) >= 10)
        postgres.stop()
        until(lambda: refused)  # the clients are told to come back later
        postgres.start()
        before = len(accepted)
        until(lambda: len(accepted) >= before + 10)  # service comes back by itself
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
    assert all(a.startswith("+OK") or "[SYS/TEMP]" in a or "[IN-USE]" in a
               for a in pop3_answers), pop3_answers
    client = until(lambda: _try_login(b))
    try:
        stored = subjects(client)
    finally:
        client.quit()
    assert set(accepted) <= set(stored)  # nothing that got a 250 is lost


def test_a_killed_node_s_queue_is_delivered_by_another_once(
    node: Callable[..., Postroom], postroom_factory: Callable[..., Postroom], pg_url: str,
) -> None:
    remote = "x@remote.example"
    hop = postroom_factory(start=False, hostname="mx.remote.example",
                           domains=["remote.example"], users={remote: "x"}, aliases={})
    relay = (f'\n[routes]\n"remote.example" = "{LOOPBACK}:{hop.smtp_port}"\n'
             '\n[queue]\nretry_after = ["1s"]\n')
    listeners = ("smtp", "submission")
    a = node(first=True, extra=relay, listeners=listeners)
    b = node(extra=relay, listeners=listeners)
    tokens = []
    with submission_client(a.ports["submission"], BOSS, PASSWORD) as client:
        for _ in range(5):
            token = new_token()
            send_and_get_queue_id(client, BOSS, [remote],
                                  make_message(token, sender=BOSS, recipient=remote))
            tokens.append(token)
    with psycopg.connect(pg_url) as conn:
        owners = conn.execute("SELECT DISTINCT owner FROM queue").fetchall()
    assert len(owners) == 1  # all of them A's, the next hop down
    a.kill()
    hop.start()  # the next hop is back; A is not

    def arrived() -> list[bytes]:
        return [path.read_bytes() for path in maildir_files(hop.maildir(remote))]

    until(lambda: len(arrived()) >= len(tokens), limit=QUEUE_LEASE + WAIT)
    with psycopg.connect(pg_url) as conn:
        until(lambda: conn.execute("SELECT count(*) FROM queue").fetchone() == (0,))
    found = arrived()
    assert sorted(t for t in tokens for m in found if t.encode() in m) == sorted(tokens)
    assert len(found) == len(tokens)  # none twice: none was in flight at the kill
    # B's log lines reach its file within its flush interval (0.2 s).
    until(lambda: re.search(r"queue: took \d+ message\(s\) no live node held", b.output()))
