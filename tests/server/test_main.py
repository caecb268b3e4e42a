"""`postroom serve` as a process: SIGHUP reloads (server/reload.py) and the server goes on;
SIGTERM then stops it and its workers cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inprocess import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + prctl")

WAIT = 30.0



def wait_for_banner(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4) == b"220 ":
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the server did not answer")


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("to_the_group", [False, True], ids=["kill -HUP", "hangup"])
def test_sighup_reloads_and_the_server_goes_on(tmp_path: Path, to_the_group: bool) -> None:
    """`kill -HUP PID`, or a terminal's hangup (every process of the group gets it: the
    workers leave it to the primary, which replaces them)."""
    port = free_port()
    (tmp_path / "postroom.toml").write_text(
        f'hostname = "mx.corp.example"\nworkers = 3\n[listen]\nsmtp = "127.0.0.1:{port}"\n'
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "postroom", "--data", str(tmp_path), "serve"],
            stdout=subprocess.DEVNULL, stderr=out, start_new_session=True,
        )
    try:
        wait_for_banner(port, proc)
        deadline = time.monotonic() + WAIT
        while len(children_of(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = children_of(proc.pid)
        assert len(before) == 2
        if to_the_group:
            os.killpg(proc.pid, signal.SIGHUP)
        else:
            proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and (
                set(children_of(proc.pid)) & set(before) or len(children_of(proc.pid)) < 2):
            time.sleep(0.05)
        assert proc.poll() is None  # still serving
        assert len(children_of(proc.pid)) == 2 and not set(children_of(proc.pid)) & set(before)
        wait_for_banner(port, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"master[{proc.pid}]: SIGHUP: reloading the configuration" in text
    assert "configuration 2 in force for new connections" in text
    assert f"master[{proc.pid}]: stopped" in text
    assert "ended by signal" not in text  # the workers stopped as cleanly
    assert "Traceback" not in text
    assert not (tmp_path / "postroom.pid").exists()
