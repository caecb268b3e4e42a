"""`postroom serve` with worker processes: all accept mail, SIGTERM stops them all, and
kill -9 of the primary takes the workers with it (no orphan keeps the ports)."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postroom.server.workers import worker_count

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + prctl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data: Path, port: int) -> subprocess.Popen[bytes]:
    (data / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\nworkers = 3\n'
        f'[listen]\nsmtp = "127.0.0.1:{port}"\n'
    )
    subprocess.run(
        [sys.executable, "-m", "postroom", "--data", str(data), "user", "add",
         "boss@corp.example", "--password-stdin"], input=b"pw\n", check=True,
        capture_output=True,
    )
    proc = subprocess.Popen([sys.executable, "-m", "postroom", "--data", str(data), "serve"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    return proc


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_worker_count_defaults_to_the_cpus() -> None:
    assert worker_count(3) == 3
    assert worker_count(0) == len(os.sched_getaffinity(0))


def test_workers_share_the_listener_and_stop_together(tmp_path: Path) -> None:
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        workers = children_of(proc.pid)
        assert len(workers) == 2
        for n in range(30):  # 30 connections: the kernel spreads them over the processes
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                message = b"Subject: %d\r\n\r\nx\r\n" % n
                client.sendmail("a@b.example", ["boss@corp.example"], message)
        assert len(list((tmp_path / "mail" / "corp.example" / "boss" / "new").iterdir())) == 30
        assert (tmp_path / "postroom.pid").read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not any(alive(pid) for pid in workers)
        assert not (tmp_path / "postroom.pid").exists()
    finally:
        proc.kill()
        proc.wait()


def test_kill_9_of_the_primary_takes_the_workers_along(tmp_path: Path) -> None:
    port = free_port()
    proc = start_server(tmp_path, port)
    workers = children_of(proc.pid)
    assert workers
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
    with socket.socket() as s:  # the port is free again: nobody kept it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
