"""Kill -9 test: SIGKILL postroom while clients send, then check nothing acknowledged was lost.

A 250 reply to DATA promises the message is safe on disk (RFC 5321 6.1: the
server "accepts responsibility"). Several smtplib clients send messages with
unique tokens until the server is killed with SIGKILL; afterwards every
acknowledged token must be in the Maildir, whole, at once (mail for local
recipients is filed before the 250, not queued), exactly once, and no file in
new/ may be partial (each parses, its body is the one sent, its size equals
its ,S= value). The server must then start again on the same data folder and
leave the mailbox as it was.

A killed process's written pages survive in the page cache, so this test
cannot see a missing fsync; tests/test_durability.py checks the order of the
durable steps (data sync, rename, folder sync, then the 250) on every path.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
import smtplib
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from mailcheck import CRLF, split_message
from mailharness import LOOPBACK, Postroom, maildir_files

pytestmark = pytest.mark.interop

RCPT = "boss@corp.example"
SENDER = "load@client.example"
CLIENTS = 4
ACKNOWLEDGED_BEFORE_THE_CUT = 100
SIZE_RE = re.compile(r",S=(\d+)")


def crash_body(token: str) -> bytes:
    """A ~16 KiB body derived from the token, so any stored copy can be checked whole."""
    lines = [f"token {token}".encode()]
    for i in range(200):
        digest = hashlib.sha256(f"{token}:{i}".encode()).hexdigest()
        lines.append(f"{i:04d} {digest} {digest[:14]}".encode())
    lines.append(f"end {token}".encode())
    return CRLF.join(lines) + CRLF


def crash_message(token: str) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: crash {token}\r\n"
        f"Message-ID: <{token}@client.example>\r\n\r\n"
    ).encode()
    return head + crash_body(token)


class Sender(threading.Thread):
    """Sends messages over one connection after another until stopped or refused."""

    def __init__(self, port: int, number: int, stop: threading.Event,
                 progress: threading.Condition) -> None:
        super().__init__(name=f"crash-sender-{number}", daemon=True)
        self.port = port
        self.number = number
        self.stop = stop
        self.progress = progress  # notified at every acknowledgement
        self.sent: list[str] = []
        self.acknowledged: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        count = 0
        try:
            while not self.stop.is_set():
                with smtplib.SMTP(LOOPBACK, self.port, timeout=10) as client:
                    for _ in range(5):  # a few messages per connection, then a new one
                        if self.stop.is_set():
                            return
                        token = f"t{self.number}x{count:05d}"
                        count += 1
                        self.sent.append(token)
                        # One recipient: a refusal raises, so returning means 250.
                        client.sendmail(SENDER, [RCPT], crash_message(token))
                        with self.progress:
                            self.acknowledged.append(token)
                            self.progress.notify_all()
        except (OSError, smtplib.SMTPException) as exc:
            # Expected once the server is gone: refused or reset connections.
            self.error = exc
        finally:
            with self.progress:
                self.progress.notify_all()


def check_new_files(folder: Path) -> dict[str, int]:
    """Every file in new/ (and cur/) is a whole message; return {token: copies}."""
    copies: dict[str, int] = {}
    for path in maildir_files(folder):
        data = path.read_bytes()
        match = SIZE_RE.search(path.name)
        assert match, f"no ,S= in the file name {path.name}"
        assert int(match.group(1)) == len(data), (
            f"{path.name}: ,S={match.group(1)} but {len(data)} octets (partial file?)"
        )
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        subject = str(parsed["Subject"] or "")
        assert subject.startswith("crash "), f"{path.name}: unexpected Subject {subject!r}"
        token = subject.split()[1]
        assert parsed.get_all("Received"), f"{path.name}: no Received header"
        assert split_message(data)[1] == crash_body(token), f"{path.name}: body damaged"
        copies[token] = copies.get(token, 0) + 1
    return copies


def test_kill_9_loses_no_acknowledged_message(
    postroom_factory: Callable[..., Postroom],
) -> None:
    server = postroom_factory()
    stop = threading.Event()
    progress = threading.Condition()
    senders = [Sender(server.smtp_port, n, stop, progress) for n in range(CLIENTS)]
    for sender in senders:
        sender.start()

    def acked() -> int:
        return sum(len(s.acknowledged) for s in senders)

    # Cut the power once enough messages were acknowledged, while every client sends.
    with progress:
        progress.wait_for(lambda: acked() >= ACKNOWLEDGED_BEFORE_THE_CUT
                          or not all(s.is_alive() for s in senders), timeout=60)
    server.kill()
    stop.set()
    for sender in senders:
        sender.join(timeout=30)
        assert not sender.is_alive(), f"{sender.name} hangs after the server died"

    acknowledged = {t for s in senders for t in s.acknowledged}
    sent = {t for s in senders for t in s.sent}
    assert len(acknowledged) >= ACKNOWLEDGED_BEFORE_THE_CUT, (
        f"only {len(acknowledged)} messages acknowledged before the kill; errors: "
        f"{[repr(s.error) for s in senders]}\n{server.output()}"
    )

    folder = server.maildir(RCPT)
    # Straight after the kill: whatever is in new/ is whole, and every acknowledged
    # message is there (nothing for a local recipient waits in a queue).
    at_kill = check_new_files(folder)
    missing = acknowledged - set(at_kill)
    assert not missing, (
        f"{len(missing)} of {len(acknowledged)} acknowledged messages lost, e.g. "
        f"{sorted(missing)[:5]}\nserver output:\n{server.output()}"
    )
    assert set(at_kill) <= sent
    twice = sorted(token for token, copies in at_kill.items() if copies > 1)
    assert not twice, f"filed more than once: {twice[:5]}"
    # At most the messages in flight at the kill were filed without their 250.
    assert len(set(at_kill) - acknowledged) <= CLIENTS

    server.start()  # the same data folder; must come up after an unclean stop
    assert check_new_files(folder) == at_kill  # nothing lost, nothing added
    assert server.stop() == 0
