"""Workers that die are started again (server/supervisor.py): killed under load, one is replaced
and nothing acknowledged is lost; a crash loop is slowed down; a copy forked from the running
primary holds none of its connections."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from serving import Load, Server, children_of, message_ids, postroom, running

from inprocess import free_port
from postroom.server import supervisor as supervision

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, pidfd")


@pytest.mark.slow
def test_a_worker_killed_under_load_is_replaced_and_no_acknowledged_mail_is_lost(
        tmp_path: Path) -> None:
    smtp = free_port()
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\nworkers = 3\n'
        f'[listen]\nsmtp = "127.0.0.1:{smtp}"\n')
    postroom("user", "add", "boss@corp.example", "--password-stdin", data=tmp_path,
             stdin=b"pw\n")
    with running(Server(tmp_path).ready()) as server:
        server.wait_for(r"listening for smtp", count=3)
        load = Load(smtp, None).start(senders=4)
        try:
            load.wait_for(acknowledged=20)
            victim = children_of(server.proc.pid)[0]
            os.kill(victim, signal.SIGKILL)
            server.wait_for(rf"worker {victim} ended by signal 9 \(SIGKILL\); starting another "
                            "now")
            (line,) = server.wait_for(r"started worker \d+ in place of the one that ended")
            replacement = int(line.split("started worker ")[1].split()[0])
            assert replacement in children_of(server.proc.pid)
            assert victim not in children_of(server.proc.pid)
            server.wait_for(rf"\[{replacement}\]: listening for smtp")
            load.wait_for(acknowledged=len(load.acknowledged) + 20)
        finally:
            load.stop()
    # Sessions the kill cut off were never acknowledged; every acknowledged one arrived.
    assert set(load.acknowledged) <= message_ids(tmp_path / "mail" / "corp.example" / "boss")
    assert all("SMTPServerDisconnected" in e or "Connection reset" in e or "Broken pipe" in e
               for e in load.errors), load.errors


def test_a_crash_loop_is_slowed_down(monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """Each worker dies at once: the first is started again at once, then each waits twice
    as long as the one before, up to the maximum."""
    monkeypatch.setattr(supervision, "FIRST_RESTART_DELAY", 0.01)
    monkeypatch.setattr(supervision, "MAX_RESTART_DELAY", 0.04)

    def dying() -> int:
        pid = os.fork()
        if pid == 0:
            os._exit(3)
        return pid

    async def scenario() -> list[float]:
        watch = supervision.Supervisor([dying()], dying)
        delays: list[float] = []
        done = asyncio.Event()
        original = watch._schedule

        def schedule(delay: float) -> None:
            delays.append(delay)
            if len(delays) == 6:
                done.set()
                return
            original(delay)

        monkeypatch.setattr(watch, "_schedule", schedule)
        watch.install()
        await done.wait()
        await watch.stop()
        return delays

    with caplog.at_level(logging.INFO, logger="postroom.master"):
        delays = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert delays == [0.0, 0.01, 0.02, 0.04, 0.04, 0.04]
    assert "exited with status 3; starting another now" in caplog.text
    assert "starting another in 0.02s" in caplog.text and "crash loop" in caplog.text


def test_a_worker_forked_from_the_running_loop_holds_none_of_its_connections() -> None:
    """The primary closes a client's connection while a worker it forked meanwhile runs:
    the client sees the end at once (the copy does not keep the connection open)."""

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        client, held = socket.socketpair()
        held.setblocking(False)
        ready_r, ready_w = os.pipe()

        def child() -> int:
            os.write(ready_w, b"x")  # running; it would hold `held` if not given back
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
            signal.sigwait([signal.SIGUSR2])
            return 0

        pid = supervision.fork_from_loop([ready_w], child, [signal.SIGUSR2], lambda: None)
        await loop.run_in_executor(None, os.read, ready_r, 1)
        held.close()  # the primary ends the connection
        client.settimeout(10)
        try:
            return client.recv(10)  # b"": end of file, the peer's last holder is gone
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            client.close()
            os.close(ready_r)
            os.close(ready_w)

    assert asyncio.run(scenario()) == b""
