"""A `postroom serve` subprocess for the operations tests: its log read as it comes, and load.

`Server` starts the command, collects standard error line by line in a thread
and lets a test wait for a line (no sleeping: a condition variable). `Load`
runs SMTP and POP3 clients in threads until told to stop, and keeps the
Message-ID of every message a server acknowledged with 250, and every error.
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
WAIT = 30.0  # seconds: the longest a test waits for a line of the log



def postroom(*args: str, data: Path, stdin: bytes | None = None, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a postroom command on `data`."""
    return subprocess.run([sys.executable, "-m", "postroom", "--data", str(data), *args],
                          input=stdin, capture_output=True, check=check, timeout=120,
                          env=env)


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Server:
    """`postroom serve` (or `prefix + [python, -m, postroom, ...]`) with its log collected."""

    def __init__(self, data: Path, *, prefix: Sequence[str] = (), python: str = sys.executable,
                 args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [*prefix, python, "-m", "postroom", "--data", str(data), *args, "serve"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<exit>")
            self._changed.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = WAIT) -> list[str]:
        """The first `count` log lines matching `pattern` (a regular expression)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "<exit>"):
                    raise AssertionError(f"no {count} line(s) matching {pattern!r} in the log:\n"
                                         + "\n".join(self.lines[-60:]))
                self._changed.wait(left)

    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def ready(self) -> Server:
        self.wait_for(r"postroom ready")
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self._reader.join(timeout=10)


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def uid_of(pid: int) -> tuple[int, int, int, int]:
    """Real, effective, saved and filesystem uid of a process (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            real, effective, saved, fs = (int(v) for v in line.split()[1:5])
            return real, effective, saved, fs
    raise AssertionError(f"no Uid line for {pid}")


def message(n: int, who: str) -> tuple[str, bytes]:
    mid = f"<{who}.{n}.{time.monotonic_ns()}@load.example>"
    return mid, (f"From: load@client.example\r\nTo: boss@corp.example\r\nMessage-ID: {mid}\r\n"
                 f"Subject: load {who} {n}\r\n\r\nbody {n}\r\n").encode()


@dataclass
class Load:
    """SMTP senders and POP3 readers in threads, against a running server."""

    smtp_port: int
    pop3_port: int | None
    recipient: str = "boss@corp.example"
    # One reader per maildrop: a second session on it gets [IN-USE] (RFC 2449).
    logins: tuple[tuple[str, str], ...] = (("boss@corp.example", "pw"), ("pat@corp.example", "pw"))
    connect: Callable[[str, int], socket.socket] | None = None  # e.g. into a namespace
    acknowledged: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pop3_sessions: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _progress: threading.Condition = field(default_factory=threading.Condition)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _smtp(self, who: str) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            mid, data = message(n, who)
            try:
                with SMTPClient(self.connect, "127.0.0.1", self.smtp_port, timeout=30) as client:
                    client.ehlo("load.example")
                    client.sendmail("load@client.example", [self.recipient], data)
            except (OSError, smtplib.SMTPException) as exc:
                self._failed(f"smtp {who} {n}: {exc!r}")
                continue
            with self._progress:
                self.acknowledged.append(mid)
                self._progress.notify_all()

    def _pop3(self, who: str, login: tuple[str, str]) -> None:
        while not self._stop.is_set():
            try:
                client = POP3Client(self.connect, "127.0.0.1", self.pop3_port or 0, timeout=30)
                try:
                    client.stls(client_context())
                    client.user(login[0])
                    client.pass_(login[1])
                    client.stat()
                    client.uidl()
                finally:
                    client.quit()
            except (OSError, poplib.error_proto) as exc:
                self._failed(f"pop3 {who}: {exc!r}")
                continue
            with self._progress:
                self.pop3_sessions += 1
                self._progress.notify_all()

    def _failed(self, text: str) -> None:
        with self._progress:
            self.errors.append(text)
            self._progress.notify_all()

    def start(self, senders: int = 3, readers: int = 2) -> Load:
        jobs: list[tuple[Callable[..., None], tuple[object, ...]]] = [
            (self._smtp, (f"s{i}",)) for i in range(senders)]
        if self.pop3_port:
            jobs += [(self._pop3, (f"p{i}", self.logins[i % len(self.logins)]))
                     for i in range(readers)]
        for target, args in jobs:
            thread = threading.Thread(target=target, args=args, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def wait_for(self, acknowledged: int, pop3: int = 0, timeout: float = 120.0) -> None:
        """Until at least this many messages were acknowledged and POP3 sessions done."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while len(self.acknowledged) < acknowledged or self.pop3_sessions < pop3:
                left = deadline - time.monotonic()
                assert left > 0, (f"load stalled: {len(self.acknowledged)} acknowledged, "
                                  f"{self.pop3_sessions} POP3 sessions; {self.errors[-5:]}")
                self._progress.wait(left)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


class SMTPClient(smtplib.SMTP):
    """smtplib.SMTP whose connection comes from `connect` (None: the usual one)."""

    def __init__(self, connect: Callable[[str, int], socket.socket] | None, host: str,
                 port: int, timeout: float) -> None:
        self._connect_with = connect
        super().__init__(host, port, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        if self._connect_with is None:
            return super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock = self._connect_with(host, port)
        sock.settimeout(timeout)
        return sock


class POP3Client(poplib.POP3):
    def __init__(self, connect: Callable[[str, int], socket.socket] | None, host: str,
                 port: int, timeout: float) -> None:
        self._connect_with = connect
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        if self._connect_with is None:
            return super()._create_socket(timeout)  # type: ignore[misc]
        sock = self._connect_with(self.host, self.port)
        sock.settimeout(timeout)
        return sock


def message_ids(maildir: Path) -> set[str]:
    """The Message-IDs of every message in a Maildir (new/ and cur/)."""
    found = set()
    for sub in ("new", "cur"):
        folder = maildir / sub
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = re.search(rb"^Message-ID: (<[^>]+>)", path.read_bytes(), re.M)
            if match:
                found.add(match.group(1).decode())
    return found


def peer_certificate(port: int, connect: Callable[[str, int], socket.socket] | None = None,
                     ) -> bytes:
    """The DER certificate an implicit-TLS listener shows."""
    sock = connect("127.0.0.1", port) if connect else socket.create_connection(
        ("127.0.0.1", port), timeout=10)
    with client_context().wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


@contextmanager
def running(server: Server) -> Iterator[Server]:
    """Stops the server at the end; on a failure, its log goes to the test's output."""
    try:
        yield server
    except BaseException:
        print(server.log()[-20000:], file=sys.stderr)
        raise
    finally:
        server.stop()


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
