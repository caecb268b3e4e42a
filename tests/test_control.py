"""One `postroom serve` per data folder, and the control socket the CLI reaches it through.

Real `postroom serve` processes: a second one refuses to start while the
first drains a delivery, kill -9 leaves files that block nothing, and no
command signals a process because a pid file names it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inprocess import free_port
from postroom.control import (
    CONTROL_SOCKET,
    PID_FILE,
    AlreadyRunning,
    Answer,
    ServerLock,
    serve_control,
    tell_server,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, flock")

WAIT = 30.0  # seconds any one condition is waited for before the test fails



def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT}s for {what}"
        time.sleep(0.02)


def postroom(data: Path, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postroom", "--data", str(data), *argv],
        input=stdin.decode(), capture_output=True, text=True, timeout=WAIT, check=False,
    )


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4) == b"220 "
    except OSError:
        return False


class Server:
    """A `postroom serve` process on `data`, its log in DATA/serve.log."""

    def __init__(self, data: Path, port: int) -> None:
        self.data = data
        self.port = port
        self.log = data / "serve.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "postroom", "--data", str(data), "serve"],
                stdout=subprocess.DEVNULL, stderr=log,
            )
        wait_for(lambda: answers(port) or self.process.poll() is not None, "the server")
        assert self.process.poll() is None, self.log.read_text()

    @property
    def pid(self) -> int:
        return self.process.pid

    def logged(self, text: str) -> bool:
        return text in self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def write_config(data: Path, port: int, *, workers: int = 2, route: int | None = None) -> None:
    data.mkdir(exist_ok=True)
    text = (f'hostname = "mail.isp.example"\ndomains = ["isp.example"]\nworkers = {workers}\n'
            f'[listen]\nsmtp = "127.0.0.1:{port}"\n')
    if route is not None:
        text += f'[routes]\n"corp.example" = "127.0.0.1:{route}"\n'
    (data / "postroom.toml").write_text(text)


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


class SlowSink:
    """An SMTP server (no extensions) that keeps its answer to the end of DATA until
    `release` is set: a delivery that stays in flight for as long as a test needs."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.in_data = threading.Event()
        self.release = threading.Event()
        self.messages: list[bytes] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 sink.corp.example ESMTP\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    message = b"".join(iter(lines.readline, b".\r\n"))
                    self.messages.append(message)
                    self.in_data.set()
                    self.release.wait(WAIT)
                    conn.sendall(b"250 2.0.0 stored\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 bye\r\n")
                    return
                elif verb in (b"EHLO", b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    conn.sendall(b"250 sink.corp.example\r\n")
                else:
                    conn.sendall(b"502 5.5.1 not here\r\n")

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture
def sink() -> Iterator[SlowSink]:
    s = SlowSink()
    yield s
    s.close()


def test_a_second_serve_refuses_while_the_first_drains_a_delivery(
    tmp_path: Path, sink: SlowSink
) -> None:
    data, port = tmp_path / "var", free_port()
    write_config(data, port, route=sink.port)
    first = Server(data, port)
    try:
        queued = postroom(data, "sendmail", "-f", "smith@isp.example", "boss@corp.example",
                          stdin=b"Subject: once\n\nonly once, please\n")
        assert queued.returncode == 0, queued.stderr
        assert sink.in_data.wait(WAIT)  # the relay is in the middle of the delivery
        workers = children_of(first.pid)
        assert workers
        first.process.send_signal(signal.SIGTERM)
        # Draining: listeners closed, workers gone, the delivery still in flight.
        wait_for(lambda: first.logged(f"master[{first.pid}]: stopping: no new connections"),
                 "the drain")
        wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to leave")
        assert first.process.poll() is None

        second = postroom(data, "serve")  # a supervisor restarting it
        assert second.returncode == 2
        assert f"postroom is already running (pid {first.pid})" in second.stderr
        assert "listening" not in second.stderr
        assert (data / PID_FILE).read_text() == f"{first.pid}\n"  # left as it was
        flushed = postroom(data, "queue", "flush")
        assert f"the server (pid {first.pid}) is stopping" in flushed.stdout

        sink.release.set()
        assert first.process.wait(WAIT) == 0
    finally:
        sink.release.set()
        first.kill()
    assert (sink.connections, len(sink.messages)) == (1, 1)  # relayed once, not twice
    assert not (data / PID_FILE).exists() and not (data / CONTROL_SOCKET).exists()
    third = Server(data, port)  # once the first has ended, a new one starts
    try:
        assert (data / PID_FILE).read_text() == f"{third.pid}\n"
        wait_for(lambda: third.logged("queue: started with 0 message(s)"), "the queue")
    finally:
        assert third.stop() == 0
    assert sink.connections == 1


def test_kill_9_leaves_files_that_block_nothing(tmp_path: Path) -> None:
    data, port = tmp_path / "var", free_port()
    write_config(data, port)
    first = Server(data, port)
    workers = children_of(first.pid)
    first.kill()
    wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to die with it")
    assert (data / PID_FILE).read_text() == f"{first.pid}\n"  # left behind, unlocked
    assert (data / CONTROL_SOCKET).exists()
    assert postroom(data, "queue", "flush").stdout == (
        "flushed 0 messages; the server is not running\n")
    second = Server(data, port)
    try:
        assert (data / PID_FILE).read_text() == f"{second.pid}\n"
        out = postroom(data, "queue", "flush").stdout
        assert out == f"flushed 0 messages; told the server (pid {second.pid})\n"
    finally:
        assert second.stop() == 0
    assert not (data / PID_FILE).exists() and not (data / CONTROL_SOCKET).exists()


STRANGER = (  # ends with 0 on SIGUSR2; SIGUSR1 keeps its default action (the end, by signal)
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR2, lambda *a: sys.exit(0))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_no_command_signals_the_process_a_stale_pid_file_names(tmp_path: Path) -> None:
    """After kill -9 and pid reuse the pid file names some other Python program."""
    data = tmp_path / "var"
    write_config(data, free_port())
    stale = socket.socket(socket.AF_UNIX)  # a control socket whose server has died
    stale.bind(str(data / CONTROL_SOCKET))
    stale.close()
    stranger = subprocess.Popen([sys.executable, "-c", STRANGER], stdout=subprocess.PIPE)
    try:
        assert stranger.stdout is not None and stranger.stdout.readline() == b"ready\n"
        (data / PID_FILE).write_text(f"{stranger.pid}\n")
        flushed = postroom(data, "queue", "flush")
        assert flushed.stdout == "flushed 0 messages; the server is not running\n"
        sent = postroom(data, "sendmail", "-v", "boss@corp.example", stdin=b"\nx\n")
        assert sent.returncode == 0 and sent.stderr.endswith("; the server is not running\n")
        # A SIGUSR1 sent before this SIGUSR2 would have ended it first (and by signal).
        stranger.send_signal(signal.SIGUSR2)
        assert stranger.wait(WAIT) == 0
    finally:
        stranger.kill()
        stranger.wait()


def test_release_removes_only_its_own_files_and_a_worker_releases_nothing(
    tmp_path: Path,
) -> None:
    lock = ServerLock.acquire(tmp_path)
    assert (tmp_path / PID_FILE).read_text() == f"{os.getpid()}\n"
    pid = os.fork()
    if pid == 0:  # a forked worker: its release must leave the primary's lock alone
        try:
            lock.in_worker()
            lock.release()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert (tmp_path / PID_FILE).exists() and (tmp_path / CONTROL_SOCKET).exists()
    with pytest.raises(AlreadyRunning) as refused:
        ServerLock.acquire(tmp_path)
    assert refused.value.pid == os.getpid()
    # Someone else's pid file under the name now: it is not this lock's to remove.
    (tmp_path / "other").write_text("12345\n")
    os.replace(tmp_path / "other", tmp_path / PID_FILE)
    lock.release()
    assert (tmp_path / PID_FILE).read_text() == "12345\n"
    assert not (tmp_path / CONTROL_SOCKET).exists()
    ServerLock.acquire(tmp_path).release()  # an unlocked pid file blocks nothing


def test_the_control_socket_answers_in_a_folder_too_long_for_sun_path(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 60) / ("e" * 60)
    data.mkdir(parents=True)
    assert len(str(data / CONTROL_SOCKET)) > 108  # unix(7): sun_path is 108 octets
    rescans: list[int] = []
    stopping = False

    async def scenario() -> list[Answer | None]:
        with ServerLock.acquire(data) as lock:
            server = await serve_control(lock, lambda: rescans.append(1), lambda: stopping)
            try:
                said = [await asyncio.to_thread(tell_server, data)]
                nonlocal stopping
                stopping = True
                said.append(await asyncio.to_thread(tell_server, data))
            finally:
                server.close()
        said.append(await asyncio.to_thread(tell_server, data))  # released: nobody listens
        return said

    assert asyncio.run(scenario()) == [Answer(os.getpid()), Answer(os.getpid(), stopping=True),
                                       None]
    assert rescans == [1]  # a stopping server changes nothing
