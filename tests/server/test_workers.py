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

from inprocess import free_port
from postroom.server.workers import worker_count

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + prctl")



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


def wait_for_workers(pid: int, count: int) -> list[int]:
    """The children of `pid` once there are `count` (or what there is after 20 s).

    The listener is bound before the fork, so a connection can succeed before
    the workers exist."""
    deadline = time.monotonic() + 20
    while len(workers := children_of(pid)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return workers


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
        workers = wait_for_workers(proc.pid, 2)
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
    workers = wait_for_workers(proc.pid, 2)
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


def test_mail_submitted_to_any_worker_is_relayed_by_the_primary(tmp_path: Path) -> None:
    import ssl

    corp, isp = tmp_path / "corp", tmp_path / "isp"
    corp.mkdir()
    isp.mkdir()
    corp_port, submission_port = free_port(), free_port()
    receiver = start_server(corp, corp_port)
    (isp / "postroom.toml").write_text(
        'hostname = "mail.isp.example"\ndomains = ["isp.example"]\nworkers = 3\n'
        f'[listen]\nsubmission = "127.0.0.1:{submission_port}"\n'
        f'[routes]\n"corp.example" = "127.0.0.1:{corp_port}"\n'
    )
    subprocess.run(
        [sys.executable, "-m", "postroom", "--data", str(isp), "user", "add",
         "smith@isp.example", "--password-stdin"], input=b"pw\n", check=True,
        capture_output=True,
    )
    log_path = tmp_path / "provider.log"
    with log_path.open("wb") as log_file:  # the child keeps its own descriptor
        provider = subprocess.Popen(
            [sys.executable, "-m", "postroom", "--data", str(isp), "serve"],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", submission_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        for n in range(12):  # separate connections: several workers take some
            with smtplib.SMTP("127.0.0.1", submission_port, timeout=10) as client:
                client.starttls(context=context)
                client.login("smith@isp.example", "pw")
                message = b"From: smith@isp.example\r\nSubject: %d\r\n\r\nx\r\n" % n
                client.sendmail("smith@isp.example", ["boss@corp.example"], message)
        inbox = corp / "mail" / "corp.example" / "boss" / "new"
        deadline = time.monotonic() + 20  # no rescan interval waited for: told at once
        while time.monotonic() < deadline and len(list(inbox.glob("*"))) < 12:
            time.sleep(0.05)
        assert len(list(inbox.glob("*"))) == 12
    finally:
        for proc in (provider, receiver):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    # The primary relays what the workers queue: submission sessions go to them
    # first, the primary takes only what they leave (server.acceptor).
    listening = [line for line in log_path.read_text().splitlines()
                 if f"listening for submission on 127.0.0.1:{submission_port}" in line]
    assert len(listening) == 3
    assert sum("(taking what the workers leave)" in line for line in listening) == 1



def test_a_worker_whose_parent_died_before_prctl_leaves() -> None:
    """The parent may die between fork(2) and prctl(2): no signal comes then, so the
    child checks who its parent is and leaves instead of keeping the ports."""
    from postroom.server import workers

    pid = os.fork()
    if pid == 0:  # the child: told its parent was some other, long gone, process
        try:
            workers._die_with_parent(os.getppid() + 1_000_000)
        finally:
            os._exit(0)  # reached only if the check did not end the process
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1
