"""The service manager's view (server/notify.py, server/journal.py, cli/system.py): READY=1,
RELOADING=1 and STOPPING=1 on $NOTIFY_SOCKET from the primary alone, journal lines without a
time of their own, and a unit file systemd accepts."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from serving import Server, postroom, running

from inprocess import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Unix sockets")


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_readiness_reload_and_stop_are_told_to_the_service_manager(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "postroom.toml").write_text(
        f'hostname = "mx.corp.example"\nworkers = 2\n[listen]\nsmtp = "127.0.0.1:{port}"\n')
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
        with running(Server(tmp_path, env=env)) as server:
            ready = receive(manager)
            assert ready["READY"] == "1" and ready["MAINPID"] == str(server.proc.pid)
            assert "smtp" in ready["STATUS"]
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                assert client.recv(4).startswith(b"220")  # bound and answering by then
            server.proc.send_signal(signal.SIGHUP)
            reloading = receive(manager)
            assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
            assert receive(manager)["READY"] == "1"
            server.proc.send_signal(signal.SIGTERM)
            assert receive(manager)["STOPPING"] == "1"
            assert server.proc.wait(30) == 0
        manager.settimeout(0)
        with pytest.raises(BlockingIOError):  # nothing more, and nothing from a worker
            manager.recv(4096)


def test_under_journald_lines_carry_a_priority_and_no_time(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "postroom.toml").write_text(
        f'hostname = "mx.corp.example"\nworkers = 2\n[listen]\nsmtp = "127.0.0.1:{port}"\n')
    # As systemd does: JOURNAL_STREAM names the stream standard error is.
    journal = ["sh", "-c", 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/$$/fd/2) exec "$0" "$@"']
    with running(Server(tmp_path, prefix=journal)) as server:
        (ready,) = server.wait_for(r"postroom ready")
        assert ready.startswith(f"<6>postroom.master[{server.proc.pid}]: postroom ready")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
    # The command's own words before the server starts ("postroom: made a self-signed
    # certificate") are not log records.
    lines = [line for line in server.lines if line != "<exit>" and
             not line.startswith("postroom: ")]
    assert all(re.match(r"<[0-7]>postroom\.[a-z0-9]+\[\d+\]: ", line) for line in lines), lines
    assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line) for line in lines)
    assert any(line.startswith("<4>") for line in lines)  # "running as root": a warning


def test_the_unit_passes_systemd_analyze(tmp_path: Path, require_peer: Callable[..., str],
                                         ) -> None:
    analyze = require_peer("systemd-analyze")
    data = tmp_path / "var"
    unit = postroom("--config", str(tmp_path / "postroom.toml"), "systemd-unit", data=data)
    text = unit.stdout.decode()
    for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 f"ReadWritePaths={data}", "PrivateTmp=yes", "ProtectHome=yes",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "User=postroom"):
        assert f"\n{line}\n" in text
    assert f"ExecStart={sys.executable} -m postroom --data {data} --config " in text
    assert "ExecReload=" in text and " reload\n" in text
    path = tmp_path / "postroom.service"
    path.write_text(text)
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                            timeout=120, check=False)
    problems = [line for line in result.stderr.splitlines()
                if "postroom.service" in line and "Failed to" not in line]
    assert result.returncode == 0 and not problems, result.stderr
