"""Out of file descriptors: real servers under a low RLIMIT_NOFILE log it and answer 421 where
they can; no client is left hanging or reset, and the server recovers."""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inprocess import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, rlimits")

WAIT = 30.0
# Descriptors a server process may have: enough to start (the interpreter, the
# user database, the log, the listeners), far fewer than the clients below.
LIMIT = 48
CLIENTS = 90
SERVE = "from postroom import cli; import sys; raise SystemExit(cli.main(sys.argv[1:]))"
# The same, on asyncio's own event loop instead of uvloop.
SERVE_ASYNCIO = (
    "import sys; import postroom.server.main as m\n"
    "m.install_event_loop_policy = lambda: 'asyncio'\n"
    "from postroom import cli; raise SystemExit(cli.main(sys.argv[1:]))\n"
)
# A DeferredServer (server.acceptor) alone, with what server.main gives it.
DEFERRED = """
import asyncio, resource, socket, sys
from postroom.server.acceptor import DeferredServer
from postroom.server.descriptors import Descriptors

class Hello(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(b"220 hello\\r\\n")

async def main():
    sock = socket.create_server(("127.0.0.1", 0))
    descriptors = Descriptors()
    descriptors.listen("submission", sock, b"421 4.3.2 no descriptors\\r\\n")
    DeferredServer(sock, Hello, descriptors.accept_failed, delay=0.001)
    descriptors.install(asyncio.get_running_loop())
    print(sock.getsockname()[1], flush=True)
    await asyncio.get_running_loop().connect_read_pipe(asyncio.Protocol, sys.stdin)
    await asyncio.sleep(3600)

asyncio.run(main())
"""



def low_limit() -> None:
    # The hard limit too: `serve` raises its soft limit to the hard one at start.
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def first_line(port: int) -> tuple[socket.socket, bytes]:
    """Connect and read the greeting: b"" is a clean close (FIN); a reset raises."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    try:
        return conn, conn.recv(4)
    except BaseException:
        conn.close()
        raise


@contextlib.contextmanager
def clients(port: int, count: int) -> Iterator[list[bytes]]:
    """`count` connections, each greeted (or not) before the next; all open until the end."""
    conns: list[socket.socket] = []
    seen: list[bytes] = []
    try:
        for _ in range(count):
            conn, greeting = first_line(port)
            conns.append(conn)
            seen.append(greeting)
        yield seen
    finally:
        for conn in conns:
            conn.close()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT}s for {what}"
        time.sleep(0.05)


def serve(tmp_path: Path, code: str) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    smtp, pop3 = free_port(), free_port()
    (tmp_path / "postroom.toml").write_text(
        f'hostname = "mx.corp.example"\nworkers = 1\n'
        f'[listen]\nsmtp = "127.0.0.1:{smtp}"\npop3 = "127.0.0.1:{pop3}"\n'
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "--data", str(tmp_path), "serve"],
            stdout=subprocess.DEVNULL, stderr=out, preexec_fn=low_limit,
        )
    try:
        wait_for(lambda: proc.poll() is not None or "postroom ready" in log.read_text(),
                 "the server")
    except BaseException:
        proc.kill()
        raise
    assert proc.poll() is None, log.read_text()
    return proc, smtp, pop3, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        assert proc.wait(WAIT) == 0
    finally:
        proc.kill()
        proc.wait()


def test_uvloop_closes_what_it_cannot_serve_and_the_log_says_why(tmp_path: Path) -> None:
    proc, smtp, _pop3, log = serve(tmp_path, SERVE)
    try:
        assert "event loop: uvloop" in log.read_text()
        with clients(smtp, CLIENTS) as greetings:
            assert set(greetings) <= {b"220 ", b"421 ", b""}, set(greetings)
            assert b"" in greetings  # libuv closed some unanswered
            wait_for(lambda: "accept connection: Too many open files" in log.read_text(),
                     "the log line")
        line = next(x for x in log.read_text().splitlines() if "Too many open files" in x)
        assert f"(limit {LIMIT} descriptors, ulimit -n)" in line
        # Once the sessions have ended, new clients are served again.
        wait_for(lambda: first_line(smtp)[1] == b"220 ", "a greeting")
    finally:
        stop(proc)


def test_asyncio_answers_421_and_the_log_names_the_listener(tmp_path: Path) -> None:
    proc, smtp, pop3, log = serve(tmp_path, SERVE_ASYNCIO)
    try:
        assert "event loop: asyncio" in log.read_text()
        with clients(smtp, CLIENTS) as greetings:
            assert set(greetings) == {b"220 ", b"421 "}, set(greetings)
            conn, greeting = first_line(pop3)  # the other listener, same process
            with conn:
                assert greeting == b"-ERR"
                assert conn.recv(100).startswith(b" [SYS/TEMP] ")
        wait_for(lambda: f"accept connection on smtp (127.0.0.1:{smtp}): Too many open files"
                 in log.read_text(), "the log line")
        wait_for(lambda: first_line(smtp)[1] == b"220 ", "a greeting")
    finally:
        stop(proc)


def test_the_primarys_deferred_listener_answers_421(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", DEFERRED], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=low_limit)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with clients(port, CLIENTS) as greetings:
            assert set(greetings) == {b"220 ", b"421 "}, set(greetings)
    finally:
        proc.kill()
        _out, err = proc.communicate()
    assert (f"accept connection on submission (127.0.0.1:{port}): Too many open files"
            in err.decode())
